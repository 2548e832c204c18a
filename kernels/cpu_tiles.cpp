// CPU tile moves: copy windows between a dense (N, C, H, W) state and a (K, C, h, w) tile batch, one row
// (memcpy) at a time. The pure-PyTorch path issues a Python-level copy per tile and layer (thousands per
// frame), whose dispatch costs as much as the copies; here a call moves every tile of a layer.
// States and tiles are contiguous in the same memory order, NCHW or channels_last (NHWC); in channels_last
// a window row is one contiguous run of w * C elements.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>

namespace {

struct Layout {
  int64_t channels, height, width;
  bool nhwc;
};

// Copy `count` pixels (each `pixel` elements) from `src` to `dst`, or fill them with `value` if src is null.
template <typename T>
inline void put(T* dst, const T* src, int64_t count, int64_t pixel, T value) {
  if (count <= 0) return;
  if (src != nullptr) {
    std::memcpy(dst, src, sizeof(T) * count * pixel);
  } else {
    std::fill(dst, dst + count * pixel, value);
  }
}

// One output row: `w` pixels of state row `row` (a pointer to its first pixel, or null: outside the image
// with a constant border) starting at column x0; columns outside the image are filled or replicated.
template <typename T>
inline void window_row(T* dst, const T* row, int64_t x0, int64_t w, int64_t width, int64_t pixel, bool replicate,
                       T value) {
  if (row == nullptr) {
    put<T>(dst, nullptr, w, pixel, value);
    return;
  }
  const int64_t lo = std::min(std::max<int64_t>(-x0, 0), w);
  const int64_t hi = std::max(std::min(width - x0, w), lo);
  for (int64_t x = 0; x < lo; ++x) put<T>(dst + x * pixel, replicate ? row : nullptr, 1, pixel, value);
  put<T>(dst + lo * pixel, row + (x0 + lo) * pixel, hi - lo, pixel, value);
  for (int64_t x = hi; x < w; ++x)
    put<T>(dst + x * pixel, replicate ? row + (width - 1) * pixel : nullptr, 1, pixel, value);
}

// Tile k's window starts at (row[k] * tile - top, col[k] * tile - left) of stream stream[k].
struct Windows {
  at::TensorAccessor<int64_t, 1> stream, row, col;
  int64_t tile, top, left;
  int64_t y0(int64_t k) const { return row[k] * tile - top; }
  int64_t x0(int64_t k) const { return col[k] * tile - left; }
};

template <typename T>
void gather(const at::Tensor& state, at::Tensor& out, const Windows& win, int64_t h, int64_t w, int64_t out_y,
            int64_t out_x, bool replicate, T value, const Layout& s) {
  const T* base = state.data_ptr<T>();
  T* out_base = out.data_ptr<T>();
  const int64_t K = out.size(0), out_h = out.size(2), out_w = out.size(3);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = win.stream[k], y0 = win.y0(k), x0 = win.x0(k);
      // NCHW: one channel plane after the other, so that consecutive rows are near in memory
      for (int64_t c = 0; c < (s.nhwc ? 1 : s.channels); ++c) {
        for (int64_t yy = 0; yy < h; ++yy) {
          int64_t y = y0 + yy;
          const bool inside = y >= 0 && y < s.height;
          if (!inside && replicate) y = std::min(std::max<int64_t>(y, 0), s.height - 1);
          const bool have_row = inside || replicate;
          if (s.nhwc) {
            const T* row = have_row ? base + (n * s.height + y) * s.width * s.channels : nullptr;
            T* dst = out_base + ((k * out_h + out_y + yy) * out_w + out_x) * s.channels;
            window_row<T>(dst, row, x0, w, s.width, s.channels, replicate, value);
          } else {
            const T* row = have_row ? base + ((n * s.channels + c) * s.height + y) * s.width : nullptr;
            T* dst = out_base + ((k * s.channels + c) * out_h + out_y + yy) * out_w + out_x;
            window_row<T>(dst, row, x0, w, s.width, 1, replicate, value);
          }
        }
      }
    }
  });
}

