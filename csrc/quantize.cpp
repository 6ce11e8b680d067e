// Uplink activation quantization, CPU kernels (contract: docs/quantize.md).
//
// One OpenMP task per row; inside a row, each group takes two passes from cache: the absmax (max
// of the bit patterns with the sign cleared, so NaN/Inf win and get reported) and then the codes.
// Both inner loops are plain arrays of float / uint32 arithmetic that GCC vectorizes (AVX-512 on
// the dev box). The only float operation after the divisions is one product (|x| * inv * 2^24),
// never a product followed by an add, so FMA contraction (GCC's default in C++) cannot change a
// result: codes match the PyTorch reference bit for bit. Rounding to nearest and stochastic
// rounding are then integer operations on Y = floor(m * 2^24).
// float16 / bfloat16 rows are widened into a per-thread float buffer first (exact).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using u32a = uint32_t __attribute__((may_alias));

constexpr uint32_t kTinyBits = 0x10000000u;  // float bits of 2^-95: below it a group is zero

// The counter hash: MurmurHash3's fmix32 without its last xorshift (which only touches bits
// 0-15, of which k keeps 8; dropping it took stochastic from 1.45x to 1.33x of nearest here).
inline int32_t rng24(uint32_t idx, uint32_t key) {
  uint32_t h = idx ^ key;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return static_cast<int32_t>(h >> 8);
}

inline uint32_t absmax_bits(const float* x, int64_t len) {
  const u32a* b = reinterpret_cast<const u32a*>(x);
  uint32_t mb = 0;
  for (int64_t j = 0; j < len; ++j) {
    uint32_t v = b[j] & 0x7FFFFFFFu;
    mb = v > mb ? v : mb;
  }
  return mb;
}

// Code of one element (see the contract). m <= qmax * (1 + 2^-23), so Y < 2^31.
template <bool STOCH>
// inv24 = inv * 2^24 (exact): fl(|x| * inv24) == fl(|x| * inv) * 2^24 because scaling by a power
// of two commutes with rounding (no overflow: inv24 < 2^126; an underflow only happens where
// both sides truncate to 0), so Y costs one multiply.
inline int32_t code_of(float xv, float inv24, int32_t qmax, uint32_t idx, uint32_t key) {
  int32_t y = static_cast<int32_t>(std::fabs(xv) * inv24);
  int32_t mag;
  if (STOCH) {
    // y + k < 2^31 + 2^24 fits in uint32: floor((y + k) / 2^24).
    mag = static_cast<int32_t>((static_cast<uint32_t>(y) + static_cast<uint32_t>(rng24(idx, key)))
                               >> 24);
  } else {
    // Round half to even of y / 2^24 in integers (y + 0x7FFFFF + odd(q) carries iff the rest is
    // above one half, or exactly one half with q odd). Written without comparisons: GCC 12 left
    // the compare-and-select form scalar (8.4 ms vs 1.8 ms for 8 MiB).
    mag = (y + 0x7FFFFF + ((y >> 24) & 1)) >> 24;
  }
  mag = mag < qmax ? mag : qmax;
  return xv < 0.0f ? -mag : mag;
}

// Codes of one group of n elements into out (int8); idx = flat index of its first element.
template <bool STOCH>
inline void group_codes(const float* xg, uint32_t n, float inv24, int32_t qmax, uint32_t idx,
                        uint32_t key, int8_t* out) {
  // 32-bit loop counter: with an int64 one GCC built the 32-bit element indices through 64-bit
  // adds and permutes (stochastic int8, 8 MiB: 1.07 -> 0.91 ms).
  for (uint32_t j = 0; j < n; ++j)
    out[j] = static_cast<int8_t>(code_of<STOCH>(xg[j], inv24, qmax, idx + j, key));
}

// Per-row scratch of one thread: absmax bits and inv * 2^24 per group, int4 codes before packing.
struct RowScratch {
  std::vector<uint32_t> amax;
  std::vector<float> inv24;
  std::vector<int8_t> codes;
  RowScratch(int64_t M, int64_t G, int bits)
      : amax(G), inv24(G), codes(bits == 8 ? 0 : M + 3) {}
};

