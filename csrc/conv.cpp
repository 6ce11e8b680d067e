// Fused "conv -> ReLU -> max-pool" block of the small client CNNs, NCHW fp32 on CPU:
//   y = max_pool2d(relu(conv2d(x, w, b, stride 1, padding K/2)), pk, ps, pp)
// with square odd kernels K (the "same" convolutions of cnn and simple_conv). Contract and
// measurements: docs/layers.md ("conv_pool_relu").
//
// Why: after the pool/LRN kernels (layers.cpp), torch's convolutions are most of a fused client
// iteration on one thread, and the first convolution (Cin = 1 or 3) runs at 4-40 GFLOP/s in oneDNN.
// Two things make this block cheaper than conv + relu + pool done separately:
//   1. forward: a register-blocked direct convolution on a padded channels-last copy of the input
//      (16-channel vector lanes over Cout), relu and pooling done from an L2-resident per-sample
//      buffer, so the full-resolution activation never reaches memory;
//   2. backward: the pool routes each output's gradient to one conv cell (or none where the window
//      max is <= 0), so the conv's output gradient has at most one nonzero per pooling window
//      (1 in 4 for 2x2 pools). The weight and input gradients are accumulated from those nonzeros
//      only: K rows of K*Cin contiguous floats per nonzero, instead of dense convolutions.
//
// Saved for backward: the int32 argmax (h * W + w in the conv output plane, -1 where the gradient is
// zero: window max <= 0 or NaN, as pool_relu in layers.cpp) and the padded channels-last input.
//
// Summation order differs from oneDNN's, so results agree with torch to rounding (tests bound it).
// Threads: at::parallel_for (forward and input gradient over samples, weight gradient over output
// channels: each thread owns its outputs, so results do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// 16 fp32 lanes (one AVX-512 register; GCC lowers it to two AVX2 registers etc. elsewhere)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
constexpr int64_t L = 16;

