// blockcopy's tile kernels: scatter (K, C, t, t) tiles into a dense (N, C, H, W) map, gather them back
// grown by a halo, and both in one pass. The kernels only copy bytes, so one kernel serves every dtype.
//
// Memory order. A map is NCHW ("planar") or channels_last; tiles use the map's order. Both are seen as
// (N, Cp, H, W) pixels of `pv` vectors of `Vec` (2 to 16 bytes): planar has Cp = C and one element a
// pixel, channels_last Cp = 1 and C elements a pixel. The vector is the widest that divides the unit
// that stays contiguous in both tensors and that every base pointer is aligned to: a pixel for gathers
// (channels_last with C * elem_bytes % 16 == 0 gives 16-byte accesses), a whole tile row for scatters
// and halo-free gathers (t * C * elem_bytes bytes, channels_last; t * elem_bytes, planar).
//
// Launch. blockIdx.x is the tile, blockIdx.y * 256 + threadIdx.x a vector of it; consecutive threads
// touch consecutive vectors of a tile, so accesses coalesce along tile rows in both tensors.
#undef NDEBUG  // keep the device-side check of tile indices
#include <cassert>
#include <cstring>

#include "tiles.h"

namespace blockcopy {
namespace {

constexpr int kThreads = 256;

// Division by a divisor fixed at launch, as multiply-high, add and shift (Granlund and Montgomery's
// round-up method); exact for numerators below 2^31, which the launchers guarantee.
struct FastDiv {
  uint32_t d, m, s;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor), s(0) {
    while ((uint64_t(1) << s) < divisor) ++s;
    m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << s) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t x) const { return (__umulhi(x, m) + x) >> s; }
};

// Splits x into x / d (returned) and x % d (in `rem`).
__device__ __forceinline__ uint32_t divmod(const FastDiv& f, uint32_t x, uint32_t& rem) {
  const uint32_t q = f.div(x);
  rem = x - q * f.d;
  return q;
}

struct Block {
  int64_t n, row, col;
};

// Block of tile k; an index outside the map's (N, gh, gw) blocks stops the kernel with a device-side
// assert (as PyTorch's indexing kernels do) instead of touching memory outside the tensors.
__device__ __forceinline__ Block load_block(const BlockList& b, int64_t k, int64_t n, int64_t gh,
                                            int64_t gw) {
  const Block blk{b.stream[k * b.ss], b.row[k * b.rs], b.col[k * b.cs]};
  assert(blk.n >= 0 && blk.n < n && blk.row >= 0 && blk.row < gh && blk.col >= 0 && blk.col < gw);
  return blk;
}

// Image coordinate that padded coordinate i reads along an axis of `size` pixels, -1 for the fill.
__device__ __forceinline__ int source(int i, int size, int border) {
  if (i >= 0 && i < size) return i;
  switch (border) {
    case kReplicate: return i < 0 ? 0 : size - 1;
    case kReflect: return i < 0 ? -i : 2 * (size - 1) - i;
    case kCircular: return i < 0 ? i + size : i - size;
    default: return -1;
  }
}

// The first sizeof(Vec) bytes of the 16-byte fill pattern.
__device__ __forceinline__ void take(const uint4& f, uint4& v) { v = f; }
__device__ __forceinline__ void take(const uint4& f, uint2& v) { v = make_uint2(f.x, f.y); }
__device__ __forceinline__ void take(const uint4& f, uint32_t& v) { v = f.x; }
__device__ __forceinline__ void take(const uint4& f, uint16_t& v) { v = uint16_t(f.x); }

// Whole tile rows between map and tiles: a row of tile k is `row_vecs` vectors at map offset
// ((((n * Cp + c) * H + row * t + y) * gw + col) * row_vecs in both orders.
struct RowArgs {
  BlockList blocks;
  int64_t n, cp, h, gh, gw;
  uint32_t tile_vecs;
  FastDiv row_vecs, t;
};

template <typename Vec, bool kToMap>
__global__ void __launch_bounds__(kThreads) copy_rows_kernel(const Vec* __restrict__ src,
                                                             Vec* __restrict__ dst, RowArgs a) {
  const uint32_t i = blockIdx.y * kThreads + threadIdx.x;
  if (i >= a.tile_vecs) return;
  const int64_t k = blockIdx.x;
  const Block b = load_block(a.blocks, k, a.n, a.gh, a.gw);
  uint32_t j, y;
  const uint32_t c = divmod(a.t, divmod(a.row_vecs, i, j), y);  // 0 when channels_last (Cp = 1)
  const int64_t on_map =
      (((b.n * a.cp + c) * a.h + b.row * a.t.d + y) * a.gw + b.col) * a.row_vecs.d + j;
  const int64_t on_tiles = k * a.tile_vecs + i;
  dst[kToMap ? on_map : on_tiles] = src[kToMap ? on_tiles : on_map];
}