// One row of M floats: groups of gs (last one shorter); idx0 = flat index of the row's first
// element (mod 2^32); codes: int8 [M] or packed uint8 [ceil(M/2)]; scales: [G = ceil(M/gs)].
// Three steps over the row (it stays in L1/L2): absmax of every group; scales and inverses of all
// groups in one vectorized loop (two scalar divisions per group of 32 were a third of the int4
// time); codes. int4 codes go through scratch and are packed in a last loop (the stride-2 code
// loop did not vectorize).
// next: the next row of this thread (or nullptr); it is prefetched while codes are computed so
// that its absmax pass reads from cache and the hash arithmetic overlaps the memory traffic.
template <int BITS, bool STOCH>
void quantize_row(const float* x, int64_t M, int64_t gs, uint32_t idx0, uint32_t key,
                  void* codes, float* scales, RowScratch& w, const float* next) {
  constexpr int32_t qmax = BITS == 8 ? 127 : (BITS == 4 ? 7 : 1);
  constexpr float kQ = static_cast<float>(qmax);
  constexpr int64_t kChunk = 1024;  // elements between prefetch bursts (4 KiB)
  const int64_t G = (M + gs - 1) / gs;
  uint32_t* amax = w.amax.data();
  float* inv24 = w.inv24.data();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * gs;
    amax[g] = absmax_bits(x + c0, std::min(gs, M - c0));
  }
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t mb = amax[g];
    const bool live = !(mb < kTinyBits);  // NaN/Inf patterns are live: non-finite scale
    float a;
    std::memcpy(&a, &mb, sizeof(a));
    a = live ? a : 1.0f;
    scales[g] = live ? a / kQ : 0.0f;
    inv24[g] = live ? (kQ / a) * 16777216.0f : 0.0f;
  }
  int8_t* out = BITS == 8 ? static_cast<int8_t*>(codes) : w.codes.data();
  int64_t pf = 0;  // next row: elements prefetched so far
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * gs;
    const int64_t len = std::min(gs, M - c0);
    for (int64_t s = 0; s < len; s += kChunk) {
      const int64_t n = std::min(kChunk, len - s);
      if (next != nullptr) {
        for (; pf < c0 + s + n; pf += 16) __builtin_prefetch(next + pf, 0, 3);
      }
      group_codes<STOCH>(x + c0 + s, static_cast<uint32_t>(n), inv24[g], qmax,
                         idx0 + static_cast<uint32_t>(c0 + s), key, out + c0 + s);
    }
  }
  if (BITS == 4) {
    int8_t* tmp = w.codes.data();
    tmp[M] = 0;  // high nibble of the last byte when M is odd
    uint8_t* packed = static_cast<uint8_t*>(codes);
    const int64_t bytes = (M + 1) / 2;
    for (int64_t p = 0; p < bytes; ++p)
      packed[p] = static_cast<uint8_t>((tmp[2 * p] & 0xF) |
                                       (static_cast<uint8_t>(tmp[2 * p + 1]) << 4));
  }
  if (BITS == 2) {  // element 4p + t in bits 2t, 2t + 1 of byte p; unused pairs 0
    int8_t* tmp = w.codes.data();
    tmp[M] = tmp[M + 1] = tmp[M + 2] = 0;
    uint8_t* packed = static_cast<uint8_t*>(codes);
    const int64_t bytes = (M + 3) / 4;
    for (int64_t p = 0; p < bytes; ++p)
      packed[p] = static_cast<uint8_t>((tmp[4 * p] & 3) | ((tmp[4 * p + 1] & 3) << 2) |
                                       ((tmp[4 * p + 2] & 3) << 4) | ((tmp[4 * p + 3] & 3) << 6));
  }
}

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);  // c10::Half / c10::BFloat16 -> float is exact
}

template <typename T, int BITS, bool STOCH>
void quantize_all(const at::Tensor& x, int64_t gs, uint32_t key, at::Tensor& codes,
                  at::Tensor& scales) {
  const int64_t N = x.size(0), M = x.size(1), G = scales.size(1), C = codes.size(1);
  const T* xp = x.data_ptr<T>();
  uint8_t* cp = static_cast<uint8_t*>(codes.data_ptr());
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf;
    RowScratch scratch(M, G, BITS);
    if (!std::is_same<T, float>::value) buf.resize(M);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row;
      if constexpr (std::is_same<T, float>::value) {
        row = xp + r * M;
      } else {
        const T* src = xp + r * M;
        for (int64_t j = 0; j < M; ++j) buf[j] = widen(src[j]);
        row = buf.data();
      }
      const float* next = nullptr;
      if constexpr (std::is_same<T, float>::value) {
        if (r + 1 < r1) next = xp + (r + 1) * M;
      }
      const uint32_t idx0 = static_cast<uint32_t>(r * M);
      uint8_t* crow = cp + r * C;
      float* srow = sp + r * G;
      quantize_row<BITS, STOCH>(row, M, gs, idx0, key, crow, srow, scratch, next);
    }
  });
}