inline v16 ld(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void st(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
inline v16 splat(float s) { return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

struct Geo {
  int64_t N, Ci, H, W, Co, K, q, Hp, Wp, CoP;  // q = K / 2, Hp = H + 2q, CoP = Co rounded up to 16
  int64_t G;                                   // weight groups: sample n uses group n / (N / G)
  int64_t pk, ps, pp, Ho, Wo;
};

// Output positions are numbered over the padded width: p = h * Wp + w for w in [0, Wp). Patches
// of consecutive positions then start Ci floats apart with no row breaks, so every block of WB
// positions is uniform; positions with w >= W (their patches wrap into the next row) are computed
// and never read. That wastes 2q / Wp of the work (7-13% here) and removes all tail handling. The
// padded input and the per-sample buffer carry slack so the last block may read/write past the end.
constexpr int64_t kWBMax = 24;

// acc[j][c] for positions p0 + j (j < WB), channel chunks cb + c (c < NC):
//   bias + sum_{kh, t < K*Ci} xp[p0 + j + kh * Wp][t] * wf[kh][t][chunk]   (t = kw * Ci + ci)
// CI > 0 fixes Ci at compile time (then the WB patch offsets j * Ci are constants, not WB live
// registers); CI = 0 reads it from Ci.
template <int NC, int WB, int CI>
inline void conv_block(const float* __restrict xr0, const float* __restrict wf,
                       const float* __restrict bias, float* __restrict out, int64_t Ci_, int64_t K,
                       int64_t Wp, int64_t CoP, int64_t cb) {
  const int64_t Ci = CI > 0 ? CI : Ci_;
  // every loop over j and c is unrolled so that acc stays in registers (GCC otherwise keeps a
  // 24 x 1 block on the stack: conv1 of the cnn ran at a quarter of the FMA rate)
  v16 acc[WB][NC];
#pragma GCC unroll 32
  for (int c = 0; c < NC; ++c) {
    const v16 b = ld(bias + (cb + c) * L);
#pragma GCC unroll 32
    for (int j = 0; j < WB; ++j) acc[j][c] = b;
  }
  const int64_t KC = K * Ci;
  for (int64_t kh = 0; kh < K; ++kh) {
    const float* __restrict xr = xr0 + kh * Wp * Ci;
    const float* __restrict wk = wf + kh * KC * CoP + cb * L;
    for (int64_t t = 0; t < KC; ++t) {
      v16 wv[NC];
#pragma GCC unroll 32
      for (int c = 0; c < NC; ++c) wv[c] = ld(wk + t * CoP + c * L);
#pragma GCC unroll 32
      for (int j = 0; j < WB; ++j) {
        const v16 s = splat(xr[j * Ci + t]);
#pragma GCC unroll 32
        for (int c = 0; c < NC; ++c) acc[j][c] += s * wv[c];
      }
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < WB; ++j)
#pragma GCC unroll 32
    for (int c = 0; c < NC; ++c) st(out + j * CoP + (cb + c) * L, acc[j][c]);
}

// ROWS = false: blocks of WB consecutive positions over the padded width (see above). ROWS = true
// (W a multiple of WB): blocks within each row only, so the 2q junk columns per row are not
// computed (12.5% of the cnn's second convolution). Each output is the same sum in the same
// order either way.
template <int NC, int WB, bool ROWS>
void conv_chunks(const float* xp_n, const float* wf, const float* bias, float* tmp, const Geo& g,
                 int64_t cb) {
  const int64_t P = g.H * g.Wp;
  auto run = [&](auto ci) {
    constexpr int CI = decltype(ci)::value;
    auto block = [&](int64_t p0) {
      conv_block<NC, WB, CI>(xp_n + p0 * g.Ci, wf, bias, tmp + p0 * g.CoP, g.Ci, g.K, g.Wp, g.CoP, cb);
    };
    if (ROWS) {
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w0 = 0; w0 < g.W; w0 += WB) block(h * g.Wp + w0);
    } else {
      for (int64_t p0 = 0; p0 < P; p0 += WB) block(p0);
    }
  };
  if (g.Ci == 1)
    run(std::integral_constant<int, 1>{});
  else if (g.Ci == 3)
    run(std::integral_constant<int, 3>{});
  else
    run(std::integral_constant<int, 0>{});
}

// NC chunks of 16 output channels: row blocks of RA (or else RB) positions when one divides W,
// otherwise WP positions over the padded width (RA / RB = 0: no such row block)
template <int NC, int RA, int RB, int WP>
void conv_chunks_pick(const float* xp_n, const float* wf, const float* bias, float* tmp,
                      const Geo& g, int64_t cb) {
  if constexpr (RA > 0) {
    if (g.W % RA == 0) return conv_chunks<NC, RA, true>(xp_n, wf, bias, tmp, g, cb);
  }
  if constexpr (RB > 0) {
    if (g.W % RB == 0) return conv_chunks<NC, RB, true>(xp_n, wf, bias, tmp, g, cb);
  }
  conv_chunks<NC, WP, false>(xp_n, wf, bias, tmp, g, cb);
}

// conv output of one sample into tmp [H * Wp (+ slack)][CoP] (channels-last, L2-sized)
void conv_sample(const float* xp_n, const float* wf, const float* bias, float* tmp, const Geo& g) {
  const int64_t chunks = g.CoP / L;
  int64_t cb = 0;
  while (cb < chunks) {
    const int64_t left = chunks - cb;
    if (left >= 4) {
      conv_chunks_pick<4, 4, 0, 6>(xp_n, wf, bias, tmp, g, cb);
      cb += 4;
    } else if (left >= 2) {
      conv_chunks_pick<2, 7, 8, 12>(xp_n, wf, bias, tmp, g, cb);
      cb += 2;
    } else {
      conv_chunks_pick<1, 14, 16, 24>(xp_n, wf, bias, tmp, g, cb);
      cb += 1;
    }
  }
}

// relu(max_pool) of tmp into y / idx of sample n, 16 channels at a time. Windows are clipped to
// the plane (= -inf padding); the first maximum in row-major window order wins (strict '>'), as in
// torch's CPU max_pool2d; a NaN anywhere in the window gives NaN with idx -1. idx holds the
// winning cell as h * Wp + w (padded row stride: the offset of its patch in xp, in pixels).
void pool_sample(const float* tmp, float* y_n, int32_t* idx_n, const Geo& g, float* ys,
                 int32_t* is, bool cl) {
  const int64_t So = g.Ho * g.Wo;
  const float ninf = -std::numeric_limits<float>::infinity();
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  const bool full2 = g.pk == 2, full3 = g.pk == 3;
  for (int64_t cb = 0; cb < g.CoP / L; ++cb) {
    const int64_t nl = std::min<int64_t>(L, g.Co - cb * L);
    // results of 16 channels go to channels-last staging ys/is [So][16] (vector stores), then
    // one transposing pass writes the NCHW planes (cheaper than extracting lanes one by one)
    for (int64_t oy = 0; oy < g.Ho; ++oy) {
      const int64_t y0 = std::max<int64_t>(oy * g.ps - g.pp, 0);
      const int64_t y1 = std::min<int64_t>(oy * g.ps - g.pp + g.pk, g.H);
      for (int64_t ox = 0; ox < g.Wo; ++ox) {
        const int64_t x0 = std::max<int64_t>(ox * g.ps - g.pp, 0);
        const int64_t x1 = std::min<int64_t>(ox * g.ps - g.pp + g.pk, g.W);
        v16 m = splat(ninf);
        i16 mi = i16{} + static_cast<int32_t>(y0 * g.Wp + x0);
        i16 bad = i16{};
        const float* base = tmp + cb * L;
        auto visit = [&](int64_t iy, int64_t ix) {
          const int32_t cell = static_cast<int32_t>(iy * g.Wp + ix);
          const v16 v = ld(base + cell * g.CoP);
          const i16 gt = v > m;
          m = gt ? v : m;
          mi = gt ? (i16{} + cell) : mi;
          bad |= (v != v);
        };
        if (full2 && y1 - y0 == 2 && x1 - x0 == 2) {  // unrolled 2x2 window (cnn)
          visit(y0, x0); visit(y0, x0 + 1); visit(y0 + 1, x0); visit(y0 + 1, x0 + 1);
        } else if (full3 && y1 - y0 == 3 && x1 - x0 == 3) {  // unrolled 3x3 window (simple_conv)
          for (int dy = 0; dy < 3; ++dy) {
            visit(y0 + dy, x0); visit(y0 + dy, x0 + 1); visit(y0 + dy, x0 + 2);
          }
        } else {
          for (int64_t iy = y0; iy < y1; ++iy)
            for (int64_t ix = x0; ix < x1; ++ix) visit(iy, ix);
        }
        const i16 pos = (m > splat(0.f)) & ~bad;
        const v16 yv = bad ? splat(qnan) : (pos ? m : splat(0.f));
        const i16 iv = pos ? mi : (i16{} - 1);
        const int64_t o = oy * g.Wo + ox;
        std::memcpy(ys + o * L, &yv, sizeof(yv));
        std::memcpy(is + o * L, &iv, sizeof(iv));
      }
    }
    // idx is always NCHW (the backward reads it per channel); y is NCHW, or channels-last rows
    // of Co channels per position when the next conv block consumes it (cl)
    if (cl)
      for (int64_t o = 0; o < So; ++o) {
        std::memcpy(y_n + o * g.Co + cb * L, ys + o * L, nl * sizeof(float));
        if (idx_n) std::memcpy(idx_n + o * g.Co + cb * L, is + o * L, nl * sizeof(int32_t));
      }
    for (int64_t l = 0; l < nl; ++l) {
      if (!cl) {
        float* __restrict yo = y_n + (cb * L + l) * So;
        for (int64_t o = 0; o < So; ++o) yo[o] = ys[o * L + l];
      }
      if (idx_n && !cl) {  // null without autograd (evaluation): no argmax needed
        int32_t* __restrict io = idx_n + (cb * L + l) * So;
        for (int64_t o = 0; o < So; ++o) io[o] = is[o * L + l];
      }
    }
  }
}

// ---- backward over the nonzeros of the conv's output gradient --------------------------------
// A nonzero at cell j (= h * Wp + w) with value gv touches K patch rows of K*Ci contiguous floats:
// xp[j + kh * Wp][0 : K*Ci]. Each row is R = ceil(K*Ci / 16) vectors; lanes past K*Ci belong to
// the next pixels and are masked (weight gradient: never stored; input gradient: not updated).

// 4-lane vectors for patch rows of at most 4 floats (one input channel, K <= 3): 16-lane loads
// would idle 13 lanes and mostly straddle two cache lines.
typedef float v4 __attribute__((vector_size(16)));

template <typename V>
inline V ldv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline V splatv(float s);
template <>
inline v16 splatv<v16>(float s) { return splat(s); }
template <>
inline v4 splatv<v4>(float s) { return v4{s, s, s, s}; }

// weight gradient of one output channel: acc[kh][r] += gv * xp row, accumulators in registers;
// V is the vector type (v16, or v4 for rows of <= 4 floats), R the vectors per patch row
template <typename V, int K, int R>
struct WgradState {  // one output channel's running sums, carried between sample ranges
  static constexpr int S = K * R <= 12 ? 2 : 1;
  V acc[S][K][R];
  float sg[S];
};

template <typename V, int K, int R>
void wgrad_channel(const float* gy, const int32_t* ii, int64_t So, int64_t n_lo, int64_t n_hi, int64_t Co,
                   int64_t co, const float* xpd, int64_t sample, int64_t Wp, int64_t Ci,
                   int64_t jmax, const float* zeros, WgradState<V, K, R>& st_) {
  constexpr int64_t LV = sizeof(V) / sizeof(float);
  // branch-free: a cell without gradient adds 0 * (an all-zero patch in xp's slack), so an
  // unpredictable idx costs no mispredictions and a NaN elsewhere in x cannot leak in. With few
  // accumulators (K * R <= 12) two sets alternate between cells: the FMA latency chain per
  // accumulator would otherwise bound the loop (3 accumulators for a 3x3 conv of one channel).
  constexpr int S = WgradState<V, K, R>::S;
  V acc[S][K][R];
  float sg[S];
  for (int u = 0; u < S; ++u) {
    sg[u] = st_.sg[u];
    for (int kh = 0; kh < K; ++kh)
      for (int r = 0; r < R; ++r) acc[u][kh][r] = st_.acc[u][kh][r];
  }
  for (int64_t n = n_lo; n < n_hi; ++n) {
    const float* __restrict g = gy + (n * Co + co) * So;
    const int32_t* __restrict ij = ii + (n * Co + co) * So;
    const float* xpn = xpd + n * sample;
    auto cell = [&](int64_t o, int u) {
      const int32_t j = ij[o];
      const bool ok = static_cast<uint64_t>(static_cast<int64_t>(j)) < static_cast<uint64_t>(jmax);
      const float gv = ok ? g[o] : 0.f;
      sg[u] += gv;
      const V gs = splatv<V>(gv);
      const float* base = ok ? xpn + j * Ci : zeros;
      for (int kh = 0; kh < K; ++kh)
        for (int r = 0; r < R; ++r) acc[u][kh][r] += gs * ldv<V>(base + kh * Wp * Ci + r * LV);
    };
    int64_t o = 0;
    if (S == 2)
      for (; o + 1 < So; o += 2) {
        cell(o, 0);
        cell(o + 1, S - 1);
      }
    for (; o < So; ++o) cell(o, 0);
  }
  for (int u = 0; u < S; ++u) {
    st_.sg[u] = sg[u];
    for (int kh = 0; kh < K; ++kh)
      for (int r = 0; r < R; ++r) st_.acc[u][kh][r] = acc[u][kh][r];
  }
}

template <typename V, int K, int R>
void wgrad_finish(const WgradState<V, K, R>& st_, float* out /* [K][R * lanes] */, float* sb) {
  constexpr int64_t LV = sizeof(V) / sizeof(float);
  constexpr int S = WgradState<V, K, R>::S;
  for (int kh = 0; kh < K; ++kh)
    for (int r = 0; r < R; ++r) {
      V a = st_.acc[0][kh][r];
      if (S == 2) a += st_.acc[S - 1][kh][r];
      std::memcpy(out + (kh * R + r) * LV, &a, sizeof(a));
    }
  *sb = S == 2 ? st_.sg[0] + st_.sg[S - 1] : st_.sg[0];
}

// input gradient of one sample: dxp[j + kh * Wp][t] += gv * w[co][kh][t] over the masked lanes
template <int K, int R>
void dgrad_sample(const float* g, const int32_t* ij, int64_t So, int64_t Co, const float* wd,
                  float* dxp, int64_t Wp, int64_t Ci, int64_t jmax, int32_t* lj, float* lg) {
  const int64_t KC = K * Ci;
  i16 lanes;
  for (int l = 0; l < L; ++l) lanes[l] = l;
  for (int64_t co = 0; co < Co; ++co) {
    const float* gc = g + co * So;
    const int32_t* ic = ij + co * So;
    v16 wv[K][R];  // zero past K*Ci (wd rows are padded with zeros to R*16)
    for (int kh = 0; kh < K; ++kh)
      for (int r = 0; r < R; ++r) wv[kh][r] = ld(wd + (co * K + kh) * R * L + r * L);
    // the cells with gradient, compacted without branches, even pool outputs first: neighbouring
    // outputs' patches overlap, and a load of a partly overwritten vector stalls on the store
    int64_t cnt = 0;
    for (int64_t start = 0; start < 2; ++start)
      for (int64_t o = start; o < So; o += 2) {
        const int32_t j = ic[o];
        lj[cnt] = j;
        lg[cnt] = gc[o];
        cnt += static_cast<uint64_t>(static_cast<int64_t>(j)) < static_cast<uint64_t>(jmax);
      }
    for (int64_t e = 0; e < cnt; ++e) {
      const v16 gs = splat(lg[e]);
      float* base = dxp + lj[e] * Ci;
      for (int kh = 0; kh < K; ++kh)
        for (int r = 0; r < R; ++r) {
          float* d = base + kh * Wp * Ci + r * L;
          const v16 cur = ld(d);
          const i16 live = lanes < (i16{} + static_cast<int32_t>(KC - r * L));
          st(d, live ? cur + gs * wv[kh][r] : cur);
        }
    }
  }
}

// ---- weight gradient of a one-channel 3x3 block from channels-last idx / grad_y ---------------
// idx and grad_y channels-last ([N][Ho][Wo][Co], what the forward saves when it writes its output
// channels-last) hold one pool window's 16 channels in one vector. For Cin = 1 wgrad_channel
// spends about a dozen instructions per (channel, window) around three 4-lane FMAs; here each
// cell of a window adds its 9 taps to all 16 channels at once, one masked FMA per tap, the mask
// being the lanes whose saved cell it is. Per channel the additions come in wgrad_channel's order
// (two accumulator sets alternating with the window's parity, samples ascending, masked-off lanes
// unchanged where wgrad_channel adds 0 * an all-zero patch), so the results are the same bits.
// acc += (lanes of m) ? g * x : 0, leaving the other lanes untouched: one masked FMA with AVX-512
// (GCC turns the portable select into a copy, an FMA and a masked move)
inline void masked_fma(v16& acc, v16 g, float x, i16 m) {
#if defined(__AVX512F__)
  const __mmask16 k = _mm512_test_epi32_mask(reinterpret_cast<__m512i>(m), reinterpret_cast<__m512i>(m));
  acc = reinterpret_cast<v16>(_mm512_mask3_fmadd_ps(reinterpret_cast<__m512>(g), _mm512_set1_ps(x),
                                                    reinterpret_cast<__m512>(acc), k));
#else
  acc = m ? acc + g * splat(x) : acc;
#endif
}

void wgrad_cl_c1k3(const float* gy, const int32_t* id, int64_t N, int64_t G, int64_t Co, int64_t Ho,
                   int64_t Wo, int64_t pk, int64_t ps, int64_t pp, int64_t H, int64_t W,
                   const float* xpd, int64_t sample, int64_t Wp, int64_t jmax, float* gwd,
                   float* gbd) {
  const int64_t per = N / G, chunks = (Co + L - 1) / L;
  at::parallel_for(0, G * chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t gc = c0; gc < c1; ++gc) {
      const int64_t gi = gc / chunks, cb = gc % chunks, nl = std::min<int64_t>(L, Co - cb * L);
      // two accumulator sets, even and odd windows (wgrad_channel's order), as separate arrays
      // so that each call site below keeps its set in registers
      v16 acc0[9], acc1[9], sg0 = v16{}, sg1 = v16{};
      for (int t = 0; t < 9; ++t) acc0[t] = acc1[t] = v16{};
      const i16 jlim = i16{} + static_cast<int32_t>(jmax);
      auto window = [&](v16 (&acc)[9], v16& sg, const float* xn, int64_t off, int64_t y0,
                        int64_t y1, int64_t x0, int64_t x1) __attribute__((always_inline)) {
        v16 gv = v16{};
        i16 jv = i16{} - 1;
        if (nl == L) {
          std::memcpy(&gv, gy + off, sizeof(gv));
          std::memcpy(&jv, id + off, sizeof(jv));
        } else {
          for (int64_t l = 0; l < nl; ++l) {
            gv[l] = gy[off + l];
            jv[l] = id[off + l];
          }
        }
        const i16 ok = (jv >= 0) & (jv < jlim);
        gv = ok ? gv : v16{};
        sg += gv;
        for (int64_t iy = y0; iy < y1; ++iy)
          for (int64_t ix = x0; ix < x1; ++ix) {
            const int32_t cell = static_cast<int32_t>(iy * Wp + ix);
            const i16 m = ok & (jv == cell);
            const float* r0 = xn + cell;
            const float* r1 = r0 + Wp;
            const float* r2 = r1 + Wp;
            masked_fma(acc[0], gv, r0[0], m);
            masked_fma(acc[1], gv, r0[1], m);
            masked_fma(acc[2], gv, r0[2], m);
            masked_fma(acc[3], gv, r1[0], m);
            masked_fma(acc[4], gv, r1[1], m);
            masked_fma(acc[5], gv, r1[2], m);
            masked_fma(acc[6], gv, r2[0], m);
            masked_fma(acc[7], gv, r2[1], m);
            masked_fma(acc[8], gv, r2[2], m);
          }
      };
      for (int64_t n = gi * per; n < (gi + 1) * per; ++n) {
        const float* xn = xpd + n * sample;
        for (int64_t oy = 0; oy < Ho; ++oy) {
          const int64_t y0 = std::max<int64_t>(oy * ps - pp, 0);
          const int64_t y1 = std::min<int64_t>(oy * ps - pp + pk, H);
          for (int64_t ox = 0; ox < Wo; ++ox) {
            const int64_t o = oy * Wo + ox, off = (n * Ho * Wo + o) * Co + cb * L;
            const int64_t x0 = std::max<int64_t>(ox * ps - pp, 0);
            const int64_t x1 = std::min<int64_t>(ox * ps - pp + pk, W);
            if (o & 1)
              window(acc1, sg1, xn, off, y0, y1, x0, x1);
            else
              window(acc0, sg0, xn, off, y0, y1, x0, x1);
          }
        }
      }
      for (int64_t l = 0; l < nl; ++l) {
        const int64_t co = gi * Co + cb * L + l;
        for (int t = 0; t < 9; ++t) gwd[co * 9 + t] = acc0[t][l] + acc1[t][l];
        gbd[co] = sg0[l] + sg1[l];
      }
    }
  });
}

void check_f32_cpu(const at::Tensor& t, const char* op, const char* arg, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ",
              t.scalar_type(), " with shape ", t.sizes());
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous, got shape ", t.sizes(),
              " strides ", t.strides());
}