template <typename T>
void scatter(at::Tensor& state, const at::Tensor& tiles, const Windows& win, const Layout& s) {
  T* base = state.data_ptr<T>();
  const T* tile_base = tiles.data_ptr<T>();
  const int64_t K = tiles.size(0), h = tiles.size(2), w = tiles.size(3);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = win.stream[k], y0 = win.y0(k), x0 = win.x0(k);
      for (int64_t c = 0; c < (s.nhwc ? 1 : s.channels); ++c) {
        for (int64_t yy = 0; yy < h; ++yy) {
          if (s.nhwc) {
            std::memcpy(base + ((n * s.height + y0 + yy) * s.width + x0) * s.channels,
                        tile_base + (k * h + yy) * w * s.channels, sizeof(T) * w * s.channels);
          } else {
            std::memcpy(base + ((n * s.channels + c) * s.height + y0 + yy) * s.width + x0,
                        tile_base + ((k * s.channels + c) * h + yy) * w, sizeof(T) * w);
          }
        }
      }
    }
  });
}

// scatter, then gather of the same blocks with a halo, reading each tile once: its rows go to the state and
// to the interior of its grown copy in one pass; the halo ring is read from the state after every tile of
// the batch is in it (a ring pixel may lie in another executed block).
template <typename T>
void update_gather(at::Tensor& state, const at::Tensor& tiles, at::Tensor& out, const Windows& win, int64_t right,
                   bool replicate, T value, const Layout& s) {
  T* base = state.data_ptr<T>();
  const T* tile_base = tiles.data_ptr<T>();
  T* out_base = out.data_ptr<T>();
  const int64_t K = tiles.size(0), t = tiles.size(2), out_h = out.size(2), out_w = out.size(3);
  const int64_t top = win.top, left = win.left, planes = s.nhwc ? 1 : s.channels, pixel = s.nhwc ? s.channels : 1;
  // element offsets of row y of stream n (channel c in NCHW), of tile k's row yy, of out k's row yy
  auto state_row = [&](int64_t n, int64_t c, int64_t y) {
    return s.nhwc ? (n * s.height + y) * s.width * s.channels : ((n * s.channels + c) * s.height + y) * s.width;
  };
  auto tile_row = [&](int64_t k, int64_t c, int64_t yy) { return ((k * planes + c) * t + yy) * t * pixel; };
  auto out_row = [&](int64_t k, int64_t c, int64_t yy) { return ((k * planes + c) * out_h + yy) * out_w * pixel; };
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = win.stream[k], y = win.row[k] * t, x = win.col[k] * t;
      for (int64_t c = 0; c < planes; ++c) {
        for (int64_t yy = 0; yy < t; ++yy) {
          const T* src = tile_base + tile_row(k, c, yy);
          std::memcpy(base + state_row(n, c, y + yy) + x * pixel, src, sizeof(T) * t * pixel);
          std::memcpy(out_base + out_row(k, c, top + yy) + left * pixel, src, sizeof(T) * t * pixel);
        }
      }
    }
  });
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = win.stream[k], y0 = win.y0(k), x0 = win.x0(k);
      for (int64_t c = 0; c < planes; ++c) {
        for (int64_t yy = 0; yy < out_h; ++yy) {
          int64_t y = y0 + yy;
          const bool inside = y >= 0 && y < s.height;
          if (!inside && replicate) y = std::min(std::max<int64_t>(y, 0), s.height - 1);
          const T* row = inside || replicate ? base + state_row(n, c, y) : nullptr;
          T* dst = out_base + out_row(k, c, yy);
          if (yy < top || yy >= top + t) {
            window_row<T>(dst, row, x0, out_w, s.width, pixel, replicate, value);
          } else {  // an interior row: only its left and right halo
            window_row<T>(dst, row, x0, left, s.width, pixel, replicate, value);
            window_row<T>(dst + (left + t) * pixel, row, x0 + left + t, right, s.width, pixel, replicate, value);
          }
        }
      }
    }
  });
}

Layout layout_of(const at::Tensor& state, const at::Tensor& tiles) {
  TORCH_CHECK(state.device().is_cpu() && tiles.device().is_cpu(), "blockcopy CPU tile kernels: CPU tensors only");
  TORCH_CHECK(state.dim() == 4 && tiles.dim() == 4, "blockcopy CPU tile kernels: 4-d state and tiles");
  TORCH_CHECK(state.scalar_type() == tiles.scalar_type(), "blockcopy CPU tile kernels: state and tiles differ in dtype");
  const bool nhwc = !state.is_contiguous() && state.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(state.is_contiguous(format) && tiles.is_contiguous(format),
              "blockcopy CPU tile kernels: state and tiles must be contiguous in the same memory format");
  TORCH_CHECK(state.size(1) == tiles.size(1), "blockcopy CPU tile kernels: channel counts differ");
  return {state.size(1), state.size(2), state.size(3), nhwc};
}

