// CUDA kernels of the fused linear auxiliary head (estimate and alignment), fp32.
// Only the CUDA runtime is included: the binding (aux_cuda.cpp) validates tensors, allocates
// outputs and workspaces, and calls the plain launchers below on the current stream.
//
// Same contract as csrc/aux.cpp (see there): x [K,B,D], W [K,C,D], b [K,C], y [K,B] int64,
// target [K,B,D]; G = scale (softmax(xW^T+b) - onehot(y)); u = G W.
//
// Layout of the work:
//   row kernel   one block per (row, client): z = W x_row by block reductions (16 classes at a
//                time), softmax and G in shared memory, then u / g (estimate) or R = 2(u/S - t)
//                (alignment; R goes to a workspace), the row's loss, dP = W R, dz. Logits only
//                ever live in shared memory.
//   dW kernel    thread per (column d, 16 classes, row split): sums G^T R + dz^T x over its rows
//                in order into a partial; the finalize kernel adds the partials in split order.
//   No atomics anywhere: results are bitwise reproducible run to run.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCls = 16;  // classes reduced per sweep of the row

// Sums v[0..15] over the block; thread j < 16 of the block gets total j in `out[j]` (shared).
__device__ __forceinline__ void block_sum16(float (&v)[kCls], float* red /*[kWarps][kCls]*/,
                                            float* out /*[kCls]*/) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kCls; ++j) {
    float s = v[j];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    v[j] = s;
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kCls; ++j) red[warp * kCls + j] = v[j];
  }
  __syncthreads();
  if (threadIdx.x < kCls) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red[w * kCls + threadIdx.x];
    out[threadIdx.x] = s;
  }
  __syncthreads();
}

__device__ __forceinline__ float block_sum1(float v, float* red /*[kWarps]*/) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < kWarps; ++w) s += red[w];
  return s;
}

// out[c] = dot(W[c, :], row) for all c < C, into shared `out`.
__device__ void row_dot_W(const float* __restrict__ W, const float* __restrict__ row, int C,
                          int64_t D, float* red, float* out) {
  for (int c0 = 0; c0 < C; c0 += kCls) {
    float v[kCls];
#pragma unroll
    for (int j = 0; j < kCls; ++j) v[j] = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float xv = row[d];
#pragma unroll
      for (int j = 0; j < kCls; ++j)
        if (c0 + j < C) v[j] += W[(int64_t)(c0 + j) * D + d] * xv;
    }
    block_sum16(v, red, out + c0);  // writes out[c0 .. c0+15]; out has room (padded to 16)
  }
}

// In shared memory: z (logits, C) -> p (probabilities) and G = scale (p - onehot(y)).
__device__ void softmax_G(float* z, float* G, const float* __restrict__ bias, int C, int64_t y,
                          float scale) {
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int c = 0; c < C; ++c) {
      z[c] += bias[c];
      m = fmaxf(m, z[c]);
    }
    float s = 0.f;
    for (int c = 0; c < C; ++c) {
      z[c] = expf(z[c] - m);
      s += z[c];
    }
    const float inv = 1.f / s;
    for (int c = 0; c < C; ++c) {
      z[c] *= inv;
      G[c] = scale * (z[c] - (c == y ? 1.f : 0.f));
    }
  }
  __syncthreads();
}

// Dynamic shared memory: z/p [Cp], G [Cp], dP [Cp], red [kWarps * kCls], Cp = C rounded up to 16.
__global__ void estimate_kernel(const float* __restrict__ x, const float* __restrict__ W,
                                const float* __restrict__ bias, const int64_t* __restrict__ y,
                                float* __restrict__ g, int B, int C, int64_t D, float inv_spread,
                                float scale) {
  extern __shared__ float sm[];
  const int Cp = (C + kCls - 1) / kCls * kCls;
  float* z = sm;
  float* G = z + Cp;
  float* red = G + Cp;
  const int r = blockIdx.x, k = blockIdx.y;
  const float* row = x + ((int64_t)k * B + r) * D;
  const float* Wk = W + (int64_t)k * C * D;
  row_dot_W(Wk, row, C, D, red, z);
  softmax_G(z, G, bias + (int64_t)k * C, C, y[(int64_t)k * B + r], scale);
  float* out = g + ((int64_t)k * B + r) * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float u = 0.f;
    for (int c = 0; c < C; ++c) u += G[c] * Wk[(int64_t)c * D + d];
    out[d] = u * inv_spread;
  }
}

__global__ void align_row_kernel(const float* __restrict__ x, const float* __restrict__ W,
                                 const float* __restrict__ bias, const int64_t* __restrict__ y,
                                 const float* __restrict__ tgt, float* __restrict__ Rws,
                                 float* __restrict__ Gws, float* __restrict__ dzws,
                                 float* __restrict__ row_loss, int B, int C, int64_t D,
                                 float spread, float scale) {
  extern __shared__ float sm[];
  const int Cp = (C + kCls - 1) / kCls * kCls;
  float* z = sm;
  float* G = z + Cp;
  float* dP = G + Cp;
  float* red = dP + Cp;
  const int r = blockIdx.x, k = blockIdx.y;
  const int64_t row_id = (int64_t)k * B + r;
  const float* row = x + row_id * D;
  const float* t = tgt + row_id * D;
  float* R = Rws + row_id * D;
  const float* Wk = W + (int64_t)k * C * D;
  row_dot_W(Wk, row, C, D, red, z);
  softmax_G(z, G, bias + (int64_t)k * C, C, y[row_id], scale);
  const float inv_spread = 1.f / spread;
  float lsum = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float u = 0.f;
    for (int c = 0; c < C; ++c) u += G[c] * Wk[(int64_t)c * D + d];
    const float diff = u * inv_spread - t[d];
    lsum += diff * diff;
    R[d] = 2.f * diff;  // read back below by this same thread only
  }
  const float l = block_sum1(lsum, red);
  if (threadIdx.x == 0) row_loss[row_id] = l * spread;
  __syncthreads();
  row_dot_W(Wk, R, C, D, red, dP);
  if (threadIdx.x == 0) {
    float dot = 0.f;
    for (int c = 0; c < C; ++c) dot += dP[c] * z[c];
    for (int c = 0; c < C; ++c) {
      Gws[row_id * C + c] = G[c];
      dzws[row_id * C + c] = scale * z[c] * (dP[c] - dot);
    }
  }
}

