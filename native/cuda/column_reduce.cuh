// Column sums over many rows on the device, in a fixed order: y_k[c] += sum_r f_k(r, c) for K
// outputs at once (a norm's dw and db, a bias's gradient). Shared by ops_backward.cu and
// train_ops.cu; the part size is column_sum_rows_per_part (train_ops.h), so tests can follow the
// order on the host.
//
// One thread per column would walk all the rows of a step (64k for GPT-2 at B x T = 64 x 1024)
// on a few dozen warps, latency-bound. Instead, two passes:
//   1. column_partials_kernel, grid (column tiles of kColTile, row parts): a block of kColTile x
//      kLanes threads; lane j of a column sums rows r0 + j, r0 + j + kLanes, ... of the part, then
//      the block adds the lanes 0..kLanes-1 in order into partials[part][k][c];
//   2. column_finish_kernel: per column the parts in order, then y_k[c] += that total.
// Every sum runs in an order fixed by the shapes alone, not by the GPU (the parts aim at a fixed
// count of blocks): the same bits on every run and every GPU, no atomics.
#pragma once
#include <cuda_runtime.h>

namespace rf::cuda::colsum {

constexpr int kColTile = 32;         // columns per block: one warp reads 128 consecutive bytes per row
constexpr int kLanes = 8;            // row lanes per column: 256 threads per block
constexpr int kMinPartRows = 64;     // rows a part sums at least
constexpr int kTargetBlocks = 1056;  // about 8 blocks per SM on an H100/H200 (132 SMs)

// Rows per part: the parts fill about kTargetBlocks blocks with the column tiles, each part at
// least kMinPartRows rows; a function of the shapes only.
inline int rows_per_part(int rows, int cols) {
  if (rows <= 0) return 1;
  const int tiles = (cols + kColTile - 1) / kColTile;
  int parts = kTargetBlocks / (tiles > 0 ? tiles : 1);
  const int most = (rows + kMinPartRows - 1) / kMinPartRows;
  parts = parts < 1 ? 1 : parts > most ? most : parts;
  return (rows + parts - 1) / parts;
}

inline long scratch_floats(int rows, int cols, int k) {
  const int per = rows_per_part(rows, cols);
  return rows <= 0 || cols <= 0 ? 0 : long((rows + per - 1) / per) * k * cols;
}

// partials [parts, K, cols]; f(r, c, v) writes row r's K terms for column c into v.
template <int K, class F>
__global__ void __launch_bounds__(kColTile* kLanes) column_partials_kernel(float* partials, int rows, int cols, int per, F f) {
  __shared__ float sums[K][kLanes][kColTile];
  const int tx = threadIdx.x % kColTile, lane = threadIdx.x / kColTile;
  const int c = blockIdx.x * kColTile + tx, part = blockIdx.y;
  const int r0 = part * per, r1 = r0 + per < rows ? r0 + per : rows;
  float acc[K];
  for (int k = 0; k < K; ++k) acc[k] = 0.f;
  if (c < cols)
#pragma unroll 4
    for (int r = r0 + lane; r < r1; r += kLanes) {
      float v[K];
      f(r, c, v);
      for (int k = 0; k < K; ++k) acc[k] += v[k];
    }
  for (int k = 0; k < K; ++k) sums[k][lane][tx] = acc[k];
  __syncthreads();
  if (lane == 0 && c < cols)
    for (int k = 0; k < K; ++k) {
      float t = sums[k][0][tx];
      for (int j = 1; j < kLanes; ++j) t += sums[k][j][tx];
      partials[(long(part) * K + k) * cols + c] = t;
    }
}

// y_k[c] += sum over parts in order (y_k null: not wanted).
template <int K>
__global__ void column_finish_kernel(float* y0, float* y1, const float* partials, int parts, int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int k = 0; k < K; ++k) {
    float* y = k == 0 ? y0 : y1;
    if (!y) continue;
    float t = partials[long(k) * cols + c];
    for (int p = 1; p < parts; ++p) t += partials[(long(p) * K + k) * cols + c];
    y[c] += t;
  }
}

// Both passes; partials: scratch_floats(rows, cols, K) floats.
template <int K, class F>
void column_sums(float* y0, float* y1, int rows, int cols, float* partials, F f, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  const int per = rows_per_part(rows, cols), parts = (rows + per - 1) / per;
  column_partials_kernel<K><<<dim3((cols + kColTile - 1) / kColTile, parts), kColTile * kLanes, 0, stream>>>(partials, rows, cols, per, f);
  column_finish_kernel<K><<<(cols + 255) / 256, 256, 0, stream>>>(y0, y1, partials, parts, cols);
}

}  // namespace rf::cuda::colsum
