// Flat-buffer FedAvg on CPU (OpenMP over column blocks).
//
//   out[p] = w[0]*buf[0,p] + w[1]*buf[1,p] + ... + w[K-1]*buf[K-1,p]      (fp32 accumulation)
//
// buf is [K, P] fp32 or bf16 with unit column stride and row stride ld >= P; weights [K] fp32;
// out [P] fp32. fedavg_broadcast also writes the average back into every row of buf in the same
// pass (rounded to nearest-even when buf is bf16).
//
// Summation order and rounding are fixed on purpose: acc = w0*x0, then acc = acc + (wk*xk) for
// k = 1..K-1, each product and each sum rounded to fp32 separately (no fused multiply-add). That is
// exactly what the authors' per-key state_dict loop computes (`sd0[key]*w0`, then
// `+= sdk[key]*wk`), so this kernel reproduces the reference engine bit for bit, and any thread
// count gives the same bits (each column is summed by one thread; no atomics).
//
// Memory: the op is bandwidth-bound (K*P*4 bytes read, P*4 written). The partial sums of a block
// of kBlock columns (16 KiB, on the stack) stay in L1 while the K row segments stream through it,
// eight rows per sweep, so DRAM traffic is the minimum and every row is read sequentially. The
// finished block goes to out with non-temporal stores: out is not read back, and streaming it
// avoids the read-for-ownership of out's lines (P*4 bytes, ~9% of the traffic at K=10).

// Keep products and sums separately rounded (see above): no contraction into FMA in this file.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// 4096 fp32 = 16 KiB of partial sums per block: fits L1 (48 KiB) next to the streamed rows.
// Measured on the 2-vCPU Xeon, 1 thread, interleaved with torch.mv under background load
// (K=10, P=11.18M): blocks of 2048..16384 columns and 4 or 8 rows per sweep all land within ~5% of
// each other and 5-20% under torch.mv. Streaming stores for out: 10-18% faster at K=3 (three
// runs), within the noise at K=10 (where out is 1/11 of the traffic).
constexpr int64_t kBlock = 4096;
constexpr int kRowsPerSweep = 8;
// Below this many elements (K*P) a parallel region costs more than it saves.
constexpr int64_t kParallelMin = int64_t(1) << 16;

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16(float) / tensor.to(bf16).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t(0x7fc0);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return bf16_to_f32(*p); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// One block of columns [j0, j0 + n) into acc[0, n).
template <typename T>
inline void block_average(const T* __restrict__ buf, int64_t K, int64_t ld, const float* w,
                          float* __restrict__ acc, int64_t j0, int64_t n) {
  const T* r0 = buf + j0;
  const float w0 = w[0];
  for (int64_t j = 0; j < n; ++j) acc[j] = w0 * load(r0 + j);
  int64_t k = 1;
  // Several rows per sweep over acc: fewer L1 round trips of acc, same per-element order.
  for (; k + kRowsPerSweep <= K; k += kRowsPerSweep) {
    const T* rows[kRowsPerSweep];
    float ws[kRowsPerSweep];
    for (int r = 0; r < kRowsPerSweep; ++r) {
      rows[r] = buf + (k + r) * ld + j0;
      ws[r] = w[k + r];
    }
    for (int64_t j = 0; j < n; ++j) {
      float s = acc[j];
#pragma GCC unroll 8
      for (int r = 0; r < kRowsPerSweep; ++r) {
        const float prod = ws[r] * load(rows[r] + j);
        s = s + prod;
      }
      acc[j] = s;
    }
  }
  for (; k < K; ++k) {
    const T* a = buf + k * ld + j0;
    const float wa = w[k];
    for (int64_t j = 0; j < n; ++j) {
      const float prod = wa * load(a + j);
      acc[j] = acc[j] + prod;
    }
  }
}

// dst[0, n) = src[0, n) with non-temporal stores where dst is aligned (src is 64-byte aligned).
inline void stream_out(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_load_ps(src + j));
  }
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_load_ps(src + j));
  }
#endif
  for (; j < n; ++j) dst[j] = src[j];
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();  // order the streamed lines before anything that follows (other threads, Python)
#endif
}