Windows windows_of(const at::Tensor& stream, const at::Tensor& row, const at::Tensor& col, int64_t K, int64_t tile,
                   int64_t top, int64_t left) {
  for (const auto* t : {&stream, &row, &col}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == K,
                "blockcopy CPU tile kernels: the tile index must be (K,) int64 CPU tensors");
  }
  return {stream.accessor<int64_t, 1>(), row.accessor<int64_t, 1>(), col.accessor<int64_t, 1>(), tile, top, left};
}

}  // namespace

// out[k, :, out_y:out_y+h, out_x:out_x+w] = the h x w window of state[stream[k]] at (row[k]*tile - top,
// col[k]*tile - left), outside the image the border pixel (replicate) or `value`. The caller checks that
// the index holds blocks of the state's grid.
void gather_windows(const at::Tensor& state, at::Tensor out, const at::Tensor& stream, const at::Tensor& row,
                    const at::Tensor& col, int64_t tile, int64_t top, int64_t left, int64_t h, int64_t w,
                    int64_t out_y, int64_t out_x, bool replicate, double value) {
  const Layout s = layout_of(state, out);
  const Windows win = windows_of(stream, row, col, out.size(0), tile, top, left);
  TORCH_CHECK(out_y >= 0 && out_x >= 0 && out_y + h <= out.size(2) && out_x + w <= out.size(3),
              "blockcopy CPU tile kernels: window outside the output");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(), "gather_windows", [&] {
    gather<scalar_t>(state, out, win, h, w, out_y, out_x, replicate, static_cast<scalar_t>(value), s);
  });
}

// state[stream[k], :, row[k]*T:(row[k]+1)*T, col[k]*T:(col[k]+1)*T] = tiles[k], T the tiles' size.
void scatter_windows(at::Tensor state, const at::Tensor& tiles, const at::Tensor& stream, const at::Tensor& row,
                     const at::Tensor& col) {
  const Layout s = layout_of(state, tiles);
  TORCH_CHECK(tiles.size(2) == tiles.size(3), "blockcopy CPU tile kernels: square tiles");
  const Windows win = windows_of(stream, row, col, tiles.size(0), tiles.size(2), 0, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(), "scatter_windows", [&] {
    scatter<scalar_t>(state, tiles, win, s);
  });
}

// scatter_windows(state, tiles, ...), then out = gather_windows of the same blocks grown by (left, right, top,
// bottom): out is (K, C, T + top + bottom, T + left + right).
void update_gather_windows(at::Tensor state, const at::Tensor& tiles, at::Tensor out, const at::Tensor& stream,
                           const at::Tensor& row, const at::Tensor& col, int64_t left, int64_t right, int64_t top,
                           int64_t bottom, bool replicate, double value) {
  const Layout s = layout_of(state, tiles);
  layout_of(state, out);
  TORCH_CHECK(tiles.size(2) == tiles.size(3), "blockcopy CPU tile kernels: square tiles");
  const int64_t t = tiles.size(2);
  TORCH_CHECK(out.size(0) == tiles.size(0) && out.size(2) == t + top + bottom && out.size(3) == t + left + right,
              "blockcopy CPU tile kernels: the output must hold the tiles grown by the halo");
  const Windows win = windows_of(stream, row, col, tiles.size(0), t, top, left);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(), "update_gather_windows", [&] {
    update_gather<scalar_t>(state, tiles, out, win, right, replicate, static_cast<scalar_t>(value), s);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_windows", &gather_windows, "gather (K, C, h, w) windows of a dense state (CPU)");
  m.def("scatter_windows", &scatter_windows, "write (K, C, T, T) tiles into a dense state (CPU)");
  m.def("update_gather_windows", &update_gather_windows,
        "write tiles into a dense state and gather them grown by a halo, in one pass over the tiles (CPU)");
}
