// Fused client layers for NCHW fp32 on CPU: max-pool + ReLU (pool_relu_*) and local response norm
// across channels (lrn_*). Contracts and measured numbers: docs/layers.md.
//
// Why these exist: with one thread, torch 2.13's NCHW max_pool2d and LocalResponseNorm cost more
// than the convolutions of the small client CNNs (LRN fwd+bwd on (64,64,32,32): 379 ms; max_pool2d
// k3s2p1 fwd+bwd on the same: 85 ms). Both are memory-bound loops that, written plainly per plane
// (pool) or per block of pixels across all channels (LRN), run near memory speed.
//
// Threads: at::parallel_for, so torch.set_num_threads governs them like torch's own kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_nchw_f32(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ",
              t.scalar_type(), " with shape ", t.sizes());
  TORCH_CHECK(t.dim() == 4, op, ": ", arg, " must be 4-D NCHW, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous NCHW, got shape ", t.sizes(),
              " strides ", t.strides());
}

// =============================================================================================
// pool_relu: y = relu(max_pool2d(x, k, s, p)), -inf padding, floor output size (ceil_mode False).
//
// The argmax is an int32 flat index into the input plane (h * W + w), or -1 where the gradient is
// zero (y <= 0, or NaN: ReLU's backward passes gradient only where its input is > 0). So the
// backward needs neither x nor y. Ties: the first maximum in row-major window order wins (strict
// '>' while scanning), as in PyTorch's CPU max_pool2d.

// Exact reference scan of one plane, any k/s/p. Windows are clipped to the plane, which equals
// -inf padding (PyTorch requires p <= k/2, so no window is all padding). Also the NaN path:
// max_pool2d propagates NaN and relu(NaN) = NaN.
void pool_plane_general(const float* __restrict x, float* __restrict y, int32_t* __restrict idx,
                        int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t k, int64_t s,
                        int64_t p) {
  for (int64_t oy = 0; oy < Ho; ++oy) {
    const int64_t y0 = std::max<int64_t>(oy * s - p, 0);
    const int64_t y1 = std::min<int64_t>(oy * s - p + k, H);
    for (int64_t ox = 0; ox < Wo; ++ox) {
      const int64_t x0 = std::max<int64_t>(ox * s - p, 0);
      const int64_t x1 = std::min<int64_t>(ox * s - p + k, W);
      float m = kNegInf;
      int64_t mi = y0 * W + x0;
      bool nan = false;
      for (int64_t iy = y0; iy < y1; ++iy) {
        for (int64_t ix = x0; ix < x1; ++ix) {
          const float v = x[iy * W + ix];
          if (v > m) {
            m = v;
            mi = iy * W + ix;
          }
          nan |= (v != v);
        }
      }
      const int64_t o = oy * Wo + ox;
      if (nan) {
        y[o] = std::numeric_limits<float>::quiet_NaN();
        idx[o] = -1;
      } else if (m > 0.f) {
        y[o] = m;
        idx[o] = static_cast<int32_t>(mi);
      } else {
        y[o] = 0.f;
        idx[o] = -1;
      }
    }
  }
}

// Stride-2 windows of K = 2 or 3 (the models' k2s2p0 and k3s2p1), any padding p <= K/2.
// Separable, in the order that keeps a row-major scan's tie rule: for every padded input row, the
// first maximum along each window's K columns (smallest kx); then, down the window's K rows, the
// first row whose maximum is strictly larger (smallest ky). Each input row is copied into a
// -inf-bordered row buffer and split into even and odd columns, so cell kx of window ox is
// ev[ox + kx/2] or od[ox + kx/2]: contiguous reads. All loops run over Wo16 = Wo rounded up to
// 16 lanes (the extra lanes read -inf and are dropped), so they vectorize fully even for the
// models' odd widths (7, 15): with exact trip counts GCC ran Wo = 15 in its scalar epilogue.
// Measured on (64,64,32,32), 1 thread: a direct 3x3 scan per output 30 ms, this ~4 ms.
struct PoolScratch {
  std::vector<float> row, ev, od, hm, ty;
  std::vector<int32_t> hc, ti;
};