template <typename T>
void fedavg_kernel(T* buf, int64_t K, int64_t P, int64_t ld, const float* w, float* out,
                   bool broadcast) {
  const int64_t nblk = (P + kBlock - 1) / kBlock;
  const bool par = nblk > 1 && K * P >= kParallelMin;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t b = 0; b < nblk; ++b) {
    alignas(64) float acc[kBlock];
    const int64_t j0 = b * kBlock;
    const int64_t n = std::min(kBlock, P - j0);
    block_average<T>(buf, K, ld, w, acc, j0, n);
    stream_out(out + j0, acc, n);
    if (broadcast) {
      // The block's rows were just read, so these writes hit cache lines already present.
      for (int64_t k = 0; k < K; ++k) {
        T* r = buf + k * ld + j0;
        for (int64_t j = 0; j < n; ++j) store(r + j, acc[j]);
      }
    }
  }
}

}  // namespace

// Shared with fedavg_cuda.cpp: argument checks that do not depend on the device.
void fsl_fast_fedavg_check(const at::Tensor& buf, const at::Tensor& weights, const at::Tensor& out) {
  TORCH_CHECK(buf.dim() == 2, "fedavg: buf must be 2-D [K, P], got shape ", buf.sizes());
  TORCH_CHECK(buf.scalar_type() == at::kFloat || buf.scalar_type() == at::kBFloat16,
              "fedavg: buf must be float32 or bfloat16, got ", buf.scalar_type());
  const int64_t K = buf.size(0), P = buf.size(1);
  TORCH_CHECK(K >= 1, "fedavg: buf must have at least one row, got shape ", buf.sizes());
  TORCH_CHECK(P <= 1 || buf.stride(1) == 1, "fedavg: buf must have unit column stride, got strides ",
              buf.strides());
  TORCH_CHECK(K == 1 || buf.stride(0) >= P, "fedavg: buf rows overlap (row stride ", buf.stride(0),
              " < P=", P, ")");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == K, "fedavg: weights must be [K]=[", K,
              "], got shape ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "fedavg: weights must be float32, got ",
              weights.scalar_type());
  TORCH_CHECK(weights.is_contiguous(), "fedavg: weights must be contiguous");
  TORCH_CHECK(out.dim() == 1 && out.size(0) == P, "fedavg: out must be [P]=[", P, "], got shape ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fedavg: out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "fedavg: out must be contiguous");
  TORCH_CHECK(weights.device() == buf.device() && out.device() == buf.device(),
              "fedavg: buf, weights and out must be on one device, got ", buf.device(), ", ",
              weights.device(), ", ", out.device());
}

namespace {

void run_cpu(const at::Tensor& buf, const at::Tensor& weights, const at::Tensor& out, bool broadcast) {
  fsl_fast_fedavg_check(buf, weights, out);
  TORCH_CHECK(buf.device().is_cpu(), "fedavg (cpu kernel): buf must be a CPU tensor, got ", buf.device());
  const int64_t K = buf.size(0), P = buf.size(1);
  if (P == 0) return;
  const int64_t ld = K == 1 ? P : buf.stride(0);
  const float* w = weights.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (buf.scalar_type() == at::kFloat) {
    fedavg_kernel<float>(buf.data_ptr<float>(), K, P, ld, w, o, broadcast);
  } else {
    auto* b = reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>());
    fedavg_kernel<uint16_t>(b, K, P, ld, w, o, broadcast);
  }
}

void fedavg_cpu(const at::Tensor& buf, const at::Tensor& weights, at::Tensor out) {
  run_cpu(buf, weights, out, false);
}

void fedavg_broadcast_cpu(at::Tensor buf, const at::Tensor& weights, at::Tensor out) {
  run_cpu(buf, weights, out, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def("fedavg(Tensor buf, Tensor weights, Tensor(a!) out) -> ()");
  m.def("fedavg_broadcast(Tensor(a!) buf, Tensor weights, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) {
  m.impl("fedavg", &fedavg_cpu);
  m.impl("fedavg_broadcast", &fedavg_broadcast_cpu);
}
