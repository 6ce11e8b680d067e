// Fused linear auxiliary head: gradient estimate and alignment in closed form (CPU, OpenMP).
//
// Contract (policy, pooling and the autograd reference live in fsl_fast/ops/aux.py):
//   x [K, B, D], weight [K, C, D], bias [K, C], labels [K, B] int64, target [K, B, D];
//   z = x W^T + b, p = softmax(z), G = scale * (p - onehot(y)), u = G W.
//   aux_estimate -> g = u * inv_spread                                          [K, B, D]
//   aux_align    -> loss[k] = spread * sum((u / spread - target)^2)             [K]
//                   R = 2 (u / spread - target) = d loss / d u
//                   dP = R W^T, dz = scale * p * (dP - <dP, p>)
//                   dW = G^T R + dz^T x, db = colsum(dz)                        [K, C, D], [K, C]
// "spread" is the number of positions a pooled input was averaged over (1 when flattened): the
// Python side pools x and the target, and adds the target's within-pool variance to the loss.
//
// Logits never reach memory: each block of RB rows computes z in registers, then g / R, dP and its
// share of dW while its rows are hot in cache. dW is reduced deterministically: rows are cut into
// a fixed number of slices (a function of B only, never of the thread count), each slice sums its
// rows in order into its own partial, and the partials are added in slice order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// 64-byte vectors through the GCC/Clang vector extension: one zmm register with AVX-512, split
// into narrower registers by the compiler elsewhere. Loads/stores go through memcpy (unaligned,
// no aliasing questions); GCC turns them into vmovups.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int N = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int N = 8;
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline typename Vec<T>::type vbroadcast(T s) {
  // scalar + vector broadcasts in the vector extension; a lane-by-lane loop compiled to lane
  // inserts and made the kernel 3x slower.
  typename Vec<T>::type v = {};
  return v + s;
}
template <typename T>
inline T vsum(typename Vec<T>::type v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::N; ++i) s += v[i];
  return s;
}
#ifdef __AVX512F__
// One vbroadcastss (the generic "zero vector + s" keeps a scalar add of 0 that ISO FP forbids
// folding: it cost ~25% of the align kernel at 256 x 2048).
template <>
inline Vec<float>::type vbroadcast<float>(float s) {
  return (Vec<float>::type)_mm512_set1_ps(s);
}
template <>
inline Vec<double>::type vbroadcast<double>(double s) {
  return (Vec<double>::type)_mm512_set1_pd(s);
}
// Tree reduction (the generic lane loop is a 16-deep chain of scalar adds).
template <>
inline float vsum<float>(Vec<float>::type v) {
  return _mm512_reduce_add_ps((__m512)v);
}
template <>
inline double vsum<double>(Vec<double>::type v) {
  return _mm512_reduce_add_pd((__m512d)v);
}
#endif

// Rows per block: 8 vector accumulators plus one weight vector fit the 32 zmm registers and
// cut the passes over W by 8 compared with a row at a time (W of 10 x 2048 is 80 KB, in L2).
constexpr int RB = 8;
// The estimate has no dW update and no R scratch, so it affords 16 rows (16 accumulators + W).
constexpr int kEstRB = 16;
// Deterministic dW: at most this many partials per client, at least kSliceRows rows per slice.
constexpr int64_t kMaxSlices = 8;
constexpr int64_t kSliceRows = 128;

inline int64_t num_slices(int64_t B) {
  int64_t s = (B + kSliceRows - 1) / kSliceRows;
  return std::max<int64_t>(1, std::min(kMaxSlices, s));
}

template <typename T>
struct Head {
  const T* x;  // [B, D] of this client
  const T* W;  // [C, D]
  const T* b;  // [C]
  const int64_t* y;  // [B]
  int64_t B, C, D;
  T scale;
};