Geo make_geo(const at::Tensor& x, const at::Tensor& w, int64_t pk, int64_t ps, int64_t pp,
             const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, op,
              ": x must be a 4-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be contiguous NCHW or channels-last, got strides ", x.strides());
  TORCH_CHECK(w.dim() == 4 || w.dim() == 5, op, ": weight must be [Cout, Cin, K, K] or "
              "[G, Cout, Cin, K, K], got shape ", w.sizes());
  check_f32_cpu(w, op, "weight", w.dim());
  Geo g;
  g.N = x.size(0);
  g.Ci = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.G = w.dim() == 5 ? w.size(0) : 1;
  g.Co = w.size(-4);
  g.K = w.size(-2);
  TORCH_CHECK(w.size(-3) == g.Ci && w.size(-1) == g.K && g.K % 2 == 1 && g.Co >= 1,
              op, ": weight must be [(G,) Cout, Cin=", g.Ci, ", K, K] with K odd, got ", w.sizes());
  TORCH_CHECK(g.G >= 1 && g.N % g.G == 0, op, ": the batch of ", g.N,
              " samples does not split into ", g.G, " weight groups");
  TORCH_CHECK(pk >= 1 && ps >= 1 && pp >= 0 && 2 * pp <= pk, op,
              ": pool needs kernel_size >= 1, stride >= 1, 0 <= padding <= kernel_size / 2, got ",
              pk, ", ", ps, ", ", pp);
  TORCH_CHECK(g.H >= 1 && g.W >= 1 && g.H + 2 * pp >= pk && g.W + 2 * pp >= pk, op,
              ": input of shape ", x.sizes(), " is smaller than the pool window ", pk);
  TORCH_CHECK((g.H + g.K) * (g.W + g.K) <= std::numeric_limits<int32_t>::max(), op,
              ": plane too large for int32 cell indices");
  g.q = g.K / 2;
  g.Hp = g.H + 2 * g.q;
  g.Wp = g.W + 2 * g.q;
  g.CoP = (g.Co + L - 1) / L * L;
  g.pk = pk;
  g.ps = ps;
  g.pp = pp;
  g.Ho = (g.H + 2 * pp - pk) / ps + 1;
  g.Wo = (g.W + 2 * pp - pk) / ps + 1;
  return g;
}

