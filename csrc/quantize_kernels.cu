// Uplink activation quantization, CUDA kernels (contract: docs/quantize.md). CUDA runtime only:
// the torch binding is csrc/quantize_cuda.cpp, which validates tensors and passes the stream.
//
// int8 codes are one byte each; int4 packs two per byte (low nibble first), int2 four (element
// 4p + t in bits 2t, 2t + 1 of byte p), and a group never shares a byte.
// Short groups (<= kWarpGroupMax elements, e.g. int4 groups of 32 or narrow rows): one warp per
// group, 8 groups per block. Long groups (per-row int8 of wide rows): one 256-thread block per
// group with 16-byte loads; the second pass re-reads the group, which is then in L2.
// Every float operation that decides a code is an explicitly rounded intrinsic (__fdiv_rn,
// __fmul_rn) so that --use_fast_math (approximate division, FMA contraction) cannot change a
// result; flush-to-zero cannot either (see the 2^-95 zero-group threshold in the contract).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fsl_quantize {

constexpr uint32_t kTinyBits = 0x10000000u;  // float bits of 2^-95
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpGroupMax = 1024;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

// The contract's counter hash: fmix32 without its last xorshift, top 24 bits.
__device__ __forceinline__ int mix24(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return static_cast<int>(h >> 8);
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);
}

// Four consecutive elements from a pointer aligned to 4 * sizeof(T).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void load4(const __half* p, float (&v)[4]) {
  const uint2 t = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&t.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&t.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
  const uint2 t = *reinterpret_cast<const uint2*>(p);
  v[0] = __uint_as_float(t.x << 16);
  v[1] = __uint_as_float(t.x & 0xFFFF0000u);
  v[2] = __uint_as_float(t.y << 16);
  v[3] = __uint_as_float(t.y & 0xFFFF0000u);
}

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ void scale_inv(uint32_t mb, float qmax, float& scale, float& inv) {
  if (mb < kTinyBits) {
    scale = 0.0f;
    inv = 0.0f;
  } else {  // NaN/Inf bit patterns land here and give a non-finite scale (reported by the caller)
    const float a = __uint_as_float(mb);
    scale = __fdiv_rn(a, qmax);
    inv = __fdiv_rn(qmax, a);
  }
}

template <bool STOCH>
__device__ __forceinline__ int code_of(float xv, float inv, int qmax, uint32_t idx, uint32_t key) {
  const float m = __fmul_rn(fabsf(xv), inv);
  const int y = __float2int_rz(__fmul_rn(m, 16777216.0f));  // floor, exact for m >= 0.5
  const int q = y >> 24;
  const int rem = y & 0xFFFFFF;
  int mag;
  if (STOCH) {
    mag = q + ((rem + mix24(idx ^ key)) >> 24);
  } else {
    mag = q + ((rem > 0x800000) | ((rem == 0x800000) & (q & 1)));
  }
  mag = mag < qmax ? mag : qmax;
  return xv < 0.0f ? -mag : mag;
}

