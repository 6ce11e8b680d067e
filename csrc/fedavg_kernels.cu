// Flat-buffer FedAvg on CUDA: a grid over columns, each thread sums its columns over the K rows.
// (Named fedavg_kernels.cu, not fedavg_cuda.cu: setuptools names objects after the source stem,
// so fedavg_cuda.cu and the binding fedavg_cuda.cpp would both become fedavg_cuda.o.)
//
// Only the CUDA runtime is included (no torch headers) so nvcc compiles this in seconds; the
// torch binding is fedavg_cuda.cpp. Same contract and numerics as csrc/fedavg.cpp: acc = w0*x0,
// then acc = acc + wk*xk in row order, every product and sum rounded separately, one thread per
// column: deterministic, no atomics, and bit-identical to the CPU kernel and the authors' per-key
// loop. The products and sums are written as PTX mul.rn.f32 / add.rn.f32: an explicit rounding
// modifier keeps ptxas from fusing them into FMA, and without .ftz they keep denormals even
// though the extension is compiled with --use_fast_math (which would make __fmul_rn flush them).
//
// Bandwidth: wide rows (P >= kVecMinP) use 16-byte loads (float4, or 4 x bf16 in 8 bytes) when
// pointers and the row stride are aligned; the K loop is unrolled so several rows' loads are in
// flight per thread. Narrow rows use one column per thread so that enough threads exist to cover
// the GPU (P = 107k columns -> 420 blocks of 256).
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kVecMinP = int64_t(1) << 20;

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h) { return __uint_as_float(h << 16); }

// Round to nearest even, NaN -> 0x7FC0 (the same bits as c10::BFloat16 on the CPU).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t(0x7fc0);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load1(const uint16_t* p) { return bf16_bits_to_f32(__ldg(p)); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(uint16_t* p, float v) { *p = f32_to_bf16_bits(v); }

__device__ __forceinline__ float4 load4(const float* p) {
  return __ldg(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ float4 load4(const uint16_t* p) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  return make_float4(bf16_bits_to_f32(v.x & 0xffffu), bf16_bits_to_f32(v.x >> 16),
                     bf16_bits_to_f32(v.y & 0xffffu), bf16_bits_to_f32(v.y >> 16));
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(uint16_t* p, float4 v) {
  uint2 u;
  u.x = uint32_t(f32_to_bf16_bits(v.x)) | (uint32_t(f32_to_bf16_bits(v.y)) << 16);
  u.y = uint32_t(f32_to_bf16_bits(v.z)) | (uint32_t(f32_to_bf16_bits(v.w)) << 16);
  *reinterpret_cast<uint2*>(p) = u;
}

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float axpy(float acc, float w, float x) { return add_rn(acc, mul_rn(w, x)); }

// Columns [begin, P), one per thread.
template <typename T, bool kBroadcast>
__global__ void fedavg_scalar_kernel(T* buf, int64_t K, int64_t P, int64_t ld, int64_t begin,
                                     const float* __restrict__ w, float* __restrict__ out) {
  const int64_t j = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= P) return;
  const T* col = buf + j;
  float acc = mul_rn(__ldg(w), load1(col));
#pragma unroll 8
  for (int64_t k = 1; k < K; ++k) acc = axpy(acc, __ldg(w + k), load1(col + k * ld));
  out[j] = acc;
  if (kBroadcast) {
    for (int64_t k = 0; k < K; ++k) store1(buf + k * ld + j, acc);
  }
}

// Columns [0, 4 * n4), four per thread; buf, out and ld are aligned for 4-wide accesses.
template <typename T, bool kBroadcast>
__global__ void fedavg_vec4_kernel(T* buf, int64_t K, int64_t n4, int64_t ld,
                                   const float* __restrict__ w, float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const int64_t j = 4 * i;
  const T* col = buf + j;
  const float w0 = __ldg(w);
  float4 x = load4(col);
  float4 acc = make_float4(mul_rn(w0, x.x), mul_rn(w0, x.y), mul_rn(w0, x.z), mul_rn(w0, x.w));
#pragma unroll 4
  for (int64_t k = 1; k < K; ++k) {
    const float wk = __ldg(w + k);
    x = load4(col + k * ld);
    acc.x = axpy(acc.x, wk, x.x);
    acc.y = axpy(acc.y, wk, x.y);
    acc.z = axpy(acc.z, wk, x.z);
    acc.w = axpy(acc.w, wk, x.w);
  }
  store4(out + j, acc);
  if (kBroadcast) {
    for (int64_t k = 0; k < K; ++k) store4(buf + k * ld + j, acc);
  }
}

template <typename T, bool kBroadcast>
cudaError_t launch(T* buf, int64_t K, int64_t P, int64_t ld, const float* w, float* out,
                   cudaStream_t stream) {
  if (P == 0) return cudaSuccess;
  const bool aligned = reinterpret_cast<uintptr_t>(buf) % (4 * sizeof(T)) == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0 && (K == 1 || ld % 4 == 0);
  int64_t begin = 0;
  if (aligned && P >= kVecMinP) {
    const int64_t n4 = P / 4;
    const int64_t blocks = (n4 + kThreads - 1) / kThreads;
    fedavg_vec4_kernel<T, kBroadcast><<<unsigned(blocks), kThreads, 0, stream>>>(buf, K, n4, ld, w, out);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    begin = 4 * n4;
  }
  const int64_t rest = P - begin;
  if (rest > 0) {
    const int64_t blocks = (rest + kThreads - 1) / kThreads;
    fedavg_scalar_kernel<T, kBroadcast><<<unsigned(blocks), kThreads, 0, stream>>>(
        buf, K, P, ld, begin, w, out);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

// buf: [K, P] (row stride ld elements) float32 (is_bf16 = false) or bf16 bits (is_bf16 = true);
// w: [K] float32 and out: [P] float32, all on the current device. broadcast: also write the
// average into every row of buf. Launched on `stream`; returns the launch error, if any.
cudaError_t fsl_fast_fedavg_cuda_launch(void* buf, bool is_bf16, int64_t K, int64_t P, int64_t ld,
                                        const float* w, float* out, bool broadcast,
                                        cudaStream_t stream) {
  if (is_bf16) {
    auto* b = static_cast<uint16_t*>(buf);
    return broadcast ? launch<uint16_t, true>(b, K, P, ld, w, out, stream)
                     : launch<uint16_t, false>(b, K, P, ld, w, out, stream);
  }
  auto* b = static_cast<float*>(buf);
  return broadcast ? launch<float, true>(b, K, P, ld, w, out, stream)
                   : launch<float, false>(b, K, P, ld, w, out, stream);
}
