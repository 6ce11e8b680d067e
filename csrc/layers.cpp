// Fused client layers for NCHW fp32 on CPU: max-pool + ReLU (pool_relu_*; also bfloat16) and local
// response norm across channels (lrn_*, fp32). Contracts and measured numbers: docs/layers.md.
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
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A contiguous NCHW CPU tensor of float32 (or also bfloat16 where ``bf16_ok``).
void check_nchw(const at::Tensor& t, const char* op, const char* arg, bool bf16_ok = false) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (bf16_ok && t.scalar_type() == at::kBFloat16), op, ": ",
              arg, " must be float32", bf16_ok ? " or bfloat16" : "", ", got ", t.scalar_type(),
              " with shape ", t.sizes());
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

// Stride-2 windows of K = 2 or 3, any padding p <= K/2, one plane at a time: the path for shapes
// the flat multi-plane path below does not take (odd H or W, k2s2p1, k3s2p0). Separable, in the
// order that keeps a row-major scan's tie rule: for every padded input row, the first maximum
// along each window's K columns (smallest kx); then, down the window's K rows, the first row whose
// maximum is strictly larger (smallest ky). Each input row is split into even and odd padded
// columns, so cell kx of window ox is ev[ox + kx/2] or od[ox + kx/2]: contiguous reads. Loops run
// over Wo16 = Wo rounded up to 8 or 16 lanes (extra lanes read -inf and are dropped): with exact
// trip counts GCC ran widths like 15 in its scalar epilogue. Measured on (64,64,32,32) k3s2p1,
// 1 thread: a direct 3x3 scan per output 30 ms, this ~4 ms, the flat path 1.8 ms.
struct PoolScratch {
  std::vector<float> ev, od, hm, ty;
  std::vector<int32_t> hc, ti;
};