// Floats of slack after the padded input (and the per-sample buffers): the last block of WB
// positions and the 16-lane patch-row loads may run past the end by this much.
int64_t slack_floats(int64_t K, int64_t Ci, int64_t Wp) {
  return (kWBMax + K + 1) * Ci + K * Wp * Ci + 4 * L;
}

// weight [Co, Ci, K, K], or [G, Co, Ci, K, K] for G clients in one call: sample n then uses
// group n / (N / G) (bias [G, Co] likewise).
// -> (y [N, Co, Ho, Wo], idx int32 [N, Co, Ho, Wo], xp [N, H+2q, W+2q, Ci] padded channels-last x,
//     allocated with slack: pass it to the backward as returned). save = false (no autograd):
//     idx comes back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool_relu_fwd(const at::Tensor& x,
                                                                 const at::Tensor& w,
                                                                 const at::Tensor& b, int64_t pk,
                                                                 int64_t ps, int64_t pp,
                                                                 bool cl_out, bool save) {
  const char* op = "conv_pool_relu_fwd";
  const Geo g = make_geo(x, w, pk, ps, pp, op);
  TORCH_CHECK(b.numel() == 0 || (b.numel() == g.G * g.Co && b.size(-1) == g.Co &&
                                 b.scalar_type() == at::kFloat && b.device().is_cpu()),
              op, ": bias must be float32 [(G=", g.G, ",) ", g.Co, "] on the CPU or empty, got ",
              b.sizes());
  const int64_t KC = g.K * g.Ci;
  // packed weights wf[group][kh][kw*Ci+ci][CoP] and padded biases
  const int64_t wpack = g.K * KC * g.CoP;
  std::vector<float> wf(static_cast<size_t>(g.G * wpack), 0.f), bias(g.G * g.CoP, 0.f);
  const float* wd = w.data_ptr<float>();
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t co = 0; co < g.Co; ++co)
      for (int64_t ci = 0; ci < g.Ci; ++ci)
        for (int64_t kh = 0; kh < g.K; ++kh)
          for (int64_t kw = 0; kw < g.K; ++kw)
            wf[gi * wpack + (kh * KC + kw * g.Ci + ci) * g.CoP + co] =
                wd[(((gi * g.Co + co) * g.Ci + ci) * g.K + kh) * g.K + kw];
  if (b.numel()) {
    const at::Tensor bc = b.contiguous();
    for (int64_t gi = 0; gi < g.G; ++gi)
      std::copy(bc.data_ptr<float>() + gi * g.Co, bc.data_ptr<float>() + (gi + 1) * g.Co,
                bias.begin() + gi * g.CoP);
  }
  const int64_t per_group = g.N / g.G;
  const int64_t sample = g.Hp * g.Wp * g.Ci;
  const int64_t slack = slack_floats(g.K, g.Ci, g.Wp);
  const auto fmt = cl_out ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({g.N, g.Co, g.Ho, g.Wo}, x.options().memory_format(fmt));
  // idx takes y's layout: channels-last idx lets the backward read one window's channels as
  // one vector (wgrad_cl_c1k3)
  at::Tensor idx = save ? at::empty({g.N, g.Co, g.Ho, g.Wo}, x.options().dtype(at::kInt).memory_format(fmt))
                        : at::empty({0}, x.options().dtype(at::kInt));
  const bool x_cl = !x.is_contiguous();  // then channels-last (checked above)
  at::Tensor xp_store = at::empty({g.N * sample + slack}, x.options());
  at::Tensor xp = xp_store.narrow(0, 0, g.N * sample).view({g.N, g.Hp, g.Wp, g.Ci});
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  int32_t* id = save ? idx.data_ptr<int32_t>() : nullptr;
  float* xpd = xp_store.data_ptr<float>();
  std::fill(xpd + g.N * sample, xpd + g.N * sample + slack, 0.f);
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> tmp(static_cast<size_t>((g.H * g.Wp + kWBMax) * g.CoP));
    std::vector<float> ys(static_cast<size_t>(g.Ho * g.Wo * L));
    std::vector<int32_t> is(static_cast<size_t>(g.Ho * g.Wo * L));
    for (int64_t n = n0; n < n1; ++n) {
      float* xpn = xpd + n * sample;
      std::fill(xpn, xpn + sample, 0.f);  // borders (the interior is overwritten next)
      const float* xn = xd + n * g.Ci * g.H * g.W;
      if (x_cl) {  // rows of W * Ci floats: copies
        for (int64_t h = 0; h < g.H; ++h)
          std::memcpy(xpn + ((h + g.q) * g.Wp + g.q) * g.Ci, xn + h * g.W * g.Ci,
                      g.W * g.Ci * sizeof(float));
        continue;
      }
      for (int64_t ci = 0; ci < g.Ci; ++ci)
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w_ = 0; w_ < g.W; ++w_)
            xpn[((h + g.q) * g.Wp + w_ + g.q) * g.Ci + ci] = xn[(ci * g.H + h) * g.W + w_];
    }
    for (int64_t n = n0; n < n1; ++n) {
      // samples of this chunk are all padded first: the last block of sample n reads into n + 1
      const int64_t gi = n / per_group;
      conv_sample(xpd + n * sample, wf.data() + gi * wpack, bias.data() + gi * g.CoP, tmp.data(), g);
      pool_sample(tmp.data(), yd + n * g.Co * g.Ho * g.Wo, id ? id + n * g.Co * g.Ho * g.Wo : nullptr, g,
                  ys.data(), is.data(), cl_out);
    }
  });
  return {y, idx, xp};
}

