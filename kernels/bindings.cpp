// Python bindings of blockcopy's tile kernels: tensor checks, output allocation, current stream.
// blockcopy_core/tiles.py calls these; it converts tiles to the state's dtype and memory order first.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <type_traits>

#include "tiles.h"

namespace {

using blockcopy::Border;

// Error messages are built without std::ostream (so not with c10::str): on one machine, streaming a
// number from this module crashed, its inlined ostream code not matching the libstdc++ loaded at run
// time. A single std::string argument makes TORCH_CHECK skip the stream.
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string text(T value) {
  return std::to_string(value);
}
std::string text(const char* value) { return value; }
std::string text(const std::string& value) { return value; }
std::string text(at::ScalarType dtype) { return c10::toString(dtype); }
std::string text(const c10::Device& device) { return device.str(); }
std::string text(at::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

template <typename... Args>
std::string message(const Args&... args) {
  return (std::string() + ... + text(args));
}

#define BLOCKCOPY_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))

blockcopy::DenseMap dense_map(const at::Tensor& state) {
  BLOCKCOPY_CHECK(state.is_cuda() && state.dim() == 4, "state must be a (N, C, H, W) CUDA tensor, got ",
              state.sizes(), " on ", state.device());
  const auto dtype = state.scalar_type();
  BLOCKCOPY_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "state must be float16, bfloat16, float32 or float64, got ", dtype);
  const bool planar = state.is_contiguous();
  BLOCKCOPY_CHECK(planar || state.is_contiguous(at::MemoryFormat::ChannelsLast),
              "state must be contiguous in NCHW or channels_last order, got strides ", state.strides());
  return {state.data_ptr(), state.size(0), state.size(1), state.size(2), state.size(3),
          int(state.element_size()), planar};
}

at::MemoryFormat memory_format(const blockcopy::DenseMap& map) {
  return map.planar ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

blockcopy::BlockList block_list(const at::Tensor& state, const at::Tensor& stream, const at::Tensor& row,
                                const at::Tensor& col) {
  for (const at::Tensor* t : {&stream, &row, &col}) {
    BLOCKCOPY_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->device() == state.device(),
                "tile indices must be 1-d int64 tensors on ", state.device(), ", got ", t->sizes(), " ",
                t->scalar_type(), " on ", t->device());
    BLOCKCOPY_CHECK(t->numel() == stream.numel(), "stream, row and col must have the same length");
  }
  BLOCKCOPY_CHECK(stream.numel() < (int64_t(1) << 31), "at most 2^31 - 1 tiles per call");
  return {stream.data_ptr<int64_t>(), row.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
          stream.stride(0), row.stride(0), col.stride(0), stream.numel()};
}

void check_tile_size(const blockcopy::DenseMap& map, int64_t t, int64_t th, int64_t tw, bool block_aligned) {
  BLOCKCOPY_CHECK(t >= 1 && t <= map.h && t <= map.w, "tile size ", t, " does not fit a ", map.h, "x", map.w, " map");
  BLOCKCOPY_CHECK(!block_aligned || (map.h % t == 0 && map.w % t == 0), "map size ", map.h, "x", map.w,
              " is not a multiple of the tile size ", t);
  // One tile's vectors are indexed in 32 bits and spread over at most 65535 thread blocks of 256.
  BLOCKCOPY_CHECK(map.c * th * tw <= int64_t(65535) * 256, "tiles of ", map.c, "x", th, "x", tw,
              " elements are too large for these kernels");
}

void check_tiles(const at::Tensor& tiles, const at::Tensor& state, const blockcopy::DenseMap& map,
                 int64_t k, int64_t t) {
  BLOCKCOPY_CHECK(tiles.device() == state.device() && tiles.scalar_type() == state.scalar_type(),
              "tiles must be ", state.scalar_type(), " on ", state.device(), ", got ", tiles.scalar_type(),
              " on ", tiles.device());
  BLOCKCOPY_CHECK(tiles.dim() == 4 && tiles.size(0) == k && tiles.size(1) == map.c && tiles.size(2) == t &&
                  tiles.size(3) == t,
              "tiles must be (", k, ", ", map.c, ", ", t, ", ", t, "), got ", tiles.sizes());
  BLOCKCOPY_CHECK(tiles.is_contiguous(memory_format(map)), "tiles must be contiguous in the state's memory order (",
              map.planar ? "NCHW" : "channels_last", ")");
}

Border parse_border(const std::string& name) {
  if (name == "constant") return blockcopy::kConstant;
  if (name == "replicate") return blockcopy::kReplicate;
  if (name == "reflect") return blockcopy::kReflect;
  if (name == "circular") return blockcopy::kCircular;
  BLOCKCOPY_CHECK(false, "unknown border mode '", name, "' (constant, replicate, reflect or circular)");
}

blockcopy::Halo check_halo(const blockcopy::DenseMap& map, int64_t left, int64_t right, int64_t top,
                           int64_t bottom, Border border) {
  BLOCKCOPY_CHECK(left >= 0 && right >= 0 && top >= 0 && bottom >= 0, "halo must be non-negative");
  const int64_t most_x = std::max(left, right), most_y = std::max(top, bottom);
  BLOCKCOPY_CHECK(border != blockcopy::kReflect || (most_x < map.w && most_y < map.h),
              "reflect halo must be smaller than the map (", map.h, "x", map.w, ")");
  BLOCKCOPY_CHECK(border != blockcopy::kCircular || (most_x <= map.w && most_y <= map.h),
              "circular halo must not exceed the map (", map.h, "x", map.w, ")");
  return {int(left), int(right), int(top), int(bottom)};
}

// `value` in the state's dtype, its bit pattern repeated over 16 bytes.
std::array<unsigned char, 16> fill_pattern(double value, at::ScalarType dtype) {
  unsigned char one[8];
  size_t size = 0;
  if (dtype == at::kDouble) {
    size = sizeof(double);
    std::memcpy(one, &value, size);
  } else if (dtype == at::kFloat) {
    const float v = static_cast<float>(value);
    size = sizeof(float);
    std::memcpy(one, &v, size);
  } else if (dtype == at::kHalf) {
    const at::Half v{static_cast<float>(value)};
    size = sizeof(v.x);
    std::memcpy(one, &v.x, size);
  } else {
    const at::BFloat16 v{static_cast<float>(value)};
    size = sizeof(v.x);
    std::memcpy(one, &v.x, size);
  }
  std::array<unsigned char, 16> pattern;
  for (size_t i = 0; i < pattern.size(); i += size) std::memcpy(pattern.data() + i, one, size);
  return pattern;
}

void check_launch(cudaError_t err) {
  BLOCKCOPY_CHECK(err == cudaSuccess, "blockcopy tile kernel launch failed: ", cudaGetErrorString(err));
}

void scatter_tiles(at::Tensor state, const at::Tensor& tiles, const at::Tensor& stream, const at::Tensor& row,
                   const at::Tensor& col) {
  const blockcopy::DenseMap map = dense_map(state);
  const blockcopy::BlockList blocks = block_list(state, stream, row, col);
  const int64_t t = tiles.dim() == 4 ? tiles.size(3) : 0;
  check_tiles(tiles, state, map, blocks.k, t);
  check_tile_size(map, t, t, t, true);
  const c10::cuda::CUDAGuard guard(state.device());
  check_launch(blockcopy::launch_scatter(map, tiles.data_ptr(), blocks, int(t),
                                         c10::cuda::getCurrentCUDAStream()));
}

at::Tensor gather_tiles(const at::Tensor& state, const at::Tensor& stream, const at::Tensor& row,
                        const at::Tensor& col, int64_t tile_size, int64_t left, int64_t right, int64_t top,
                        int64_t bottom, const std::string& border, double value) {
  const blockcopy::DenseMap map = dense_map(state);
  const blockcopy::BlockList blocks = block_list(state, stream, row, col);
  const Border mode = parse_border(border);
  const blockcopy::Halo halo = check_halo(map, left, right, top, bottom, mode);
  const int64_t th = tile_size + top + bottom, tw = tile_size + left + right;
  check_tile_size(map, tile_size, th, tw, false);
  at::Tensor out = at::empty({blocks.k, map.c, th, tw}, state.options().memory_format(memory_format(map)));
  const auto fill = fill_pattern(value, state.scalar_type());
  const c10::cuda::CUDAGuard guard(state.device());
  check_launch(blockcopy::launch_gather(map, out.data_ptr(), blocks, int(tile_size), halo, mode, fill.data(),
                                        c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor update_and_gather(at::Tensor state, const at::Tensor& tiles, const at::Tensor& stream,
                             const at::Tensor& row, const at::Tensor& col, const at::Tensor& block_map,
                             int64_t left, int64_t right, int64_t top, int64_t bottom, const std::string& border,
                             double value) {
  const blockcopy::DenseMap map = dense_map(state);
  const blockcopy::BlockList blocks = block_list(state, stream, row, col);
  const int64_t t = tiles.dim() == 4 ? tiles.size(3) : 0;
  check_tiles(tiles, state, map, blocks.k, t);
  const Border mode = parse_border(border);
  const blockcopy::Halo halo = check_halo(map, left, right, top, bottom, mode);
  const int64_t th = t + top + bottom, tw = t + left + right;
  check_tile_size(map, t, th, tw, true);
  BLOCKCOPY_CHECK(block_map.scalar_type() == at::kInt && block_map.device() == state.device() &&
                  block_map.is_contiguous() && block_map.dim() == 3 && block_map.size(0) == map.n &&
                  block_map.size(1) == map.h / t && block_map.size(2) == map.w / t,
              "block_map must be a contiguous int32 (", map.n, ", ", map.h / t, ", ", map.w / t, ") tensor on ",
              state.device(), ", got ", block_map.scalar_type(), " ", block_map.sizes());
  at::Tensor out = at::empty({blocks.k, map.c, th, tw}, state.options().memory_format(memory_format(map)));
  const auto fill = fill_pattern(value, state.scalar_type());
  const c10::cuda::CUDAGuard guard(state.device());
  check_launch(blockcopy::launch_update_gather(map, tiles.data_ptr(), block_map.data_ptr<int32_t>(),
                                               out.data_ptr(), blocks, int(t), halo, mode, fill.data(),
                                               c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blockcopy's CUDA tile kernels (see blockcopy_core/tiles.py for the reference semantics)";
  m.def("scatter_tiles", &scatter_tiles, "Write (K, C, T, T) tiles into their blocks of the state, in place",
        py::arg("state"), py::arg("tiles"), py::arg("stream"), py::arg("row"), py::arg("col"));
  m.def("gather_tiles", &gather_tiles, "Read (K, C, T+top+bottom, T+left+right) tiles with a halo",
        py::arg("state"), py::arg("stream"), py::arg("row"), py::arg("col"), py::arg("tile_size"),
        py::arg("left"), py::arg("right"), py::arg("top"), py::arg("bottom"), py::arg("border"),
        py::arg("value"));
  m.def("update_and_gather", &update_and_gather, "scatter_tiles then gather_tiles in one pass",
        py::arg("state"), py::arg("tiles"), py::arg("stream"), py::arg("row"), py::arg("col"),
        py::arg("block_map"), py::arg("left"), py::arg("right"), py::arg("top"), py::arg("bottom"),
        py::arg("border"), py::arg("value"));
}