template <int K>
bool pool_plane_s2(const float* __restrict x, int64_t H, int64_t W, int64_t p, int64_t Ho,
                   int64_t Wo, float* __restrict y, int32_t* __restrict idx, PoolScratch& sc) {
  const int64_t Wo16 = (Wo + 15) / 16 * 16;
  const int64_t Wb = 2 * Wo16 + 2;     // row buffer: p cells of -inf, W values, -inf to the end
  const int64_t R = (Ho - 1) * 2 + K;  // padded rows the windows reach
  if (static_cast<int64_t>(sc.row.size()) != Wb || static_cast<int64_t>(sc.hm.size()) < R * Wo16) {
    sc.row.assign(Wb, kNegInf);
    sc.ev.assign(Wo16 + 1, kNegInf);
    sc.od.assign(Wo16 + 1, kNegInf);
    sc.hm.assign(R * Wo16, kNegInf);
    sc.hc.assign(R * Wo16, 0);
    sc.ty.assign(Wo16, 0.f);
    sc.ti.assign(Wo16, 0);
  }
  // Rows are copied to [p, p + W) only, so the -inf border survives; refilled per plane because a
  // previous plane of another call could have had a different p or W (it costs ~Wb stores).
  std::fill(sc.row.begin(), sc.row.end(), kNegInf);
  float* __restrict rb = sc.row.data();
  float* __restrict ev = sc.ev.data();
  float* __restrict od = sc.od.data();
  int nan = 0;
  for (int64_t r = 0; r < R; ++r) {
    float* __restrict mr = sc.hm.data() + r * Wo16;
    int32_t* __restrict cr = sc.hc.data() + r * Wo16;
    const int64_t iy = r - p;
    if (iy < 0 || iy >= H) {
      std::fill(mr, mr + Wo16, kNegInf);
      std::fill(cr, cr + Wo16, 0);
      continue;
    }
    const float* __restrict xr = x + iy * W;
    for (int64_t j = 0; j < W; ++j) {
      rb[p + j] = xr[j];
      nan |= (xr[j] != xr[j]);
    }
    for (int64_t j = 0; j <= Wo16; ++j) {
      ev[j] = rb[2 * j];
      od[j] = rb[2 * j + 1];
    }
    for (int64_t ox = 0; ox < Wo16; ++ox) {
      float m = ev[ox];
      int32_t c = static_cast<int32_t>(2 * ox - p);
      for (int kx = 1; kx < K; ++kx) {
        const float v = (kx % 2 == 0) ? ev[ox + kx / 2] : od[ox + kx / 2];
        const bool gt = v > m;
        c = gt ? static_cast<int32_t>(2 * ox + kx - p) : c;
        m = gt ? v : m;
      }
      mr[ox] = m;
      cr[ox] = c;
    }
  }
  if (nan) return true;  // the caller redoes the plane with the exact NaN-propagating scan
  const int32_t Wi = static_cast<int32_t>(W);
  float* __restrict ty = sc.ty.data();
  int32_t* __restrict ti = sc.ti.data();
  for (int64_t oy = 0; oy < Ho; ++oy) {
    const int64_t r0 = 2 * oy;
    const float* __restrict m0 = sc.hm.data() + r0 * Wo16;
    const int32_t* __restrict c0 = sc.hc.data() + r0 * Wo16;
    const int32_t row0 = static_cast<int32_t>((r0 - p) * W);
    for (int64_t ox = 0; ox < Wo16; ++ox) {
      float m = m0[ox];
      int32_t i = row0 + c0[ox];
      for (int ky = 1; ky < K; ++ky) {
        const float v = m0[ky * Wo16 + ox];
        const bool gt = v > m;
        i = gt ? row0 + ky * Wi + c0[ky * Wo16 + ox] : i;
        m = gt ? v : m;
      }
      const bool pos = m > 0.f;
      ty[ox] = pos ? m : 0.f;
      ti[ox] = pos ? i : -1;
    }
    std::copy(ty, ty + Wo, y + oy * Wo);
    std::copy(ti, ti + Wo, idx + oy * Wo);
  }
  return false;
}

void check_pool_args(const at::Tensor& x, int64_t k, int64_t s, int64_t p) {
  check_nchw_f32(x, "pool_relu", "x");
  TORCH_CHECK(k >= 1, "pool_relu: kernel_size must be >= 1, got ", k);
  TORCH_CHECK(s >= 1, "pool_relu: stride must be >= 1, got ", s);
  TORCH_CHECK(p >= 0 && 2 * p <= k, "pool_relu: padding must be in [0, kernel_size/2], got padding ",
              p, " for kernel_size ", k);
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * p >= k && W + 2 * p >= k, "pool_relu: input of shape ", x.sizes(),
              " is smaller than kernel_size ", k, " with padding ", p);
  TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max(),
              "pool_relu: plane of shape ", x.sizes(), " too large for int32 argmax");
}