template <typename T>
void quantize_dispatch(const at::Tensor& x, int64_t bits, int64_t gs, bool stochastic,
                       uint32_t key, at::Tensor& codes, at::Tensor& scales) {
  if (bits == 8) {
    if (stochastic) quantize_all<T, 8, true>(x, gs, key, codes, scales);
    else quantize_all<T, 8, false>(x, gs, key, codes, scales);
  } else if (bits == 4) {
    if (stochastic) quantize_all<T, 4, true>(x, gs, key, codes, scales);
    else quantize_all<T, 4, false>(x, gs, key, codes, scales);
  } else {
    if (stochastic) quantize_all<T, 2, true>(x, gs, key, codes, scales);
    else quantize_all<T, 2, false>(x, gs, key, codes, scales);
  }
}

void check_args(const at::Tensor& x, int64_t bits, int64_t gs, int64_t key,
                const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "quantize_rows_: bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(),
              "quantize_rows_: x must be a contiguous 2-D [N, M] tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "quantize_rows_: x must be float32/float16/bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), M = x.size(1);
  TORCH_CHECK(M < (int64_t(1) << 31), "quantize_rows_: rows of 2^31 or more elements are not "
              "supported (32-bit loop counters), got M = ", M);
  TORCH_CHECK(gs >= 1 && (bits == 8 || gs % (8 / bits) == 0),
              "quantize_rows_: group_size must be >= 1 (even for int4, divisible by 4 for int2), got ", gs);
  TORCH_CHECK(key >= 0 && key <= 0xFFFFFFFFLL, "quantize_rows_: key must fit 32 bits, got ", key);
  const int64_t C = bits == 8 ? M : (bits == 4 ? (M + 1) / 2 : (M + 3) / 4);
  const int64_t G = M == 0 ? (bits == 8 ? 1 : 0) : (M + gs - 1) / gs;
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.size(0) == N &&
                  codes.size(1) == C &&
                  codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "quantize_rows_: codes must be contiguous ", (bits == 8 ? "int8" : "uint8"),
              " [", N, ", ", C, "], got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == N &&
                  (scales.size(1) == G || M == 0) && scales.scalar_type() == at::kFloat,
              "quantize_rows_: scales must be contiguous float32 [", N, ", ", G, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(x.device() == codes.device() && x.device() == scales.device(),
              "quantize_rows_: x, codes and scales must be on one device, got ", x.device(), ", ",
              codes.device(), ", ", scales.device());
}