__device__ __forceinline__ uint8_t pack4(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

template <int BITS>
__host__ __device__ constexpr int qmax_of() {
  return BITS == 8 ? 127 : BITS == 4 ? 7 : 1;
}

// Byte p of a packed (int4/int2) group of len elements starting at xg, element index ib.
template <typename T, int BITS, bool STOCH>
__device__ __forceinline__ uint8_t packed_byte(const T* xg, int64_t p, int64_t len, float inv,
                                               uint32_t ib, uint32_t key) {
  constexpr int per = 8 / BITS;
  uint32_t byte = 0;
#pragma unroll
  for (int t = 0; t < per; ++t) {
    const int64_t e = per * p + t;
    if (e < len) {
      const int c = code_of<STOCH>(to_f32(xg[e]), inv, qmax_of<BITS>(), ib + static_cast<uint32_t>(e), key);
      byte |= (static_cast<uint32_t>(c) & ((1u << BITS) - 1u)) << (BITS * t);
    }
  }
  return static_cast<uint8_t>(byte);
}

struct Layout {
  int64_t N, M, G, gs, code_cols;
};

// One warp per group.
template <typename T, int BITS, bool STOCH>
__global__ void __launch_bounds__(kThreads)
    quant_warp_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                      float* __restrict__ scales, Layout L, uint32_t key) {
  constexpr int qmax = qmax_of<BITS>();
  const int lane = threadIdx.x & 31;
  const int64_t n_groups = L.N * L.G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); gi < n_groups;
       gi += stride) {
    const int64_t row = gi / L.G;
    const int64_t c0 = (gi - row * L.G) * L.gs;
    const int len = static_cast<int>(min(L.gs, L.M - c0));
    const int64_t base = row * L.M + c0;
    const T* xg = x + base;
    uint32_t mb = 0;
    for (int j = lane; j < len; j += 32) {
      const uint32_t b = abs_bits(to_f32(xg[j]));
      mb = b > mb ? b : mb;
    }
    mb = warp_max(mb);
    float scale, inv;
    scale_inv(mb, static_cast<float>(qmax), scale, inv);
    if (lane == 0) scales[gi] = scale;
    const uint32_t ib = static_cast<uint32_t>(base);
    if (BITS == 8) {
      int8_t* cg = reinterpret_cast<int8_t*>(codes) + base;
      for (int j = lane; j < len; j += 32)
        cg[j] = static_cast<int8_t>(code_of<STOCH>(to_f32(xg[j]), inv, qmax, ib + j, key));
    } else if (BITS == 2) {
      uint8_t* cg = codes + row * L.code_cols + c0 / 4;
      for (int p = lane; p < (len + 3) / 4; p += 32) cg[p] = packed_byte<T, 2, STOCH>(xg, p, len, inv, ib, key);
    } else {
      uint8_t* cg = codes + row * L.code_cols + c0 / 2;
      const int pairs = (len + 1) / 2;
      for (int p = lane; p < pairs; p += 32) {
        const int e = 2 * p;
        const int lo = code_of<STOCH>(to_f32(xg[e]), inv, qmax, ib + e, key);
        const int hi = e + 1 < len ? code_of<STOCH>(to_f32(xg[e + 1]), inv, qmax, ib + e + 1, key)
                                   : 0;
        cg[p] = pack4(lo, hi);
      }
    }
  }
}

// One block per group; 4 elements per thread step through 16-/8-byte loads when aligned. The
// first kCache 4-element vectors of each thread (kCache * 4 * 256 = 8192 elements per group) stay
// in registers between the absmax pass and the code pass, so groups up to that length are read
// from memory once; the rest of a longer group is read again in the code pass (from L2 if it is
// still there).
constexpr int kCache = 8;

template <bool STOCH>
__device__ __forceinline__ void codes4(const float (&f)[4], float inv, int qmax, uint32_t i0,
                                       uint32_t key, int (&c)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) c[k] = code_of<STOCH>(f[k], inv, qmax, i0 + k, key);
}