// out[r][c] = dot(rows[r], W[c]) for r < RB (rows beyond the block point at a valid row).
// D is walked in tiles so that the block's rows (RB x tile) and W's tile (C x tile) stay in L1;
// the per-(r, c) vector accumulators live in `acc_buf` ([C][RB][N] scratch) between tiles.
// Untiled, every row load came from L2 (the block's rows, RB x 8 KB at D=2048, exceed L1).
template <typename T, int RB>
inline void rows_dot_W(const T* const* rows, const T* W, int64_t C, int64_t D, T* out /*[RB][C]*/,
                       T* acc_buf) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  constexpr int64_t DT = 32 * N;  // 2 KB of each row per tile
  const int64_t Dv = D - D % N;
  for (int64_t i = 0; i < C * RB * N; ++i) acc_buf[i] = 0;
  for (int64_t t0 = 0; t0 < Dv; t0 += DT) {
    const int64_t t1 = std::min(t0 + DT, Dv);
    for (int64_t c = 0; c < C; ++c) {
      const T* w = W + c * D;
      T* ab = acc_buf + c * RB * N;
      V acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = vload(ab + r * N);
      for (int64_t d = t0; d < t1; d += N) {
        const V wv = vload(w + d);
        for (int r = 0; r < RB; ++r) acc[r] += vload(rows[r] + d) * wv;
      }
      for (int r = 0; r < RB; ++r) vstore(ab + r * N, acc[r]);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* w = W + c * D;
    for (int r = 0; r < RB; ++r) {
      T s = vsum<T>(vload(acc_buf + (c * RB + r) * N));
      for (int64_t d = Dv; d < D; ++d) s += rows[r][d] * w[d];
      out[r * C + c] = s;
    }
  }
}

// p[r] = softmax(z[r] + b), G[r] = scale * (p - onehot(y)). Works in place on z -> p.
template <typename T, int RB>
inline void softmax_G(const Head<T>& h, int64_t row0, int nb, T* zp /*[RB][C]*/, T* G) {
  const int64_t C = h.C;
  for (int r = 0; r < nb; ++r) {
    T* z = zp + r * C;
    T m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) {
      z[c] += h.b[c];
      m = std::max(m, z[c]);
    }
    T s = 0;
    for (int64_t c = 0; c < C; ++c) {
      z[c] = std::exp(z[c] - m);
      s += z[c];
    }
    const T inv = T(1) / s;
    const int64_t yr = h.y[row0 + r];
    for (int64_t c = 0; c < C; ++c) {
      z[c] *= inv;
      G[r * C + c] = h.scale * (z[c] - (c == yr ? T(1) : T(0)));
    }
  }
  for (int r = nb; r < RB; ++r)
    for (int64_t c = 0; c < C; ++c) G[r * C + c] = 0;  // padded rows contribute nothing
}

// Visits d-chunks of u[r] = sum_c G[r][c] W[c] (RB rows at once) and hands each chunk to fn.
template <typename T, int RB, typename Fn>
inline void for_each_u_chunk(const T* W, const T* G, int64_t C, int64_t D, Fn& fn) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  const int64_t Dv = D - D % N;
  for (int64_t d = 0; d < Dv; d += N) {
    V acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = vbroadcast<T>(0);
    for (int64_t c = 0; c < C; ++c) {
      const V wv = vload(W + c * D + d);
      for (int r = 0; r < RB; ++r) acc[r] += vbroadcast<T>(G[r * C + c]) * wv;
    }
    fn(d, acc);
  }
  for (int64_t d = Dv; d < D; ++d) {
    T acc[RB] = {};
    for (int64_t c = 0; c < C; ++c) {
      const T w = W[c * D + d];
      for (int r = 0; r < RB; ++r) acc[r] += G[r * C + c] * w;
    }
    fn.scalar(d, acc);
  }
}