std::tuple<at::Tensor, at::Tensor> pool_relu_fwd(const at::Tensor& x, int64_t k, int64_t s,
                                                 int64_t p) {
  check_pool_args(x, k, s, p);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * p - k) / s + 1;
  const int64_t Wo = (W + 2 * p - k) / s + 1;
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options());
  at::Tensor idx = at::empty({N, C, Ho, Wo}, x.options().dtype(at::kInt));
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  int32_t* id = idx.data_ptr<int32_t>();
  const int64_t planes = N * C;
  const bool k2s2 = (k == 2 && s == 2);
  const bool k3s2 = (k == 3 && s == 2);
  if (planes == 0 || Ho * Wo == 0) return {y, idx};
  const bool fixed = (k2s2 || k3s2);
  at::parallel_for(0, planes, 1, [&](int64_t b, int64_t e) {
    PoolScratch sc;
    for (int64_t pl = b; pl < e; ++pl) {
      const float* xi = xd + pl * H * W;
      float* yo = yd + pl * Ho * Wo;
      int32_t* io = id + pl * Ho * Wo;
      const bool nan = fixed && (k2s2 ? pool_plane_s2<2>(xi, H, W, p, Ho, Wo, yo, io, sc)
                                      : pool_plane_s2<3>(xi, H, W, p, Ho, Wo, yo, io, sc));
      if (!fixed || nan) pool_plane_general(xi, yo, io, H, W, Ho, Wo, k, s, p);
    }
  });
  return {y, idx};
}

// grad_x = scatter-add of grad_y at the saved argmax (skipping -1). Overlapping windows (k > s)
// may pick the same cell twice, hence '+='.
at::Tensor pool_relu_bwd(const at::Tensor& grad_y, const at::Tensor& idx, int64_t H, int64_t W) {
  check_nchw_f32(grad_y, "pool_relu_bwd", "grad_y");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.sizes() == grad_y.sizes(),
              "pool_relu_bwd: idx must be contiguous int32 of grad_y's shape ", grad_y.sizes(),
              ", got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK(H >= 1 && W >= 1, "pool_relu_bwd: input H, W must be >= 1, got ", H, ", ", W);
  const int64_t N = grad_y.size(0), C = grad_y.size(1);
  const int64_t So = grad_y.size(2) * grad_y.size(3);
  at::Tensor gx = at::empty({N, C, H, W}, grad_y.options());
  const float* g = grad_y.data_ptr<float>();
  const int32_t* id = idx.data_ptr<int32_t>();
  float* gd = gx.data_ptr<float>();
  const int64_t HW = H * W;
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      float* out = gd + pl * HW;
      std::fill(out, out + HW, 0.f);
      const float* gi = g + pl * So;
      const int32_t* ii = id + pl * So;
      for (int64_t o = 0; o < So; ++o) {
        const int32_t j = ii[o];
        if (j >= 0) out[j] += gi[o];
      }
    }
  });
  return gx;
}

// =============================================================================================
// lrn: PyTorch's LocalResponseNorm across channels, for NCHW fp32.
//   S_c = sum_{c' in [c - n/2, c + (n-1)/2] (valid channels only)} x_{c'}^2
//   s_c = (S_c / n) * alpha + k          (the order of torch's avg_pool3d, mul, add)
//   y_c = x_c * s_c^-beta
// Backward, with d = s^-beta (see docs/layers.md for the derivation):
//   dx_i = g_i d_i - (2 alpha beta / n) x_i sum_{j in [i - (n-1)/2, i + n/2]} g_j x_j d_j / s_j
// The forward returns s for the backward. Work is split into blocks of kBlock pixels of one
// sample across all channels, so the channel window runs over contiguous, vectorizable rows.

constexpr int64_t kBlock = 256;

enum class PowMode { k075, k05, k1, kGeneral };