template <int K>
bool pool_plane_s2(const float* __restrict x, int64_t H, int64_t W, int64_t p, int64_t Ho,
                   int64_t Wo, float* __restrict y, int32_t* __restrict idx, PoolScratch& sc) {
  // 8 lanes suffice for Wo <= 8 (simple_conv 16x16 -> 8): GCC runs those in its 32-byte loop.
  const int64_t Wo16 = Wo <= 8 ? 8 : (Wo + 15) / 16 * 16;
  const int64_t R = (Ho - 1) * 2 + K;  // padded rows the windows reach
  // Padded column q = 2j (even) or 2j + 1 (odd) is input column q - p. The valid j ranges are
  // written per row straight from x; cells outside stay -inf (set here, once per plane).
  const int64_t e_lo = (p + 1) / 2, e_hi = std::min<int64_t>((W - 1 + p) / 2 + 1, Wo16 + 1);
  const int64_t o_lo = p / 2;
  const int64_t o_hi = W - 2 + p < 0 ? 0 : std::min<int64_t>((W - 2 + p) / 2 + 1, Wo16 + 1);
  if (static_cast<int64_t>(sc.ev.size()) != Wo16 + 1 ||
      static_cast<int64_t>(sc.hm.size()) < R * Wo16) {
    sc.ev.resize(Wo16 + 1);
    sc.od.resize(Wo16 + 1);
    sc.hm.resize(R * Wo16);
    sc.hc.resize(R * Wo16);
    sc.ty.resize(Wo16);
    sc.ti.resize(Wo16);
  }
  float* __restrict ev = sc.ev.data();
  float* __restrict od = sc.od.data();
  std::fill(ev, ev + Wo16 + 1, kNegInf);
  std::fill(od, od + Wo16 + 1, kNegInf);
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
    for (int64_t j = e_lo; j < e_hi; ++j) {
      const float v = xr[2 * j - p];
      ev[j] = v;
      nan |= (v != v);
    }
    for (int64_t j = o_lo; j < o_hi; ++j) {
      const float v = xr[2 * j + 1 - p];
      od[j] = v;
      nan |= (v != v);
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

// One column of the vertical pass: the first maximum of rows a, b (and c3) and its flat index.
// Returns 1 if any of the cells is NaN.
template <bool Three>
inline int vmax_cell(const float* __restrict a, const float* __restrict b,
                     const float* __restrict c3, float* __restrict mr, int32_t* __restrict ir,
                     int32_t i0, int32_t Wi, int64_t c) {
  float m = a[c];
  int bad = (m != m);
  int32_t i = i0 + static_cast<int32_t>(c);
  const float v1 = b[c];
  bad |= (v1 != v1);
  const bool g1 = v1 > m;
  i = g1 ? i0 + Wi + static_cast<int32_t>(c) : i;
  m = g1 ? v1 : m;
  if (Three) {
    const float v2 = c3[c];
    bad |= (v2 != v2);
    const bool g2 = v2 > m;
    i = g2 ? i0 + 2 * Wi + static_cast<int32_t>(c) : i;
    m = g2 ? v2 : m;
  }
  mr[c] = m;
  ir[c] = i;
  return bad;
}

// The vertical pass of one output row over n columns. With blocks16 (n a multiple of 16) the loop is
// blocks of 16 lanes, one AVX-512 vector each, with no scalar remainder: at the models' widths
// (14, 28) GCC's exact-count loop spent most of its time in the scalar epilogue. The extra columns
// read past the row (into the next rows of x) and write past it into vm, which the next row then
// overwrites.
template <bool Three>
inline int vmax_row(const float* __restrict a, const float* __restrict b,
                    const float* __restrict c3, float* __restrict mr, int32_t* __restrict ir,
                    int32_t i0, int32_t Wi, int64_t n, bool blocks16) {
  int bad = 0;
  if (blocks16) {
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
      // omp simd: without it GCC unrolled the 16 lanes into scalar code (4x slower)
#pragma omp simd reduction(| : bad)
      for (int64_t l = 0; l < 16; ++l) bad |= vmax_cell<Three>(a, b, c3, mr, ir, i0, Wi, c0 + l);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) bad |= vmax_cell<Three>(a, b, c3, mr, ir, i0, Wi, c);
  }
  return bad;
}

// The models' two configurations on even H, W (cnn: 28, 14; simple_conv: 32, 16), many planes at
// once. Per-plane loops ran at trip counts of 7-16, where loop overhead dominated: (64,64,16,16)
// k3s2p1 took 1.7 ms forward with pool_plane_s2, 0.55 ms here. The window is taken vertical
// first, so the horizontal pass is one flat loop over all outputs of G planes: with W = 2 Wo,
// cell kx of output u (= q Wo + ox, q = plane-row) is column 2u + kx - p of the vertical-max rows
// vm (row stride W). Ties: among equal maxima the smallest flat input index wins, which is the
// first one in row-major scan order (what torch picks); the vertical pass keeps the first row per
// column, the horizontal pass compares (value, index). For p = 1, cell kx = 0 of ox = 0 is
// padding; the flat loop reads the previous row's last column there, so those outputs are redone
// after it.
template <int K>
bool pool_planes_flat(const float* __restrict x, const float* x_end, int64_t P, int64_t H,
                      int64_t W, float* __restrict y, int32_t* __restrict idx,
                      std::vector<float>& vm_buf, std::vector<int32_t>& vi_buf) {
  constexpr int64_t p = (K == 3) ? 1 : 0;
  const int64_t Ho = H / 2, Wo = W / 2, Q = P * Ho;
  const int64_t W16 = (W + 15) / 16 * 16;
  if (static_cast<int64_t>(vm_buf.size()) < Q * W + 1 + W16) {
    vm_buf.resize(Q * W + 1 + W16);
    vi_buf.resize(Q * W + 1 + W16);
  }
  float* __restrict vm = vm_buf.data() + 1;  // vm[-1]: guard read by u = 0 when p = 1
  int32_t* __restrict vi = vi_buf.data() + 1;
  vm[-1] = kNegInf;
  vi[-1] = 0;
  const int32_t Wi = static_cast<int32_t>(W);
  int nan = 0;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t oy = q % Ho;
    const float* __restrict xp = x + (q / Ho) * H * W;
    const int64_t top = 2 * oy - p;  // first window row; -1 only for p = 1, oy = 0
    const int ky0 = top < 0 ? 1 : 0;
    const int64_t r0 = top + ky0;
    const float* a = xp + r0 * W;
    const float* b = a + W;
    const int32_t i0 = static_cast<int32_t>(r0 * W);
    // Rows r0, r0 + 1 and, for K = 3 without top padding, r0 + 2 (never below H: with H even,
    // 2 (Ho - 1) - p + K - 1 <= H - 1).
    const bool three = (K == 3 && ky0 == 0);
    const float* last = three ? b + W : b;
    const bool blocks = last + W16 <= x_end;  // the 16-lane over-read stays inside x
    const int64_t n = blocks ? W16 : W;
    // Every input cell is in some window row here, so this sees every NaN of these planes (the
    // over-read may also see one of the next planes: then only speed is lost).
    nan |= three ? vmax_row<true>(a, b, b + W, vm + q * W, vi + q * W, i0, Wi, n, blocks)
                 : vmax_row<false>(a, b, b, vm + q * W, vi + q * W, i0, Wi, n, blocks);
  }
  if (nan) return true;  // the caller redoes these planes with the exact NaN-propagating scan
  const int64_t U = Q * Wo;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t base = 2 * u - p;
    float m = vm[base];
    int32_t i = vi[base];
    const float v1 = vm[base + 1];
    const int32_t j1 = vi[base + 1];
    const bool g1 = (v1 > m) | ((v1 == m) & (j1 < i));
    i = g1 ? j1 : i;
    m = g1 ? v1 : m;
    if (K == 3) {
      const float v2 = vm[base + 2];
      const int32_t j2 = vi[base + 2];
      const bool g2 = (v2 > m) | ((v2 == m) & (j2 < i));
      i = g2 ? j2 : i;
      m = g2 ? v2 : m;
    }
    const bool pos = m > 0.f;
    y[u] = pos ? m : 0.f;
    idx[u] = pos ? i : -1;
  }
  if (p == 1) {
    for (int64_t q = 0; q < Q; ++q) {
      const float* mr = vm + q * W;
      const int32_t* ir = vi + q * W;
      float m = mr[0];
      int32_t i = ir[0];
      for (int kx = 1; kx < K - 1; ++kx) {
        const bool gt = (mr[kx] > m) | ((mr[kx] == m) & (ir[kx] < i));
        i = gt ? ir[kx] : i;
        m = gt ? mr[kx] : m;
      }
      const bool pos = m > 0.f;
      y[q * Wo] = pos ? m : 0.f;
      idx[q * Wo] = pos ? i : -1;
    }
  }
  return false;
}