// Tiles grown by a halo: output vector i of tile k is pixel (y, x) of the grown tile, vector v.
struct GatherArgs {
  BlockList blocks;
  int64_t n, cp;
  int h, w, t, gh, gw, left, top, border;
  uint32_t tile_vecs;
  FastDiv pv, tw, th, tdiv;
  uint4 fill;
};

struct GrownPixel {
  uint32_t c, y, x, v;  // c is 0 when channels_last (Cp = 1)
  __device__ __forceinline__ GrownPixel(const GatherArgs& a, uint32_t i) {
    c = divmod(a.th, divmod(a.tw, divmod(a.pv, i, v), x), y);
  }
};

template <typename Vec>
__global__ void __launch_bounds__(kThreads) gather_kernel(const Vec* __restrict__ map,
                                                          Vec* __restrict__ out, GatherArgs a) {
  const uint32_t i = blockIdx.y * kThreads + threadIdx.x;
  if (i >= a.tile_vecs) return;
  const int64_t k = blockIdx.x;
  const Block b = load_block(a.blocks, k, a.n, a.gh, a.gw);
  const GrownPixel p(a, i);
  const int sy = source(int(b.row) * a.t - a.top + int(p.y), a.h, a.border);
  const int sx = source(int(b.col) * a.t - a.left + int(p.x), a.w, a.border);
  Vec val;
  if (sy >= 0 && sx >= 0) {
    val = map[(((b.n * a.cp + p.c) * a.h + sy) * a.w + sx) * a.pv.d + p.v];
  } else {
    take(a.fill, val);
  }
  out[k * a.tile_vecs + i] = val;
}

// Scatter and gather in one pass. The interior of grown tile k is tile k itself, also written to the
// map; a halo pixel comes from the tile of its block when that block is executed (block_map >= 0),
// else from the map, which this launch writes only inside executed blocks: no pixel is both read and
// written, so no ordering between thread blocks is needed.
template <typename Vec>
__global__ void __launch_bounds__(kThreads) update_gather_kernel(Vec* __restrict__ map,
                                                                 const Vec* __restrict__ tiles,
                                                                 const int32_t* __restrict__ block_map,
                                                                 Vec* __restrict__ out, GatherArgs a) {
  const uint32_t i = blockIdx.y * kThreads + threadIdx.x;
  if (i >= a.tile_vecs) return;
  const int64_t k = blockIdx.x;
  const Block b = load_block(a.blocks, k, a.n, a.gh, a.gw);
  const GrownPixel p(a, i);
  const int64_t t = a.t, pv = a.pv.d;
  const int ty = int(p.y) - a.top, tx = int(p.x) - a.left;
  Vec val;
  if (ty >= 0 && ty < a.t && tx >= 0 && tx < a.t) {
    val = tiles[(((k * a.cp + p.c) * t + ty) * t + tx) * pv + p.v];
    map[(((b.n * a.cp + p.c) * a.h + b.row * t + ty) * a.w + b.col * t + tx) * pv + p.v] = val;
  } else {
    const int sy = source(int(b.row) * a.t + ty, a.h, a.border);
    const int sx = source(int(b.col) * a.t + tx, a.w, a.border);
    if (sy >= 0 && sx >= 0) {
      const uint32_t by = a.tdiv.div(sy), bx = a.tdiv.div(sx);
      const int32_t owner = block_map[(b.n * a.gh + by) * a.gw + bx];
      val = owner >= 0
                ? tiles[(((int64_t(owner) * a.cp + p.c) * t + (sy - by * t)) * t + (sx - bx * t)) * pv + p.v]
                : map[(((b.n * a.cp + p.c) * a.h + sy) * a.w + sx) * pv + p.v];
    } else {
      take(a.fill, val);
    }
  }
  out[k * a.tile_vecs + i] = val;
}

// Widest access (16, 8, 4 or 2 bytes) dividing `unit_bytes` that all pointers are aligned to.
int vector_bytes(int64_t unit_bytes, std::initializer_list<const void*> ptrs) {
  for (int v = 16; v > 2; v /= 2) {
    bool ok = unit_bytes % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % v == 0;
    if (ok) return v;
  }
  return 2;
}

// Calls f(Vec{}) with the vector type of `bytes` bytes.
template <typename F>
cudaError_t with_vector(int bytes, F&& f) {
  switch (bytes) {
    case 16: return f(uint4{});
    case 8: return f(uint2{});
    case 4: return f(uint32_t{});
    default: return f(uint16_t{});
  }
}