// over (group, output channel) pairs; group gi owns samples [gi * N/G, (gi + 1) * N/G)
template <int K, int R>
bool wgrad_fixed(const float* gy, const int32_t* id, int64_t So, int64_t N,
                 int64_t G, int64_t Co,
                 const float* xpd, int64_t sample, int64_t Wp, int64_t Ci, int64_t jmax,
                 float* gwd, float* gbd) {
  const int64_t per = N / G;
  auto run = [&](auto vec) {
    using V = decltype(vec);
    constexpr int RV = std::is_same<V, v4>::value ? 1 : R;
    constexpr int64_t LV = sizeof(V) / sizeof(float);
    at::parallel_for(0, G * Co, 1, [&](int64_t c0, int64_t c1) {
      // sample-major within this thread's channels: one sample's padded input (16 KB for the
      // cnn's second block) stays in L1 while every channel visits it; channel-major streamed
      // the group's whole input from L2 once per channel. Each channel still sums its cells in
      // the same order (samples ascending), so the result does not change.
      std::vector<WgradState<V, K, RV>> state(static_cast<size_t>(c1 - c0));
      for (auto& s_ : state) std::memset(&s_, 0, sizeof(s_));
      for (int64_t gc0 = c0; gc0 < c1;) {
        const int64_t gi = gc0 / Co, gc1 = std::min(c1, (gi + 1) * Co);
        for (int64_t n = gi * per; n < (gi + 1) * per; ++n)
          for (int64_t gc = gc0; gc < gc1; ++gc)
            wgrad_channel<V, K, RV>(gy, id, So, n, n + 1, Co, gc % Co, xpd, sample, Wp, Ci, jmax,
                                    xpd + N * sample, state[gc - c0]);
        gc0 = gc1;
      }
      float acc[K * RV * LV];
      for (int64_t gc = c0; gc < c1; ++gc) {
        wgrad_finish<V, K, RV>(state[gc - c0], acc, gbd + gc);
        float* out = gwd + gc * Ci * K * K;
        for (int64_t ci = 0; ci < Ci; ++ci)
          for (int64_t kh = 0; kh < K; ++kh)
            for (int64_t kw = 0; kw < K; ++kw)
              out[(ci * K + kh) * K + kw] = acc[kh * RV * LV + kw * Ci + ci];
      }
    });
  };
  if (K * Ci <= 4)
    run(v4{});
  else
    run(v16{});
  return true;
}