// part[k, s, c, d] = sum over rows r of split s (in order) of G[r,c] R[r,d] + dz[r,c] x[r,d].
__global__ void dW_partial_kernel(const float* __restrict__ x, const float* __restrict__ Rws,
                                  const float* __restrict__ Gws, const float* __restrict__ dzws,
                                  float* __restrict__ part, int K, int B, int C, int64_t D,
                                  int splits) {
  const int64_t d = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int c0 = blockIdx.y * kCls;
  const int k = blockIdx.z / splits, s = blockIdx.z % splits;
  if (d >= D) return;
  const int r0 = (int)((int64_t)s * B / splits), r1 = (int)((int64_t)(s + 1) * B / splits);
  float acc[kCls];
#pragma unroll
  for (int j = 0; j < kCls; ++j) acc[j] = 0.f;
  for (int r = r0; r < r1; ++r) {
    const int64_t row_id = (int64_t)k * B + r;
    const float rv = Rws[row_id * D + d];
    const float xv = x[row_id * D + d];
    const float* Gr = Gws + row_id * C;
    const float* zr = dzws + row_id * C;
#pragma unroll
    for (int j = 0; j < kCls; ++j)
      if (c0 + j < C) acc[j] += Gr[c0 + j] * rv + zr[c0 + j] * xv;
  }
  float* out = part + ((int64_t)k * splits + s) * C * D;
#pragma unroll
  for (int j = 0; j < kCls; ++j)
    if (c0 + j < C) out[(int64_t)(c0 + j) * D + d] = acc[j];
}

// dW[k] = sum_s part[k, s] (split order); db[k, c] = sum_r dz[k, r, c]; loss[k] = sum_r row_loss.
__global__ void finalize_kernel(const float* __restrict__ part, const float* __restrict__ dzws,
                                const float* __restrict__ row_loss, float* __restrict__ dW,
                                float* __restrict__ db, float* __restrict__ loss, int K, int B,
                                int C, int64_t D, int splits) {
  const int64_t CD = (int64_t)C * D;
  const int64_t n = (int64_t)K * CD;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const int64_t k = i / CD, e = i % CD;
    float a = 0.f;
    for (int s = 0; s < splits; ++s) a += part[(k * splits + s) * CD + e];
    dW[i] = a;
  } else if (i < n + (int64_t)K * C) {
    const int64_t j = i - n, k = j / C, c = j % C;
    float a = 0.f;
    for (int r = 0; r < B; ++r) a += dzws[(k * B + r) * C + c];
    db[j] = a;
  } else if (i < n + (int64_t)K * C + K) {
    const int64_t k = i - n - (int64_t)K * C;
    double a = 0.0;
    for (int r = 0; r < B; ++r) a += row_loss[k * B + r];
    loss[k] = (float)a;
  }
}

inline int padded(int C) { return (C + kCls - 1) / kCls * kCls; }

}  // namespace

// Number of row splits of the dW reduction (a function of B only, so results never depend on
// the launch configuration of another call).
int aux_cuda_row_splits(int B) {
  int s = (B + 31) / 32;
  return s < 1 ? 1 : (s > 64 ? 64 : s);
}

cudaError_t aux_cuda_estimate(const float* x, const float* W, const float* b, const int64_t* y,
                              float* g, int K, int B, int C, int64_t D, float inv_spread,
                              float scale, cudaStream_t stream) {
  if (K == 0 || B == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * (2 * padded(C) + kWarps * kCls);
  dim3 grid(B, K);
  estimate_kernel<<<grid, kThreads, smem, stream>>>(x, W, b, y, g, B, C, D, inv_spread, scale);
  return cudaGetLastError();
}

cudaError_t aux_cuda_align(const float* x, const float* W, const float* b, const int64_t* y,
                           const float* tgt, float* loss, float* dW, float* db, float* ws_R,
                           float* ws_G, float* ws_dz, float* ws_row_loss, float* ws_part, int K,
                           int B, int C, int64_t D, float spread, float scale,
                           cudaStream_t stream) {
  if (K == 0 || B == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * (3 * padded(C) + kWarps * kCls);
  align_row_kernel<<<dim3(B, K), kThreads, smem, stream>>>(x, W, b, y, tgt, ws_R, ws_G, ws_dz,
                                                           ws_row_loss, B, C, D, spread, scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int splits = aux_cuda_row_splits(B);
  const int tpb = 128;
  dim3 grid2((unsigned)((D + tpb - 1) / tpb), (unsigned)((C + kCls - 1) / kCls),
             (unsigned)(K * splits));
  dW_partial_kernel<<<grid2, tpb, 0, stream>>>(x, ws_R, ws_G, ws_dz, ws_part, K, B, C, D, splits);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n = (int64_t)K * C * D + (int64_t)K * C + K;
  finalize_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(ws_part, ws_dz, ws_row_loss,
                                                                    dW, db, loss, K, B, C, D,
                                                                    splits);
  return cudaGetLastError();
}