PowMode pow_mode(double beta) {
  if (beta == 0.75) return PowMode::k075;
  if (beta == 0.5) return PowMode::k05;
  if (beta == 1.0) return PowMode::k1;
  return PowMode::kGeneral;
}

// d[i] = s[i]^-beta. beta 0.75 (the models' value) as 1 / (sqrt(s) * sqrt(sqrt(s))), beta 0.5 and
// 1 likewise from IEEE sqrt/div: the SIMD and scalar paths round identically. Intrinsics because
// GCC keeps std::sqrt scalar without -fno-math-errno (errno on negative input), and that scalar
// loop made the LRN forward ~4x slower. A general beta uses scalar powf (correct, slower).
template <int Mode>  // 0: beta 0.75, 1: beta 0.5, 2: beta 1
inline float neg_pow_scalar(float v) {
  if (Mode == 0) {
    const float r = std::sqrt(v);
    return 1.f / (r * std::sqrt(r));
  }
  if (Mode == 1) return 1.f / std::sqrt(v);
  return 1.f / v;
}

template <int Mode>
void neg_pow_simd(const float* __restrict s, float* __restrict d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(s + i);
    __m512 den;
    if (Mode == 0) {
      const __m512 r = _mm512_sqrt_ps(v);
      den = _mm512_mul_ps(r, _mm512_sqrt_ps(r));
    } else if (Mode == 1) {
      den = _mm512_sqrt_ps(v);
    } else {
      den = v;
    }
    _mm512_storeu_ps(d + i, _mm512_div_ps(one, den));
  }
#elif defined(__AVX__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(s + i);
    __m256 den;
    if (Mode == 0) {
      const __m256 r = _mm256_sqrt_ps(v);
      den = _mm256_mul_ps(r, _mm256_sqrt_ps(r));
    } else if (Mode == 1) {
      den = _mm256_sqrt_ps(v);
    } else {
      den = v;
    }
    _mm256_storeu_ps(d + i, _mm256_div_ps(one, den));
  }
#endif
  for (; i < n; ++i) d[i] = neg_pow_scalar<Mode>(s[i]);
}

void neg_pow(const float* __restrict s, float* __restrict d, int64_t n, PowMode mode, float beta) {
  switch (mode) {
    case PowMode::k075:
      neg_pow_simd<0>(s, d, n);
      break;
    case PowMode::k05:
      neg_pow_simd<1>(s, d, n);
      break;
    case PowMode::k1:
      neg_pow_simd<2>(s, d, n);
      break;
    case PowMode::kGeneral:
      for (int64_t i = 0; i < n; ++i) d[i] = std::pow(s[i], -beta);
      break;
  }
}

void check_lrn_args(int64_t size, double alpha, double beta, double k) {
  TORCH_CHECK(size >= 1, "lrn: size must be >= 1, got ", size);
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(beta) && std::isfinite(k),
              "lrn: alpha, beta, k must be finite, got ", alpha, ", ", beta, ", ", k);
}

std::tuple<at::Tensor, at::Tensor> lrn_fwd(const at::Tensor& x, int64_t size, double alpha,
                                           double beta, double k) {
  check_nchw_f32(x, "lrn", "x");
  check_lrn_args(size, alpha, beta, k);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor y = at::empty_like(x);
  at::Tensor s = at::empty_like(x);
  if (x.numel() == 0) return {y, s};
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  float* sd = s.data_ptr<float>();
  const int64_t lo = size / 2, hi = (size - 1) / 2;
  const float nf = static_cast<float>(size), af = static_cast<float>(alpha),
              kf = static_cast<float>(k), bf = static_cast<float>(beta);
  const PowMode mode = pow_mode(beta);
  const int64_t nblk = (HW + kBlock - 1) / kBlock;
  at::parallel_for(0, N * nblk, 1, [&](int64_t b, int64_t e) {
    alignas(64) float acc[kBlock];
    alignas(64) float dd[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, p0 = (t % nblk) * kBlock;
      const int64_t len = std::min(kBlock, HW - p0);
      const int64_t off = n * C * HW + p0;
      for (int64_t c = 0; c < C; ++c) {
        std::fill(acc, acc + len, 0.f);
        const int64_t c0 = std::max<int64_t>(c - lo, 0), c1 = std::min<int64_t>(c + hi, C - 1);
        for (int64_t cc = c0; cc <= c1; ++cc) {
          const float* __restrict xr = xd + off + cc * HW;
          for (int64_t i = 0; i < len; ++i) acc[i] += xr[i] * xr[i];
        }
        float* __restrict sr = sd + off + c * HW;
        for (int64_t i = 0; i < len; ++i) sr[i] = (acc[i] / nf) * af + kf;
        neg_pow(sr, dd, len, mode, bf);
        const float* __restrict xr = xd + off + c * HW;
        float* __restrict yr = yd + off + c * HW;
        for (int64_t i = 0; i < len; ++i) yr[i] = xr[i] * dd[i];
      }
    }
  });
  return {y, s};
}