template <int K, int R>
bool dgrad_fixed(const float* gy, const int32_t* id, int64_t So, int64_t N,
                 int64_t G, int64_t Co, const float* wsrc, int64_t Ci, int64_t H, int64_t W,
                 int64_t Wp, int64_t Hp, int64_t jmax, int64_t slack, float* gxd, bool gx_cl) {
  const int64_t q = K / 2, per = N / G, wpack = Co * K * R * L;
  // weights as wd[group][co][kh][kw*Ci+ci], rows zero-padded to R*16: a patch row's layout
  std::vector<float> wd(static_cast<size_t>(G * wpack), 0.f);
  for (int64_t gc = 0; gc < G * Co; ++gc)
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t kh = 0; kh < K; ++kh)
        for (int64_t kw = 0; kw < K; ++kw)
          wd[(gc * K + kh) * R * L + kw * Ci + ci] = wsrc[((gc * Ci + ci) * K + kh) * K + kw];
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> dxp(static_cast<size_t>(Hp * Wp * Ci + slack));
    std::vector<int32_t> lj(static_cast<size_t>(So));
    std::vector<float> lg(static_cast<size_t>(So));
    std::vector<float> tr(static_cast<size_t>(Ci == L ? Hp * Wp * L : 0));
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(dxp.begin(), dxp.end(), 0.f);
      dgrad_sample<K, R>(gy + n * Co * So, id + n * Co * So, So, Co, wd.data() + (n / per) * wpack,
                         dxp.data(), Wp, Ci, jmax, lj.data(), lg.data());
      float* gxn = gxd + n * Ci * H * W;
      if (gx_cl) {  // channels-last grad_x: the interior rows of dxp as they are
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(gxn + h * W * Ci, dxp.data() + ((h + q) * Wp + q) * Ci, W * Ci * sizeof(float));
        continue;
      }
      if (Ci == L) {
        // 16 channels: transpose the whole padded plane (a fixed-stride gather the compiler
        // vectorizes), then copy the interior rows; element by element this was ~3 cycles each
        const int64_t P = Hp * Wp;
        const float* __restrict src = dxp.data();
        float* __restrict t = tr.data();
        for (int64_t ci = 0; ci < L; ++ci)
          for (int64_t p = 0; p < P; ++p) t[ci * P + p] = src[p * L + ci];
        for (int64_t ci = 0; ci < L; ++ci)
          for (int64_t h = 0; h < H; ++h) {
            const float* __restrict a = t + ci * P + (h + q) * Wp + q;
            float* __restrict d = gxn + (ci * H + h) * W;
            for (int64_t w_ = 0; w_ < W; ++w_) d[w_] = a[w_];  // short rows: no libc call
          }
        continue;
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w_ = 0; w_ < W; ++w_) {
          const float* s = dxp.data() + ((h + q) * Wp + w_ + q) * Ci;
          for (int64_t ci = 0; ci < Ci; ++ci) gxn[(ci * H + h) * W + w_] = s[ci];
        }
    }
  });
  return true;
}

