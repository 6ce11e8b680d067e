// Per-row top-k selection of the top-k codec, CUDA kernel (contract: fsl_fast/ops/topk.py; the
// CPU kernel is csrc/topk.cpp). CUDA runtime and CUB only: the torch binding is
// csrc/topk_cuda.cpp, which validates tensors and reports non-finite rows.
//
// One 256-thread block per row (grid-stride over rows), on the float32 bit patterns with the
// sign cleared, whose integer order is the order of the magnitudes for finite values:
//   1. the largest pattern (block max): a row with a NaN or an infinity is flagged and skipped;
//   2. radix select of the k-th largest pattern, 7 + 8 + 8 + 8 bits from the top: a shared
//      histogram of the digit among the patterns that match the prefix so far, then the digit
//      holding the k-th largest is appended to the prefix; what is left of k after the digits
//      above it is the number of positions equal to the threshold to keep;
//   3. one ordered pass in 256-element tiles: block prefix sums of "above" and "tied" give each
//      kept position its rank, so positions come out ascending, ties to the lower position.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>

namespace fsl_topk {

constexpr int kThreads = 256;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr int64_t kMaxBlocks = 65535;

struct MaxOp {  // (cub::Max is gone from recent CUB)
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a > b ? a : b; }
};

__global__ void __launch_bounds__(kThreads)
    topk_rows_kernel(const float* __restrict__ x, int64_t N, int64_t M, int64_t k,
                     int64_t* __restrict__ index, float* __restrict__ values, int* __restrict__ bad) {
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_need;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(x + row * M);
    uint32_t top = 0;
    for (int64_t j = threadIdx.x; j < M; j += kThreads) top = max(top, bits[j] & 0x7FFFFFFFu);
    top = Reduce(tmp.reduce).Reduce(top, MaxOp());
    if (threadIdx.x == 0) {
      s_prefix = top;  // (only thread 0's aggregate is valid: pass it on through shared memory)
      s_need = k;
    }
    __syncthreads();
    if (s_prefix >= kInfBits) {
      if (threadIdx.x == 0) bad[row] = 1;
      __syncthreads();
      continue;
    }
    __syncthreads();
    if (threadIdx.x == 0) s_prefix = 0;
    uint32_t mask = 0;
    const int shifts[4] = {24, 16, 8, 0};
    const int widths[4] = {7, 8, 8, 8};
    for (int p = 0; p < 4; ++p) {
      const int shift = shifts[p];
      const uint32_t dmask = (1u << widths[p]) - 1u;
      for (int d = threadIdx.x; d < 256; d += kThreads) hist[d] = 0;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      for (int64_t j = threadIdx.x; j < M; j += kThreads) {
        const uint32_t m = bits[j] & 0x7FFFFFFFu;
        if ((m & mask) == prefix) atomicAdd(&hist[(m >> shift) & dmask], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t need = s_need;
        int d = static_cast<int>(dmask);
        while (hist[d] < need) need -= hist[d--];  // some digit holds the k-th largest
        s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
        s_need = need;
      }
      mask |= dmask << shift;
      __syncthreads();
    }
    const uint32_t thr = s_prefix;
    const int64_t ties = s_need;  // positions equal to thr to keep, >= 1
    int64_t kept = 0, tied = 0;
    int64_t* irow = index + row * k;
    float* vrow = values + row * k;
    for (int64_t j0 = 0; j0 < M; j0 += kThreads) {
      const int64_t j = j0 + threadIdx.x;
      const uint32_t m = j < M ? (bits[j] & 0x7FFFFFFFu) : 0u;
      const int tie = j < M && m == thr;
      int tie_before, tie_total;
      Scan(tmp.scan).ExclusiveSum(tie, tie_before, tie_total);
      __syncthreads();
      const int keep = (j < M && m > thr) || (tie && tied + tie_before < ties);
      int pos, keep_total;
      Scan(tmp.scan).ExclusiveSum(keep, pos, keep_total);
      __syncthreads();
      if (keep) {
        irow[kept + pos] = j;
        vrow[kept + pos] = x[row * M + j];
      }
      kept += keep_total;
      tied += tie_total;
    }
    __syncthreads();
  }
}

}  // namespace fsl_topk

// x float32 [N, M] contiguous, 1 <= k <= M, N, M > 0 (validated by the binding); bad int32 [N]
// zeroed by the caller.
cudaError_t fsl_topk_cuda_launch(const float* x, int64_t N, int64_t M, int64_t k, int64_t* index,
                                 float* values, int* bad, cudaStream_t stream) {
  using namespace fsl_topk;
  const dim3 grid(static_cast<unsigned>(N < kMaxBlocks ? N : kMaxBlocks));
  topk_rows_kernel<<<grid, kThreads, 0, stream>>>(x, N, M, k, index, values, bad);
  return cudaGetLastError();
}
