// Uplink activation quantization, CPU kernels (contract: docs/quantize.md).
//
// One OpenMP task per row; inside a row, each group takes two passes from cache: the absmax (max
// of the bit patterns with the sign cleared, so NaN/Inf win and get reported) and then the codes.
// Both inner loops are plain arrays of float / uint32 arithmetic that GCC vectorizes (AVX-512 on
// the dev box). The only float operations after the division are products (|x| * inv, then an
// exact * 2^24), never a product followed by an add, so FMA contraction (GCC's default in C++)
// cannot change a result: codes match the PyTorch reference bit for bit. Rounding to nearest and
// stochastic rounding are then integer operations on Y = floor(m * 2^24).
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

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline int32_t rng24(uint32_t idx, uint32_t key) {
  uint32_t h = fmix32(idx ^ key);
  h = fmix32(h + key);
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
inline int32_t code_of(float xv, float inv, int32_t qmax, uint32_t idx, uint32_t key) {
  float m = std::fabs(xv) * inv;
  int32_t y = static_cast<int32_t>(m * 16777216.0f);
  int32_t q = y >> 24;
  int32_t rem = y & 0xFFFFFF;
  int32_t mag;
  if (STOCH) {
    mag = q + ((rem + rng24(idx, key)) >> 24);
  } else {
    mag = q + ((rem > 0x800000) | ((rem == 0x800000) & (q & 1)));
  }
  mag = mag < qmax ? mag : qmax;
  return xv < 0.0f ? -mag : mag;
}

// One row of M floats: groups of gs (last one shorter); idx0 = flat index of the row's first
// element (mod 2^32); codes: int8 [M] or packed uint8 [ceil(M/2)]; scales: [ceil(M/gs)].
template <int BITS, bool STOCH>
void quantize_row(const float* x, int64_t M, int64_t gs, uint32_t idx0, uint32_t key,
                  void* codes, float* scales) {
  constexpr int32_t qmax = BITS == 8 ? 127 : 7;
  int64_t g = 0;
  for (int64_t c0 = 0; c0 < M; c0 += gs, ++g) {
    const int64_t len = std::min(gs, M - c0);
    const float* xg = x + c0;
    const uint32_t mb = absmax_bits(xg, len);
    float a;
    std::memcpy(&a, &mb, sizeof(a));
    float scale = 0.0f, inv = 0.0f;
    if (!(mb < kTinyBits)) {
      scale = a / static_cast<float>(qmax);
      inv = static_cast<float>(qmax) / a;
    }
    scales[g] = scale;
    const uint32_t base = idx0 + static_cast<uint32_t>(c0);
    if (BITS == 8) {
      int8_t* out = static_cast<int8_t*>(codes) + c0;
      for (int64_t j = 0; j < len; ++j)
        out[j] = static_cast<int8_t>(
            code_of<STOCH>(xg[j], inv, qmax, base + static_cast<uint32_t>(j), key));
    } else {
      uint8_t* out = static_cast<uint8_t*>(codes) + c0 / 2;  // gs is even: c0 is even
      const int64_t pairs = len / 2;
      for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t i = base + static_cast<uint32_t>(2 * p);
        int32_t lo = code_of<STOCH>(xg[2 * p], inv, qmax, i, key);
        int32_t hi = code_of<STOCH>(xg[2 * p + 1], inv, qmax, i + 1u, key);
        out[p] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
      }
      if (len & 1) {
        int32_t lo = code_of<STOCH>(xg[len - 1], inv, qmax,
                                    base + static_cast<uint32_t>(len - 1), key);
        out[pairs] = static_cast<uint8_t>(lo & 0xF);
      }
    }
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
      quantize_row<BITS, STOCH>(row, M, gs, static_cast<uint32_t>(r * M), key, cp + r * C,
                                sp + r * G);
    }
  });
}

template <typename T>
void quantize_dispatch(const at::Tensor& x, int64_t bits, int64_t gs, bool stochastic,
                       uint32_t key, at::Tensor& codes, at::Tensor& scales) {
  if (bits == 8) {
    if (stochastic) quantize_all<T, 8, true>(x, gs, key, codes, scales);
    else quantize_all<T, 8, false>(x, gs, key, codes, scales);
  } else {
    if (stochastic) quantize_all<T, 4, true>(x, gs, key, codes, scales);
    else quantize_all<T, 4, false>(x, gs, key, codes, scales);
  }
}

void check_args(const at::Tensor& x, int64_t bits, int64_t gs, int64_t key,
                const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(bits == 8 || bits == 4, "quantize_rows_: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(),
              "quantize_rows_: x must be a contiguous 2-D [N, M] tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "quantize_rows_: x must be float32/float16/bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), M = x.size(1);
  TORCH_CHECK(gs >= 1 && (bits == 8 || gs % 2 == 0),
              "quantize_rows_: group_size must be >= 1 (and even for int4), got ", gs);
  TORCH_CHECK(key >= 0 && key <= 0xFFFFFFFFLL, "quantize_rows_: key must fit 32 bits, got ", key);
  const int64_t C = bits == 8 ? M : (M + 1) / 2;
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

template <typename T, int BITS>
void dequantize_row(const uint8_t* codes, const float* scales, int64_t M, int64_t gs, T* out) {
  int64_t g = 0;
  for (int64_t c0 = 0; c0 < M; c0 += gs, ++g) {
    const int64_t len = std::min(gs, M - c0);
    const float s = scales[g];
    T* o = out + c0;
    if (BITS == 8) {
      const int8_t* c = reinterpret_cast<const int8_t*>(codes) + c0;
      for (int64_t j = 0; j < len; ++j) o[j] = narrow<T>(static_cast<float>(c[j]) * s);
    } else {
      const uint8_t* c = codes + c0 / 2;
      const int64_t pairs = len / 2;
      for (int64_t p = 0; p < pairs; ++p) {
        const int32_t b = c[p];
        const int32_t lo = ((b & 0xF) ^ 8) - 8, hi = ((b >> 4) ^ 8) - 8;
        o[2 * p] = narrow<T>(static_cast<float>(lo) * s);
        o[2 * p + 1] = narrow<T>(static_cast<float>(hi) * s);
      }
      if (len & 1) o[len - 1] = narrow<T>(static_cast<float>(((c[pairs] & 0xF) ^ 8) - 8) * s);
    }
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
    for (int64_t r = r0; r < r1; ++r) {
      if (bits == 8) dequantize_row<T, 8>(cp + r * C, sp + r * G, M, gs, op + r * M);
      else dequantize_row<T, 4>(cp + r * C, sp + r * G, M, gs, op + r * M);
    }
  });
}

void dequantize_rows_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                         int64_t gs, at::Tensor out) {
  TORCH_CHECK(bits == 8 || bits == 4, "quantize_dequantize_: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(),
              "quantize_dequantize_: out must be a contiguous 2-D [N, M] tensor, got ",
              out.sizes());
  const int64_t N = out.size(0), M = out.size(1);
  TORCH_CHECK(gs >= 1 && (bits == 8 || gs % 2 == 0),
              "quantize_dequantize_: group_size must be >= 1 (and even for int4), got ", gs);
  const int64_t C = bits == 8 ? M : (M + 1) / 2;
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