// -> (grad_x [N, Ci, H, W] or an empty tensor when need_x is false, grad_w of weight's shape,
//     grad_b [Co] or [G, Co] for grouped weights); only the nonzero entries of the conv's output gradient (one per pool output
//     with idx >= 0; overlapping windows may name a cell twice and both count) are visited.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool_relu_bwd(const at::Tensor& grad_y,
                                                                 const at::Tensor& idx,
                                                                 const at::Tensor& xp,
                                                                 const at::Tensor& w,
                                                                 bool need_x, int64_t pk,
                                                                 int64_t ps, int64_t pp,
                                                                 bool gx_cl) {
  const char* op = "conv_pool_relu_bwd";
  TORCH_CHECK(grad_y.device().is_cpu() && grad_y.scalar_type() == at::kFloat && grad_y.dim() == 4,
              op, ": grad_y must be a 4-D float32 CPU tensor, got ", grad_y.scalar_type(), " ",
              grad_y.sizes(), " on ", grad_y.device());
  check_f32_cpu(xp, op, "xp", 4);
  TORCH_CHECK(w.dim() == 4 || w.dim() == 5, op, ": weight must be [(G,) Cout, Cin, K, K], got ",
              w.sizes());
  check_f32_cpu(w, op, "weight", w.dim());
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.sizes() == grad_y.sizes() &&
                  (idx.is_contiguous() || idx.is_contiguous(at::MemoryFormat::ChannelsLast)),
              op, ": idx must be int32 of grad_y's shape ", grad_y.sizes(),
              ", contiguous NCHW or channels-last, got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK(pk >= 0 && ps >= 0 && pp >= 0, op, ": pool arguments must be >= 0 (0: not given)");
  const int64_t N = grad_y.size(0), Co = grad_y.size(1), So = grad_y.size(2) * grad_y.size(3);
  const int64_t G = w.dim() == 5 ? w.size(0) : 1;
  const int64_t K = w.size(-2), Ci = w.size(-3), q = K / 2;
  const int64_t Hp = xp.size(1), Wp = xp.size(2), H = Hp - 2 * q, W = Wp - 2 * q;
  TORCH_CHECK(w.size(-4) == Co && w.size(-1) == K && K % 2 == 1 && xp.size(0) == N &&
                  xp.size(3) == Ci && H >= 1 && W >= 1 && N % G == 0,
              op, ": shapes do not match: grad_y ", grad_y.sizes(), ", xp ", xp.sizes(),
              ", weight ", w.sizes());
  const int64_t sample = Hp * Wp * Ci, slack = slack_floats(K, Ci, Wp);
  // The forward returns xp with zeroed slack after it, which the kernels read past the end. A copy
  // of it (a clone; torch's functionalization and AOT autograd make such copies) lacks the slack:
  // it is copied once more, into a buffer that has it.
  at::Tensor xp_use = xp;
  if (!(xp.storage_offset() == 0 &&
        xp.storage().nbytes() >= static_cast<size_t>((N * sample + slack) * 4))) {
    at::Tensor store = at::zeros({N * sample + slack}, xp.options());
    store.narrow(0, 0, N * sample).copy_(xp.reshape({N * sample}));
    xp_use = store.narrow(0, 0, N * sample).view({N, Hp, Wp, Ci});
  }
  const int64_t R = (K * Ci + L - 1) / L;
  const int64_t jmax = H * Wp;  // a cell's row must be < H; idx from the forward always is
  const float* xpd = xp_use.data_ptr<float>();
  at::Tensor gw = at::empty(w.sizes(), w.options());
  at::Tensor gb = G > 1 || w.dim() == 5 ? at::empty({G, Co}, w.options()) : at::empty({Co}, w.options());
  const auto gx_fmt = gx_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gx = need_x ? at::empty({N, Ci, H, W}, xp.options().memory_format(gx_fmt))
                         : at::empty({0}, xp.options());
  float* gwd = gw.data_ptr<float>();
  float* gbd = gb.data_ptr<float>();
  const float* wsrc = w.data_ptr<float>();
  float* gxd = need_x ? gx.data_ptr<float>() : nullptr;
  // channels-last idx (the forward wrote channels-last output): the one-channel 3x3 kernel reads
  // it as it is; everything else runs on NCHW copies
  const bool idx_cl = !idx.is_contiguous();
  const int64_t Ho = grad_y.size(2), Wo = grad_y.size(3);
  const bool window_ok = pk > 0 && ps > 0 && (H + 2 * pp - pk) / ps + 1 == Ho &&
                         (W + 2 * pp - pk) / ps + 1 == Wo;
  const bool wgrad_done = idx_cl && Ci == 1 && K == 3 && window_ok;
  if (wgrad_done) {
    const at::Tensor gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
    wgrad_cl_c1k3(gyc.data_ptr<float>(), idx.data_ptr<int32_t>(), N, G, Co, Ho, Wo, pk, ps, pp, H,
                  W, xpd, sample, Wp, jmax, gwd, gbd);
    if (!need_x) return {gx, gw, gb};
  }
  const at::Tensor gy_t = grad_y.contiguous();
  const at::Tensor id_t = idx.contiguous();
  const float* gy = gy_t.data_ptr<float>();
  const int32_t* id = id_t.data_ptr<int32_t>();

#define FSL_CONV_CASE(KK, RR)                                                              \
  if (K == KK && R == RR) {                                                                \
    if (!wgrad_done)                                                                       \
      wgrad_fixed<KK, RR>(gy, id, So, N, G, Co, xpd, sample, Wp, Ci, jmax, gwd, gbd);      \
    if (need_x)                                                                            \
      dgrad_fixed<KK, RR>(gy, id, So, N, G, Co, wsrc, Ci, H, W, Wp, Hp, jmax, slack, gxd,  \
                          gx_cl);                                                          \
    return {gx, gw, gb};                                                                   \
  }
  FSL_CONV_CASE(1, 1) FSL_CONV_CASE(1, 2) FSL_CONV_CASE(1, 4)
  FSL_CONV_CASE(3, 1) FSL_CONV_CASE(3, 2) FSL_CONV_CASE(3, 3) FSL_CONV_CASE(3, 4)
  FSL_CONV_CASE(5, 1) FSL_CONV_CASE(5, 2) FSL_CONV_CASE(5, 3) FSL_CONV_CASE(5, 4)
  FSL_CONV_CASE(7, 1) FSL_CONV_CASE(7, 2)
#undef FSL_CONV_CASE
  TORCH_CHECK(false, op, ": no kernel for K = ", K, " with K * Cin = ", K * Ci,
              " (> 64 floats per patch row); use the reference backend");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def("conv_pool_relu_fwd(Tensor x, Tensor weight, Tensor bias, int kernel_size, int stride, "
        "int padding, bool channels_last_out=False, bool save_for_backward=True) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv_pool_relu_bwd(Tensor grad_y, Tensor idx, Tensor xp, Tensor weight, bool need_x, "
        "int kernel_size=0, int stride=0, int padding=0, bool grad_x_channels_last=False) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) {
  m.impl("conv_pool_relu_fwd", &conv_pool_relu_fwd);
  m.impl("conv_pool_relu_bwd", &conv_pool_relu_bwd);
}