template <typename T, int BITS, bool STOCH>
__global__ void __launch_bounds__(kThreads)
    quant_block_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                       float* __restrict__ scales, Layout L, uint32_t key) {
  constexpr int qmax = qmax_of<BITS>();
  __shared__ uint32_t red[kWarps];
  const int64_t n_groups = L.N * L.G;
  for (int64_t gi = blockIdx.x; gi < n_groups; gi += gridDim.x) {
    const int64_t row = gi / L.G;
    const int64_t c0 = (gi - row * L.G) * L.gs;
    const int64_t len = min(L.gs, L.M - c0);
    const int64_t base = row * L.M + c0;
    const T* xg = x + base;
    const bool vec = reinterpret_cast<uintptr_t>(xg) % (4 * sizeof(T)) == 0;
    const int64_t nvec = vec ? len / 4 : 0;
    float cache[kCache][4];
    uint32_t mb = 0;
#pragma unroll
    for (int it = 0; it < kCache; ++it) {
      const int64_t v = threadIdx.x + static_cast<int64_t>(it) * kThreads;
      if (v < nvec) {
        load4(xg + 4 * v, cache[it]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t b = abs_bits(cache[it][k]);
          mb = b > mb ? b : mb;
        }
      }
    }
    for (int64_t v = threadIdx.x + static_cast<int64_t>(kCache) * kThreads; v < nvec;
         v += kThreads) {
      float f[4];
      load4(xg + 4 * v, f);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t b = abs_bits(f[k]);
        mb = b > mb ? b : mb;
      }
    }
    for (int64_t j = 4 * nvec + threadIdx.x; j < len; j += kThreads) {
      const uint32_t b = abs_bits(to_f32(xg[j]));
      mb = b > mb ? b : mb;
    }
    mb = warp_max(mb);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mb;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mb = red[w] > mb ? red[w] : mb;
    float scale, inv;
    scale_inv(mb, static_cast<float>(qmax), scale, inv);
    if (threadIdx.x == 0) scales[gi] = scale;
    const uint32_t ib = static_cast<uint32_t>(base);
    if (BITS == 8) {
      int8_t* cg = reinterpret_cast<int8_t*>(codes) + base;
      // 4 codes per 32-bit store when the codes are 4-byte aligned (they are whenever x is
      // 16-byte aligned at the group and the buffer comes from the caching allocator).
      const int64_t nv = reinterpret_cast<uintptr_t>(cg) % 4 == 0 ? nvec : 0;
#pragma unroll
      for (int it = 0; it < kCache; ++it) {
        const int64_t v = threadIdx.x + static_cast<int64_t>(it) * kThreads;
        if (v < nv) {
          int c[4];
          codes4<STOCH>(cache[it], inv, qmax, ib + static_cast<uint32_t>(4 * v), key, c);
          *reinterpret_cast<uint32_t*>(cg + 4 * v) =
              (static_cast<uint32_t>(c[0]) & 0xFFu) | ((static_cast<uint32_t>(c[1]) & 0xFFu) << 8) |
              ((static_cast<uint32_t>(c[2]) & 0xFFu) << 16) | (static_cast<uint32_t>(c[3]) << 24);
        }
      }
      for (int64_t v = threadIdx.x + static_cast<int64_t>(kCache) * kThreads; v < nv;
           v += kThreads) {
        float f[4];
        int c[4];
        load4(xg + 4 * v, f);
        codes4<STOCH>(f, inv, qmax, ib + static_cast<uint32_t>(4 * v), key, c);
        *reinterpret_cast<uint32_t*>(cg + 4 * v) =
            (static_cast<uint32_t>(c[0]) & 0xFFu) | ((static_cast<uint32_t>(c[1]) & 0xFFu) << 8) |
            ((static_cast<uint32_t>(c[2]) & 0xFFu) << 16) | (static_cast<uint32_t>(c[3]) << 24);
      }
      for (int64_t j = 4 * nv + threadIdx.x; j < len; j += kThreads)
        cg[j] = static_cast<int8_t>(
            code_of<STOCH>(to_f32(xg[j]), inv, qmax, ib + static_cast<uint32_t>(j), key));
    } else if (BITS == 2) {  // one byte per thread step, re-reading the group (from L2)
      uint8_t* cg = codes + row * L.code_cols + c0 / 4;  // c0 is a multiple of 4
      for (int64_t p = threadIdx.x; p < (len + 3) / 4; p += kThreads)
        cg[p] = packed_byte<T, 2, STOCH>(xg, p, len, inv, ib, key);
    } else {
      uint8_t* cg = codes + row * L.code_cols + c0 / 2;  // c0 is even (even group size)
#pragma unroll
      for (int it = 0; it < kCache; ++it) {
        const int64_t v = threadIdx.x + static_cast<int64_t>(it) * kThreads;
        if (v < nvec) {
          int c[4];
          codes4<STOCH>(cache[it], inv, qmax, ib + static_cast<uint32_t>(4 * v), key, c);
          cg[2 * v] = pack4(c[0], c[1]);
          cg[2 * v + 1] = pack4(c[2], c[3]);
        }
      }
      for (int64_t v = threadIdx.x + static_cast<int64_t>(kCache) * kThreads; v < nvec;
           v += kThreads) {
        float f[4];
        int c[4];
        load4(xg + 4 * v, f);
        codes4<STOCH>(f, inv, qmax, ib + static_cast<uint32_t>(4 * v), key, c);
        cg[2 * v] = pack4(c[0], c[1]);
        cg[2 * v + 1] = pack4(c[2], c[3]);
      }
      const int64_t pairs = (len + 1) / 2;
      for (int64_t p = 2 * nvec + threadIdx.x; p < pairs; p += kThreads) {
        const int64_t e = 2 * p;
        const uint32_t ie = ib + static_cast<uint32_t>(e);
        const int lo = code_of<STOCH>(to_f32(xg[e]), inv, qmax, ie, key);
        const int hi = e + 1 < len ? code_of<STOCH>(to_f32(xg[e + 1]), inv, qmax, ie + 1, key) : 0;
        cg[p] = pack4(lo, hi);
      }
    }
    __syncthreads();  // red[] is rewritten by the next group
  }
}