at::Tensor lrn_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& s,
                   int64_t size, double alpha, double beta, double k) {
  check_nchw_f32(grad_y, "lrn_bwd", "grad_y");
  check_nchw_f32(x, "lrn_bwd", "x");
  check_nchw_f32(s, "lrn_bwd", "s");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && s.sizes() == x.sizes(),
              "lrn_bwd: grad_y, x, s must share one shape, got ", grad_y.sizes(), ", ", x.sizes(),
              ", ", s.sizes());
  check_lrn_args(size, alpha, beta, k);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  const float* gd = grad_y.data_ptr<float>();
  const float* xd = x.data_ptr<float>();
  const float* sd = s.data_ptr<float>();
  float* od = gx.data_ptr<float>();
  // y_j = x_j * s_j^-beta depends on x_i for the j whose window holds i: j in [i - hi, i + lo]
  const int64_t lo = size / 2, hi = (size - 1) / 2;
  const float coef = static_cast<float>(2.0 * alpha * beta / static_cast<double>(size));
  const float bf = static_cast<float>(beta);
  const PowMode mode = pow_mode(beta);
  const int64_t nblk = (HW + kBlock - 1) / kBlock;
  at::parallel_for(0, N * nblk, 1, [&](int64_t b, int64_t e) {
    // d and t = g * x * d / s for one block, all channels
    std::vector<float> dbuf(C * kBlock), tbuf(C * kBlock);
    alignas(64) float acc[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, p0 = (t % nblk) * kBlock;
      const int64_t len = std::min(kBlock, HW - p0);
      const int64_t off = n * C * HW + p0;
      for (int64_t c = 0; c < C; ++c) {
        const float* __restrict sr = sd + off + c * HW;
        const float* __restrict xr = xd + off + c * HW;
        const float* __restrict gr = gd + off + c * HW;
        float* __restrict dr = dbuf.data() + c * kBlock;
        float* __restrict tr = tbuf.data() + c * kBlock;
        neg_pow(sr, dr, len, mode, bf);
        for (int64_t i = 0; i < len; ++i) tr[i] = gr[i] * xr[i] * dr[i] / sr[i];
      }
      for (int64_t c = 0; c < C; ++c) {
        std::fill(acc, acc + len, 0.f);
        const int64_t j0 = std::max<int64_t>(c - hi, 0), j1 = std::min<int64_t>(c + lo, C - 1);
        for (int64_t j = j0; j <= j1; ++j) {
          const float* __restrict tr = tbuf.data() + j * kBlock;
          for (int64_t i = 0; i < len; ++i) acc[i] += tr[i];
        }
        const float* __restrict xr = xd + off + c * HW;
        const float* __restrict gr = gd + off + c * HW;
        const float* __restrict dr = dbuf.data() + c * kBlock;
        float* __restrict outr = od + off + c * HW;
        for (int64_t i = 0; i < len; ++i) outr[i] = gr[i] * dr[i] - coef * xr[i] * acc[i];
      }
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def("pool_relu_fwd(Tensor x, int kernel_size, int stride, int padding) -> (Tensor, Tensor)");
  m.def("pool_relu_bwd(Tensor grad_y, Tensor idx, int H, int W) -> Tensor");
  m.def("lrn_fwd(Tensor x, int size, float alpha, float beta, float k) -> (Tensor, Tensor)");
  m.def("lrn_bwd(Tensor grad_y, Tensor x, Tensor s, int size, float alpha, float beta, float k)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) {
  m.impl("pool_relu_fwd", &pool_relu_fwd);
  m.impl("pool_relu_bwd", &pool_relu_bwd);
  m.impl("lrn_fwd", &lrn_fwd);
  m.impl("lrn_bwd", &lrn_bwd);
}