template <typename T>
void estimate_client(const Head<T>& h, T inv_spread, T* g /*[B, D]*/) {
  using V = typename Vec<T>::type;
  constexpr int RB = kEstRB;
  const int64_t nblk = (h.B + RB - 1) / RB;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> zp(RB * h.C), G(RB * h.C), accb(h.C * RB * Vec<T>::N);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t row0 = blk * RB;
      const int nb = (int)std::min<int64_t>(RB, h.B - row0);
      const T* rows[RB];
      for (int r = 0; r < RB; ++r) rows[r] = h.x + (row0 + (r < nb ? r : 0)) * h.D;
      rows_dot_W<T, RB>(rows, h.W, h.C, h.D, zp.data(), accb.data());
      softmax_G<T, RB>(h, row0, nb, zp.data(), G.data());
      struct Store {
        T* g;
        int64_t D;
        int nb;
        T s;
        void operator()(int64_t d, const V* acc) const {
          for (int r = 0; r < nb; ++r) vstore(g + r * D + d, acc[r] * vbroadcast<T>(s));
        }
        void scalar(int64_t d, const T* acc) const {
          for (int r = 0; r < nb; ++r) g[r * D + d] = acc[r] * s;
        }
      } st{g + row0 * h.D, h.D, nb, inv_spread};
      for_each_u_chunk<T, RB>(h.W, G.data(), h.C, h.D, st);
    }
  });
}

// One slice of rows [blk0, blk1) blocks of one client: adds its dW/db into dWp/dbp (zeroed by the
// caller) and returns its loss (before the spread factor).
template <typename T>
double align_slice(const Head<T>& h, const T* tgt, T spread, int64_t blk0, int64_t blk1, T* dWp,
                   T* dbp) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  const int64_t C = h.C, D = h.D;
  const int64_t Dv = D - D % N;
  const T inv_spread = T(1) / spread;
  std::vector<T> zp(RB * C), G(RB * C), dP(RB * C), Rbuf(RB * D), accb(C * RB * N);
  double loss = 0;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t row0 = blk * RB;
    const int nb = (int)std::min<int64_t>(RB, h.B - row0);
    const T* rows[RB];
    for (int r = 0; r < RB; ++r) rows[r] = h.x + (row0 + (r < nb ? r : 0)) * D;
    rows_dot_W<T, RB>(rows, h.W, C, D, zp.data(), accb.data());
    softmax_G<T, RB>(h, row0, nb, zp.data(), G.data());
    const T* p = zp.data();

    // R = 2 (u / spread - target) and the loss, chunk by chunk; padded rows get R = 0.
    struct Resid {
      const T* t;
      T* R;
      int64_t D;
      int nb;
      T s;
      V lacc[RB];
      T lsc[RB];
      void operator()(int64_t d, const V* acc) {
        for (int r = 0; r < RB; ++r) {
          if (r < nb) {
            const V diff = acc[r] * vbroadcast<T>(s) - vload(t + r * D + d);
            lacc[r] += diff * diff;
            vstore(R + r * D + d, diff * vbroadcast<T>(2));
          } else {
            vstore(R + r * D + d, vbroadcast<T>(0));
          }
        }
      }
      void scalar(int64_t d, const T* acc) {
        for (int r = 0; r < RB; ++r) {
          if (r < nb) {
            const T diff = acc[r] * s - t[r * D + d];
            lsc[r] += diff * diff;
            R[r * D + d] = 2 * diff;
          } else {
            R[r * D + d] = 0;
          }
        }
      }
    } res{tgt + row0 * D, Rbuf.data(), D, nb, inv_spread, {}, {}};
    for (int r = 0; r < RB; ++r) {
      res.lacc[r] = vbroadcast<T>(0);
      res.lsc[r] = 0;
    }
    for_each_u_chunk<T, RB>(h.W, G.data(), C, D, res);
    for (int r = 0; r < nb; ++r) loss += (double)vsum<T>(res.lacc[r]) + (double)res.lsc[r];

    // dP = R W^T, then dz = scale * p * (dP - <dP, p>) (stored over dP).
    const T* Rrows[RB];
    for (int r = 0; r < RB; ++r) Rrows[r] = Rbuf.data() + r * D;
    rows_dot_W<T, RB>(Rrows, h.W, C, D, dP.data(), accb.data());
    for (int r = 0; r < nb; ++r) {
      T dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += dP[r * C + c] * p[r * C + c];
      for (int64_t c = 0; c < C; ++c) dP[r * C + c] = h.scale * p[r * C + c] * (dP[r * C + c] - dot);
    }
    for (int r = nb; r < RB; ++r)
      for (int64_t c = 0; c < C; ++c) dP[r * C + c] = 0;

    // dW[c] += sum_r G[r][c] R[r] + dz[r][c] x[r]; db += dz (rows in order). The block's rows stay
    // in registers per d-chunk and classes run inner: each class is an independent FMA chain, so
    // the chains overlap. (Class-outer with the rows inner was latency-bound on one accumulator:
    // 1.28 ms -> see docs/aux.md for the measured effect.)
    for (int64_t d = 0; d < Dv; d += N) {
      V rv[RB], xv[RB];
      for (int r = 0; r < RB; ++r) {
        rv[r] = vload(Rrows[r] + d);
        xv[r] = vload(rows[r] + d);
      }
      for (int64_t c = 0; c < C; ++c) {
        const T* gc = G.data() + c;
        const T* zc = dP.data() + c;
        V a0 = vload(dWp + c * D + d), a1 = vbroadcast<T>(0);
        for (int r = 0; r < RB; ++r) {
          a0 += vbroadcast<T>(gc[r * C]) * rv[r];
          a1 += vbroadcast<T>(zc[r * C]) * xv[r];
        }
        vstore(dWp + c * D + d, a0 + a1);
      }
    }
    for (int64_t d = Dv; d < D; ++d) {
      for (int64_t c = 0; c < C; ++c) {
        T a0 = dWp[c * D + d], a1 = 0;
        for (int r = 0; r < RB; ++r) {
          a0 += G[r * C + c] * Rrows[r][d];
          a1 += dP[r * C + c] * rows[r][d];
        }
        dWp[c * D + d] = a0 + a1;
      }
    }
    for (int r = 0; r < nb; ++r)
      for (int64_t c = 0; c < C; ++c) dbp[c] += dP[r * C + c];
  }
  return loss * (double)spread;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& labels, const at::Tensor* target) {
  TORCH_CHECK(x.dim() == 3, "aux: x must be [K, B, D], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "aux: x must be float32 or float64, got ", x.scalar_type());
  const int64_t K = x.size(0), B = x.size(1), D = x.size(2);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == K && weight.size(2) == D,
              "aux: weight must be [K, C, D] = [", K, ", C, ", D, "], got ", weight.sizes());
  const int64_t C = weight.size(1);
  TORCH_CHECK(C >= 1, "aux: weight needs at least one class, got shape ", weight.sizes());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == K && bias.size(1) == C,
              "aux: bias must be [K, C] = [", K, ", ", C, "], got ", bias.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == K && labels.size(1) == B,
              "aux: labels must be [K, B] = [", K, ", ", B, "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "aux: labels must be int64, got ",
              labels.scalar_type());
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "aux: weight/bias dtype ", t->scalar_type(),
                " differs from x dtype ", x.scalar_type());
  }
  for (const at::Tensor* t : {&x, &weight, &bias, &labels}) {
    TORCH_CHECK(t->device().is_cpu(), "aux (cpp): tensors must be on CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), "aux (cpp): tensors must be contiguous");
  }
  if (target) {
    TORCH_CHECK(target->sizes() == x.sizes(), "aux: target must have x's shape ", x.sizes(),
                ", got ", target->sizes());
    TORCH_CHECK(target->scalar_type() == x.scalar_type(), "aux: target dtype ",
                target->scalar_type(), " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(target->device().is_cpu() && target->is_contiguous(),
                "aux (cpp): target must be a contiguous CPU tensor");
  }
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < K * B; ++i)
    TORCH_CHECK(y[i] >= 0 && y[i] < C, "aux: labels must lie in [0, ", C, "), found ", y[i]);
}