__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Rows over grid.y (strided), columns over grid.x (strided); M < 2^31 (checked by the launcher).
template <typename OutT, int BITS>
__global__ void __launch_bounds__(kThreads)
    dequant_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                   OutT* __restrict__ out, Layout L) {
  const uint32_t M = static_cast<uint32_t>(L.M), gs = static_cast<uint32_t>(L.gs);
  for (int64_t row = blockIdx.y; row < L.N; row += gridDim.y) {
    const float* srow = scales + row * L.G;
    OutT* orow = out + row * L.M;
    for (uint32_t col = blockIdx.x * kThreads + threadIdx.x; col < M;
         col += gridDim.x * kThreads) {
      int c;
      if (BITS == 8) {
        c = reinterpret_cast<const int8_t*>(codes)[row * L.M + col];
      } else if (BITS == 4) {
        const int b = codes[row * L.code_cols + (col >> 1)];
        c = ((((col & 1u) ? (b >> 4) : b) & 0xF) ^ 8) - 8;
      } else {
        const int b = codes[row * L.code_cols + (col >> 2)];
        c = (((b >> (2 * (col & 3u))) & 3) ^ 2) - 2;
      }
      store_f32(orow + col, __fmul_rn(static_cast<float>(c), srow[col / gs]));
    }
  }
}

template <typename T>
cudaError_t launch_quantize(const void* x, const Layout& L, int bits, bool stochastic, uint32_t key,
                            void* codes, float* scales, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  uint8_t* cp = static_cast<uint8_t*>(codes);
  const int64_t n_groups = L.N * L.G;
  const bool warp = L.gs <= kWarpGroupMax;
  const int64_t want = warp ? (n_groups + kWarps - 1) / kWarps : n_groups;
  const dim3 grid(static_cast<unsigned>(want < kMaxBlocks ? want : kMaxBlocks));
#define FSLQ_LAUNCH(B, S)                                                             \
  do {                                                                                \
    if (warp) quant_warp_kernel<T, B, S><<<grid, kThreads, 0, stream>>>(xp, cp, scales, L, key); \
    else quant_block_kernel<T, B, S><<<grid, kThreads, 0, stream>>>(xp, cp, scales, L, key);     \
  } while (0)
  if (bits == 8) {
    if (stochastic) FSLQ_LAUNCH(8, true);
    else FSLQ_LAUNCH(8, false);
  } else if (bits == 4) {
    if (stochastic) FSLQ_LAUNCH(4, true);
    else FSLQ_LAUNCH(4, false);
  } else {
    if (stochastic) FSLQ_LAUNCH(2, true);
    else FSLQ_LAUNCH(2, false);
  }
#undef FSLQ_LAUNCH
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t launch_dequantize(const void* codes, const float* scales, const Layout& L, int bits,
                              void* out, cudaStream_t stream) {
  const int64_t bx = (L.M + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(bx < 4096 ? bx : 4096),
                  static_cast<unsigned>(L.N < 65535 ? L.N : 65535));
  const uint8_t* cp = static_cast<const uint8_t*>(codes);
  OutT* op = static_cast<OutT*>(out);
  if (bits == 8) dequant_kernel<OutT, 8><<<grid, kThreads, 0, stream>>>(cp, scales, op, L);
  else if (bits == 4) dequant_kernel<OutT, 4><<<grid, kThreads, 0, stream>>>(cp, scales, op, L);
  else dequant_kernel<OutT, 2><<<grid, kThreads, 0, stream>>>(cp, scales, op, L);
  return cudaGetLastError();
}

}  // namespace fsl_quantize

// dtype: 0 float32, 1 float16, 2 bfloat16. Sizes are validated by the binding; N, M > 0.
cudaError_t fsl_quantize_cuda_launch(const void* x, int dtype, int64_t N, int64_t M, int64_t G,
                                     int64_t gs, int64_t code_cols, int bits, bool stochastic,
                                     uint32_t key, void* codes, float* scales,
                                     cudaStream_t stream) {
  using namespace fsl_quantize;
  const Layout L{N, M, G, gs, code_cols};
  switch (dtype) {
    case 0: return launch_quantize<float>(x, L, bits, stochastic, key, codes, scales, stream);
    case 1: return launch_quantize<__half>(x, L, bits, stochastic, key, codes, scales, stream);
    case 2:
      return launch_quantize<__nv_bfloat16>(x, L, bits, stochastic, key, codes, scales, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t fsl_dequantize_cuda_launch(const void* codes, const float* scales, int64_t N,
                                       int64_t M, int64_t G, int64_t gs, int64_t code_cols,
                                       int bits, void* out, int out_dtype, cudaStream_t stream) {
  using namespace fsl_quantize;
  if (M >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const Layout L{N, M, G, gs, code_cols};
  switch (out_dtype) {
    case 0: return launch_dequantize<float>(codes, scales, L, bits, out, stream);
    case 1: return launch_dequantize<__half>(codes, scales, L, bits, out, stream);
    case 2: return launch_dequantize<__nv_bfloat16>(codes, scales, L, bits, out, stream);
    default: return cudaErrorInvalidValue;
  }
}
