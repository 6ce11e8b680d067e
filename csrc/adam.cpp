// One Adam step in a single pass over (param, grad, exp_avg, exp_avg_sq), fp32 on CPU, in place.
//
// Element for element torch.optim.Adam's single-tensor algorithm (L2 weight decay added to the
// gradient, exp_avg by lerp, bias corrections folded into the step size and the denominator),
// with the scalars rounded to float as torch's kernels do. Eager torch runs that as 6-7 separate
// passes with temporaries; for the small client models of the fused engine those passes are
// mostly per-op overhead, for the server's 0.2M-10M parameters mostly memory traffic. Results
// agree with torch to a few ulp (the compiler may contract a multiply-add into an FMA).
//
// Rows: 2-D [R, P] views with any row stride (the parameter part of a flat [K, P_all] buffer) or
// 1-D; the innermost dimension must be contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace {

void check_operand(const at::Tensor& t, const at::Tensor& p, const char* arg) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "adam_step: ", arg,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == p.sizes(), "adam_step: ", arg, " has shape ", t.sizes(),
              ", param has ", p.sizes());
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 2 && t.stride(-1) == 1, "adam_step: ", arg,
              " must be 1-D or 2-D with a contiguous last dimension, got shape ", t.sizes(),
              " strides ", t.strides());
}

template <bool WD, bool LERP_LOW>
void update(float* __restrict p, const float* __restrict g, float* __restrict m,
            float* __restrict v, int64_t n, float wd, float w1, float b2, float c2, float bc2_sqrt,
            float eps, float neg_step) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = WD ? g[i] + wd * p[i] : g[i];
    const float mi = LERP_LOW ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * (1.f - w1);
    const float vi = v[i] * b2 + c2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] + neg_step * mi / denom;
  }
}

void adam_step(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, double lr,
               double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_operand(p, p, "param");
  check_operand(g, p, "grad");
  check_operand(m, p, "exp_avg");
  check_operand(v, p, "exp_avg_sq");
  TORCH_CHECK(step >= 1, "adam_step: step must be >= 1, got ", step);
  const int64_t R = p.dim() == 2 ? p.size(0) : 1;
  const int64_t P = p.size(-1);
  if (R == 0 || P == 0) return;
  // the scalars as torch computes them (double) and hands them to float kernels
  const float wd = static_cast<float>(weight_decay);
  const float w1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2);
  const float c2 = static_cast<float>(1.0 - beta2);
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  const float epsf = static_cast<float>(eps);
  const float neg_step = static_cast<float>(-lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  const bool use_wd = weight_decay != 0.0;
  const bool lerp_low = w1 < 0.5f;  // torch's lerp picks its formula by the weight
  auto rs = [](const at::Tensor& t) { return t.dim() == 2 ? t.stride(0) : int64_t{0}; };
  const int64_t sp = rs(p), sg = rs(g), sm = rs(m), sv = rs(v);
  float* pd = p.data_ptr<float>();
  const float* gd = g.data_ptr<float>();
  float* md = m.data_ptr<float>();
  float* vd = v.data_ptr<float>();
  constexpr int64_t kBlock = 1 << 14;
  const int64_t blocks_per_row = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, R * blocks_per_row, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / blocks_per_row;
      const int64_t lo = (b % blocks_per_row) * kBlock;
      const int64_t n = std::min(P, lo + kBlock) - lo;
      float* pr = pd + r * sp + lo;
      const float* gr = gd + r * sg + lo;
      float* mr = md + r * sm + lo;
      float* vr = vd + r * sv + lo;
      // one loop per case, so each vectorizes without per-element branches
      if (use_wd && lerp_low)
        update<true, true>(pr, gr, mr, vr, n, wd, w1, b2, c2, bc2_sqrt, epsf, neg_step);
      else if (use_wd)
        update<true, false>(pr, gr, mr, vr, n, wd, w1, b2, c2, bc2_sqrt, epsf, neg_step);
      else if (lerp_low)
        update<false, true>(pr, gr, mr, vr, n, wd, w1, b2, c2, bc2_sqrt, epsf, neg_step);
      else
        update<false, false>(pr, gr, mr, vr, n, wd, w1, b2, c2, bc2_sqrt, epsf, neg_step);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def("adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) { m.impl("adam_step", &adam_step); }