dim3 grid_of(int64_t k, uint32_t tile_vecs) { return dim3(unsigned(k), (tile_vecs + kThreads - 1) / kThreads); }

cudaError_t copy_rows(DenseMap map, const void* tiles_in, void* tiles_out, BlockList blocks, int t,
                      cudaStream_t stream) {
  const int64_t pixel = map.planar ? map.elem_bytes : map.c * map.elem_bytes;
  const void* tiles = tiles_in ? tiles_in : tiles_out;
  const int v = vector_bytes(t * pixel, {map.data, tiles});
  RowArgs a{blocks, map.n, map.planar ? map.c : 1, map.h, map.h / t, map.w / t, 0,
            FastDiv(uint32_t(t * pixel / v)), FastDiv(uint32_t(t))};
  a.tile_vecs = uint32_t((map.planar ? map.c : 1) * t * a.row_vecs.d);
  const dim3 grid = grid_of(blocks.k, a.tile_vecs);
  return with_vector(v, [&](auto tag) {
    using Vec = decltype(tag);
    const Vec* src = static_cast<const Vec*>(tiles_in ? tiles_in : map.data);
    Vec* dst = static_cast<Vec*>(tiles_in ? map.data : tiles_out);
    if (tiles_in) copy_rows_kernel<Vec, true><<<grid, kThreads, 0, stream>>>(src, dst, a);
    else copy_rows_kernel<Vec, false><<<grid, kThreads, 0, stream>>>(src, dst, a);
    return cudaGetLastError();
  });
}

GatherArgs gather_args(DenseMap map, BlockList blocks, int t, Halo halo, Border border, const void* fill,
                       int v) {
  const int th = t + halo.top + halo.bottom, tw = t + halo.left + halo.right;
  const int64_t cp = map.planar ? map.c : 1;
  const int64_t pv = (map.planar ? 1 : map.c) * map.elem_bytes / v;
  GatherArgs a{blocks, map.n, cp, int(map.h), int(map.w), t, int(map.h / t), int(map.w / t), halo.left,
               halo.top, int(border), uint32_t(cp * th * tw * pv), FastDiv(uint32_t(pv)),
               FastDiv(uint32_t(tw)), FastDiv(uint32_t(th)), FastDiv(uint32_t(t)), uint4{}};
  std::memcpy(&a.fill, fill, sizeof(uint4));
  return a;
}

}  // namespace

cudaError_t launch_scatter(DenseMap map, const void* tiles, BlockList blocks, int t, cudaStream_t stream) {
  if (blocks.k == 0) return cudaSuccess;
  return copy_rows(map, tiles, nullptr, blocks, t, stream);
}

cudaError_t launch_gather(DenseMap map, void* out, BlockList blocks, int t, Halo halo, Border border,
                          const void* fill, cudaStream_t stream) {
  if (blocks.k == 0) return cudaSuccess;
  const bool no_halo = halo.left == 0 && halo.right == 0 && halo.top == 0 && halo.bottom == 0;
  if (no_halo && map.h % t == 0 && map.w % t == 0) return copy_rows(map, nullptr, out, blocks, t, stream);
  const int v = vector_bytes((map.planar ? 1 : map.c) * map.elem_bytes, {map.data, out});
  const GatherArgs a = gather_args(map, blocks, t, halo, border, fill, v);
  const dim3 grid = grid_of(blocks.k, a.tile_vecs);
  return with_vector(v, [&](auto tag) {
    using Vec = decltype(tag);
    const Vec* src = static_cast<const Vec*>(map.data);
    gather_kernel<Vec><<<grid, kThreads, 0, stream>>>(src, static_cast<Vec*>(out), a);
    return cudaGetLastError();
  });
}

cudaError_t launch_update_gather(DenseMap map, const void* tiles, const int32_t* block_map, void* out,
                                 BlockList blocks, int t, Halo halo, Border border, const void* fill,
                                 cudaStream_t stream) {
  if (blocks.k == 0) return cudaSuccess;
  const int v = vector_bytes((map.planar ? 1 : map.c) * map.elem_bytes, {map.data, tiles, out});
  const GatherArgs a = gather_args(map, blocks, t, halo, border, fill, v);
  const dim3 grid = grid_of(blocks.k, a.tile_vecs);
  return with_vector(v, [&](auto tag) {
    using Vec = decltype(tag);
    Vec* m = static_cast<Vec*>(map.data);
    const Vec* in = static_cast<const Vec*>(tiles);
    Vec* o = static_cast<Vec*>(out);
    update_gather_kernel<Vec><<<grid, kThreads, 0, stream>>>(m, in, block_map, o, a);
    return cudaGetLastError();
  });
}

}  // namespace blockcopy