void check_pool_args(const at::Tensor& x, int64_t k, int64_t s, int64_t p) {
  check_nchw(x, "pool_relu", "x", true);
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

struct PoolShape {
  int64_t H, W, Ho, Wo, k, s, p;
  bool k2s2, fixed, flat;
};

// P consecutive planes of fp32 input (x .. x_end: the flat path may over-read up to x_end) into
// y / idx, by the flat multi-plane path or plane by plane.
void pool_group(const float* x, const float* x_end, int64_t P, const PoolShape& sh, float* y,
                int32_t* idx, std::vector<float>& vm, std::vector<int32_t>& vi, PoolScratch& sc) {
  const int64_t HW = sh.H * sh.W, So = sh.Ho * sh.Wo;
  if (sh.flat) {
    const bool nan = sh.k2s2 ? pool_planes_flat<2>(x, x_end, P, sh.H, sh.W, y, idx, vm, vi)
                             : pool_planes_flat<3>(x, x_end, P, sh.H, sh.W, y, idx, vm, vi);
    if (nan) {
      for (int64_t j = 0; j < P; ++j)
        pool_plane_general(x + j * HW, y + j * So, idx + j * So, sh.H, sh.W, sh.Ho, sh.Wo, sh.k,
                           sh.s, sh.p);
    }
    return;
  }
  for (int64_t j = 0; j < P; ++j) {
    const float* xi = x + j * HW;
    float* yo = y + j * So;
    int32_t* io = idx + j * So;
    const bool nan = sh.fixed && (sh.k2s2 ? pool_plane_s2<2>(xi, sh.H, sh.W, sh.p, sh.Ho, sh.Wo, yo, io, sc)
                                          : pool_plane_s2<3>(xi, sh.H, sh.W, sh.p, sh.Ho, sh.Wo, yo, io, sc));
    if (!sh.fixed || nan) pool_plane_general(xi, yo, io, sh.H, sh.W, sh.Ho, sh.Wo, sh.k, sh.s, sh.p);
  }
}

std::tuple<at::Tensor, at::Tensor> pool_relu_fwd(const at::Tensor& x, int64_t k, int64_t s,
                                                 int64_t p) {
  check_pool_args(x, k, s, p);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * p - k) / s + 1;
  const int64_t Wo = (W + 2 * p - k) / s + 1;
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options());
  at::Tensor idx = at::empty({N, C, Ho, Wo}, x.options().dtype(at::kInt));
  int32_t* id = idx.data_ptr<int32_t>();
  const int64_t planes = N * C;
  PoolShape sh{H, W, Ho, Wo, k, s, p, k == 2 && s == 2, false, false};
  sh.fixed = sh.k2s2 || (k == 3 && s == 2);
  sh.flat = ((sh.k2s2 && p == 0) || (k == 3 && s == 2 && p == 1)) && H % 2 == 0 && W % 2 == 0;
  if (planes == 0 || Ho * Wo == 0) return {y, idx};
  const int64_t HW = H * W, So = Ho * Wo;
  // planes per group: ~16K floats of vertical maxima (64 KB + 64 KB of indices, in L2) for the
  // flat path; one plane at a time otherwise
  const int64_t G = sh.flat ? std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (H / 2) * W)) : 1;
  const int64_t groups = (planes + G - 1) / G;
  if (x.scalar_type() == at::kFloat) {
    const float* xd = x.data_ptr<float>();
    float* yd = y.data_ptr<float>();
    const float* x_end = xd + x.numel();
    at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
      std::vector<float> vm;
      std::vector<int32_t> vi;
      PoolScratch sc;
      for (int64_t gi = b; gi < e; ++gi) {
        const int64_t pl0 = gi * G, P = std::min(G, planes - pl0);
        pool_group(xd + pl0 * HW, x_end, P, sh, yd + pl0 * So, id + pl0 * So, vm, vi, sc);
      }
    });
    return {y, idx};
  }
  // bfloat16 (the fused engine under --precision bf16): each group is widened into an fp32
  // buffer (exact) and pooled by the fp32 code; the maxima are bf16 values, so narrowing y back
  // is exact too. Groups of at least ~4K input values keep the buffers in L1/L2.
  const int64_t Gb = std::max<int64_t>(G, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, HW)));
  const int64_t groups_b = (planes + Gb - 1) / Gb;
  const at::BFloat16* xd = x.data_ptr<at::BFloat16>();
  at::BFloat16* yd = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, groups_b, 1, [&](int64_t b, int64_t e) {
    std::vector<float> vm, xb, yb;
    std::vector<int32_t> vi;
    PoolScratch sc;
    for (int64_t gi = b; gi < e; ++gi) {
      const int64_t pl0 = gi * Gb, P = std::min(Gb, planes - pl0);
      const int64_t n = P * HW, pad = (W + 15) / 16 * 16 + 16;  // the flat path's over-read
      xb.assign(n + pad, 0.f);
      yb.resize(P * So);
      const at::BFloat16* src = xd + pl0 * HW;
      for (int64_t i = 0; i < n; ++i) xb[i] = static_cast<float>(src[i]);
      for (int64_t j = 0; j < P; j += G) {
        const int64_t Pj = std::min(G, P - j);
        pool_group(xb.data() + j * HW, xb.data() + n + pad, Pj, sh, yb.data() + j * So,
                   id + (pl0 + j) * So, vm, vi, sc);
      }
      at::BFloat16* dst = yd + pl0 * So;
      for (int64_t i = 0; i < P * So; ++i) dst[i] = static_cast<at::BFloat16>(yb[i]);
    }
  });
  return {y, idx};
}