void quantize_rows_cpu(const at::Tensor& x, int64_t bits, int64_t gs, bool stochastic, int64_t key,
                       at::Tensor codes, at::Tensor scales) {
  check_args(x, bits, gs, key, codes, scales);
  if (x.size(1) == 0) {
    scales.zero_();
    return;
  }
  const uint32_t k = static_cast<uint32_t>(key);
  switch (x.scalar_type()) {
    case at::kFloat: quantize_dispatch<float>(x, bits, gs, stochastic, k, codes, scales); break;
    case at::kHalf: quantize_dispatch<c10::Half>(x, bits, gs, stochastic, k, codes, scales); break;
    default: quantize_dispatch<c10::BFloat16>(x, bits, gs, stochastic, k, codes, scales); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantize: out = RNE_to_out_dtype(fl(code * scale)).

template <typename T>
inline T narrow(float v);
template <>
inline float narrow<float>(float v) { return v; }
template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  // Round to nearest even on the bit pattern; v is finite here (code * finite scale).
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  b += 0x7FFFu + ((b >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(b >> 16), c10::BFloat16::from_bits());
}
template <>
inline c10::Half narrow<c10::Half>(float v) { return c10::Half(v); }  // IEEE RNE conversion

// int4 codes are first unpacked into tmp (int8 [M + 1], per thread) so that the scaling loop is
// the same contiguous loop as for int8.
template <typename T, int BITS>
void dequantize_row(const uint8_t* codes, const float* scales, int64_t M, int64_t gs, T* out,
                    int8_t* tmp) {
  const int8_t* c = reinterpret_cast<const int8_t*>(codes);
  if (BITS == 4) {
    const int64_t bytes = (M + 1) / 2;
    for (int64_t p = 0; p < bytes; ++p) {
      const int32_t b = codes[p];
      tmp[2 * p] = static_cast<int8_t>(((b & 0xF) ^ 8) - 8);
      tmp[2 * p + 1] = static_cast<int8_t>(((b >> 4) ^ 8) - 8);
    }
    c = tmp;
  }
  if (BITS == 2) {
    const int64_t bytes = (M + 3) / 4;
    for (int64_t p = 0; p < bytes; ++p) {
      const int32_t b = codes[p];
      for (int t = 0; t < 4; ++t) tmp[4 * p + t] = static_cast<int8_t>((((b >> (2 * t)) & 3) ^ 2) - 2);
    }
    c = tmp;
  }
  int64_t g = 0;
  for (int64_t c0 = 0; c0 < M; c0 += gs, ++g) {
    const int64_t len = std::min(gs, M - c0);
    const float s = scales[g];
    T* o = out + c0;
    const int8_t* cg = c + c0;
    for (int64_t j = 0; j < len; ++j) o[j] = narrow<T>(static_cast<float>(cg[j]) * s);
  }
}

template <typename T>
void dequantize_all(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t gs,
                    at::Tensor& out) {
  const int64_t N = out.size(0), M = out.size(1), G = scales.size(1), C = codes.size(1);
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const float* sp = scales.data_ptr<float>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> tmp(bits == 8 ? 0 : M + 3);
    for (int64_t r = r0; r < r1; ++r) {
      if (bits == 8) dequantize_row<T, 8>(cp + r * C, sp + r * G, M, gs, op + r * M, nullptr);
      else if (bits == 4) dequantize_row<T, 4>(cp + r * C, sp + r * G, M, gs, op + r * M, tmp.data());
      else dequantize_row<T, 2>(cp + r * C, sp + r * G, M, gs, op + r * M, tmp.data());
    }
  });
}

void dequantize_rows_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                         int64_t gs, at::Tensor out) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "quantize_dequantize_: bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(),
              "quantize_dequantize_: out must be a contiguous 2-D [N, M] tensor, got ",
              out.sizes());
  const int64_t N = out.size(0), M = out.size(1);
  TORCH_CHECK(gs >= 1 && (bits == 8 || gs % (8 / bits) == 0),
              "quantize_dequantize_: group_size must be >= 1 (even for int4, divisible by 4 for int2), got ", gs);
  const int64_t C = bits == 8 ? M : (bits == 4 ? (M + 1) / 2 : (M + 3) / 4);
  const int64_t G = M == 0 ? scales.size(1) : (M + gs - 1) / gs;
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.size(0) == N &&
                  codes.size(1) == C &&
                  codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "quantize_dequantize_: codes must be contiguous ", (bits == 8 ? "int8" : "uint8"),
              " [", N, ", ", C, "], got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) == G && scales.scalar_type() == at::kFloat,
              "quantize_dequantize_: scales must be contiguous float32 [", N, ", ", G, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  switch (out.scalar_type()) {
    case at::kFloat: dequantize_all<float>(codes, scales, bits, gs, out); break;
    case at::kHalf: dequantize_all<c10::Half>(codes, scales, bits, gs, out); break;
    case at::kBFloat16: dequantize_all<c10::BFloat16>(codes, scales, bits, gs, out); break;
    default:
      TORCH_CHECK(false, "quantize_dequantize_: out must be float32/float16/bfloat16, got ",
                  out.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def(
      "quantize_rows_(Tensor x, int bits, int group_size, bool stochastic, int key, "
      "Tensor(a!) codes, Tensor(b!) scales) -> ()");
  m.def(
      "quantize_dequantize_(Tensor codes, Tensor scales, int bits, int group_size, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) {
  m.impl("quantize_rows_", &quantize_rows_cpu);
  m.impl("quantize_dequantize_", &dequantize_rows_cpu);
}