template <typename T>
Head<T> head_of(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                const at::Tensor& labels, int64_t k, double scale) {
  const int64_t B = x.size(1), D = x.size(2), C = weight.size(1);
  return Head<T>{x.data_ptr<T>() + k * B * D, weight.data_ptr<T>() + k * C * D,
                 bias.data_ptr<T>() + k * C, labels.data_ptr<int64_t>() + k * B, B, C, D, (T)scale};
}

at::Tensor aux_estimate_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& labels, double inv_spread, double scale) {
  check_inputs(x, weight, bias, labels, nullptr);
  at::Tensor g = at::empty_like(x);
  const int64_t K = x.size(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aux_estimate_cpu", [&] {
    for (int64_t k = 0; k < K; ++k) {
      auto h = head_of<scalar_t>(x, weight, bias, labels, k, scale);
      estimate_client<scalar_t>(h, (scalar_t)inv_spread, g.data_ptr<scalar_t>() + k * h.B * h.D);
    }
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aux_align_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& labels, const at::Tensor& target, double spread, double scale) {
  check_inputs(x, weight, bias, labels, &target);
  TORCH_CHECK(spread >= 1, "aux_align: spread must be >= 1, got ", spread);
  const int64_t K = x.size(0), B = x.size(1), D = x.size(2), C = weight.size(1);
  const int64_t S = num_slices(B);
  const int64_t nblk = (B + RB - 1) / RB;
  // Partials: [K, S, C, D] for dW, [K, S, C] for db, [K, S] for the loss (double).
  at::Tensor dWp = at::zeros({K, S, C, D}, x.options());
  at::Tensor dbp = at::zeros({K, S, C}, x.options());
  std::vector<double> lossp(K * S, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aux_align_cpu", [&] {
    at::parallel_for(0, K * S, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / S, s = i % S;
        auto h = head_of<scalar_t>(x, weight, bias, labels, k, scale);
        const int64_t blk0 = s * nblk / S, blk1 = (s + 1) * nblk / S;
        lossp[i] = align_slice<scalar_t>(h, target.data_ptr<scalar_t>() + k * B * D,
                                         (scalar_t)spread, blk0, blk1,
                                         dWp.data_ptr<scalar_t>() + i * C * D,
                                         dbp.data_ptr<scalar_t>() + i * C);
      }
    });
  });
  at::Tensor loss = at::empty({K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aux_align_cpu_loss", [&] {
    for (int64_t k = 0; k < K; ++k) {
      double l = 0;
      for (int64_t s = 0; s < S; ++s) l += lossp[k * S + s];
      loss.data_ptr<scalar_t>()[k] = (scalar_t)l;
    }
  });
  if (S == 1) return {loss, dWp.select(1, 0), dbp.select(1, 0)};
  // Fixed-order sum of the slice partials (parallel over clients and columns only).
  at::Tensor dW = at::empty({K, C, D}, x.options());
  at::Tensor db = at::empty({K, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aux_align_cpu_reduce", [&] {
    const scalar_t* src = dWp.data_ptr<scalar_t>();
    scalar_t* dst = dW.data_ptr<scalar_t>();
    const int64_t CD = C * D;
    at::parallel_for(0, K * CD, 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k = j / CD, e = j % CD;
        scalar_t a = src[(k * S) * CD + e];
        for (int64_t s = 1; s < S; ++s) a += src[(k * S + s) * CD + e];
        dst[j] = a;
      }
    });
    const scalar_t* bs = dbp.data_ptr<scalar_t>();
    scalar_t* bd = db.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) {
        scalar_t a = bs[(k * S) * C + c];
        for (int64_t s = 1; s < S; ++s) a += bs[(k * S + s) * C + c];
        bd[k * C + c] = a;
      }
  });
  return {loss, dW, db};
}

// Shape-only kernels so that torch.compile / FakeTensor tracing can see through the ops.
at::Tensor aux_estimate_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& labels, double inv_spread, double scale) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3, "aux_estimate: x [K, B, D], weight [K, C, D]");
  return at::empty_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aux_align_meta(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& labels, const at::Tensor& target, double spread, double scale) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3, "aux_align: x [K, B, D], weight [K, C, D]");
  return {at::empty({x.size(0)}, x.options()), at::empty_like(weight), at::empty_like(bias)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def(
      "aux_estimate(Tensor x, Tensor weight, Tensor bias, Tensor labels, float inv_spread, "
      "float scale) -> Tensor");
  m.def(
      "aux_align(Tensor x, Tensor weight, Tensor bias, Tensor labels, Tensor target, "
      "float spread, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) {
  m.impl("aux_estimate", &aux_estimate_cpu);
  m.impl("aux_align", &aux_align_cpu);
}

TORCH_LIBRARY_IMPL(fsl_fast, Meta, m) {
  m.impl("aux_estimate", &aux_estimate_meta);
  m.impl("aux_align", &aux_align_meta);
}