// grad_x = scatter-add of grad_y at the saved argmax (skipping -1). Overlapping windows (k > s)
// may pick the same cell twice, hence '+='. bfloat16 gradients are summed in fp32 per plane and
// rounded once.
at::Tensor pool_relu_bwd(const at::Tensor& grad_y, const at::Tensor& idx, int64_t H, int64_t W) {
  check_nchw(grad_y, "pool_relu_bwd", "grad_y", true);
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.sizes() == grad_y.sizes(),
              "pool_relu_bwd: idx must be contiguous int32 of grad_y's shape ", grad_y.sizes(),
              ", got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK(H >= 1 && W >= 1, "pool_relu_bwd: input H, W must be >= 1, got ", H, ", ", W);
  const int64_t N = grad_y.size(0), C = grad_y.size(1);
  const int64_t So = grad_y.size(2) * grad_y.size(3);
  at::Tensor gx = at::empty({N, C, H, W}, grad_y.options());
  const int32_t* id = idx.data_ptr<int32_t>();
  const int64_t HW = H * W;
  auto scatter = [&](auto zero) {  // scalar_t: float or at::BFloat16 (checked above)
    using scalar_t = decltype(zero);
    const scalar_t* g = grad_y.data_ptr<scalar_t>();
    scalar_t* gd = gx.data_ptr<scalar_t>();
    constexpr bool f32 = std::is_same_v<scalar_t, float>;
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> buf(f32 ? 0 : HW);  // bf16: the plane's sums in fp32, rounded once
      for (int64_t pl = b; pl < e; ++pl) {
        // zeroing per plane keeps it in L1 for the scatter (one fill per chunk measured slower)
        float* __restrict acc;
        if constexpr (f32)
          acc = gd + pl * HW;
        else
          acc = buf.data();
        std::fill(acc, acc + HW, 0.f);
        const scalar_t* __restrict gi = g + pl * So;
        const int32_t* __restrict ii = id + pl * So;
        for (int64_t o = 0; o < So; ++o) {
          // one unsigned compare skips -1 and keeps a foreign idx tensor from writing out of
          // bounds (a branch-free form, adding 0 to cell 0, measured 20-50% slower: a store
          // chain on cell 0)
          const int32_t j = ii[o];
          if (static_cast<uint64_t>(static_cast<int64_t>(j)) < static_cast<uint64_t>(HW))
            acc[j] += static_cast<float>(gi[o]);
        }
        if constexpr (!f32) {
          scalar_t* __restrict out = gd + pl * HW;
          for (int64_t i = 0; i < HW; ++i) out[i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });
  };
  if (grad_y.scalar_type() == at::kFloat)
    scatter(0.f);
  else
    scatter(at::BFloat16(0.f));
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
// loop made the LRN forward ~3x slower (37 vs 13 ms on (64,64,32,32)). A general beta uses
// scalar powf (correct, slower).
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
  check_nchw(x, "lrn", "x");
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
  check_nchw(grad_y, "lrn_bwd", "grad_y");
  check_nchw(x, "lrn_bwd", "x");
  check_nchw(s, "lrn_bwd", "s");
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
