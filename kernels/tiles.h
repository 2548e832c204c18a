// Launchers of blockcopy's tile kernels (kernels/tiles.cu). Plain CUDA: no PyTorch headers, so the
// kernels compile in seconds; kernels/bindings.cpp checks tensors and calls these.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace blockcopy {

// How gathered pixels outside the image are filled (F.pad's modes).
enum Border : int { kConstant = 0, kReplicate = 1, kReflect = 2, kCircular = 3 };

// A dense (N, C, H, W) map: NCHW-contiguous when `planar`, else channels_last-contiguous.
// Tile batches (K, C, t, t) that go with it use the same memory order.
struct DenseMap {
  void* data;
  int64_t n, c, h, w;
  int elem_bytes;  // 2, 4 or 8
  bool planar;
};

// K executed blocks: tile k covers block (stream[k * ss], row[k * rs], col[k * cs]), device int64
// arrays read with element strides ss, rs, cs (the columns of a nonzero() result need no copy).
struct BlockList {
  const int64_t* stream;
  const int64_t* row;
  const int64_t* col;
  int64_t ss, rs, cs;
  int64_t k;
};

struct Halo {
  int left, right, top, bottom;
};

// Write (K, C, t, t) `tiles` into their blocks of `map` (H and W multiples of t).
cudaError_t launch_scatter(DenseMap map, const void* tiles, BlockList blocks, int t, cudaStream_t stream);

// Read the blocks of `map` grown by `halo` into `out`, (K, C, t+top+bottom, t+left+right); pixels
// outside the image follow `border`; `fill` is the constant-border element's bit pattern repeated
// over 16 bytes.
cudaError_t launch_gather(DenseMap map, void* out, BlockList blocks, int t, Halo halo, Border border,
                          const void* fill, cudaStream_t stream);

// launch_scatter then launch_gather in one pass: the halo comes from `tiles` where the neighbouring
// block is executed (block_map (N, H/t, W/t) int32 holds its tile number, -1 where not executed) and
// from `map` elsewhere, while the tile interiors are written to `map`.
cudaError_t launch_update_gather(DenseMap map, const void* tiles, const int32_t* block_map, void* out,
                                 BlockList blocks, int t, Halo halo, Border border, const void* fill,
                                 cudaStream_t stream);

}  // namespace blockcopy
