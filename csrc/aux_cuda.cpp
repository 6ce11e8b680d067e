// CUDA binding of the fused linear auxiliary head: validates tensors, allocates outputs and
// workspaces, and launches the kernels of aux_kernels.cu on the current stream. Compiled only in a
// CUDA build (FSL_FAST_WITH_CUDA); the schemas are defined in aux.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

int aux_cuda_row_splits(int B);
cudaError_t aux_cuda_estimate(const float* x, const float* W, const float* b, const int64_t* y,
                              float* g, int K, int B, int C, int64_t D, float inv_spread,
                              float scale, cudaStream_t stream);
cudaError_t aux_cuda_align(const float* x, const float* W, const float* b, const int64_t* y,
                           const float* tgt, float* loss, float* dW, float* db, float* ws_R,
                           float* ws_G, float* ws_dz, float* ws_row_loss, float* ws_part, int K,
                           int B, int C, int64_t D, float spread, float scale,
                           cudaStream_t stream);

namespace {

void check_cuda_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& labels, const at::Tensor* target) {
  TORCH_CHECK(x.dim() == 3, "aux (cuda): x must be [K, B, D], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "aux (cuda): x must be float32, got ",
              x.scalar_type());
  const int64_t K = x.size(0), B = x.size(1), D = x.size(2);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == K && weight.size(2) == D,
              "aux (cuda): weight must be [K, C, D] = [", K, ", C, ", D, "], got ", weight.sizes());
  const int64_t C = weight.size(1);
  TORCH_CHECK(C >= 1, "aux (cuda): weight needs at least one class, got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == K && bias.size(1) == C,
              "aux (cuda): bias must be [K, C], got ", bias.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == K && labels.size(1) == B &&
                  labels.scalar_type() == at::kLong,
              "aux (cuda): labels must be int64 [K, B] = [", K, ", ", B, "], got ",
              labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(K <= 65535 && B <= 2147483647 && C <= 65535 * 16,
              "aux (cuda): sizes out of the launch range (K <= 65535), got K=", K, " B=", B,
              " C=", C);
  for (const at::Tensor* t : {&x, &weight, &bias, &labels}) {
    TORCH_CHECK(t->is_cuda() && t->device() == x.device(),
                "aux (cuda): all tensors must be on x's CUDA device ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), "aux (cuda): tensors must be contiguous");
  }
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "aux (cuda): weight and bias must be float32");
  if (target) {
    TORCH_CHECK(target->sizes() == x.sizes() && target->scalar_type() == at::kFloat &&
                    target->is_cuda() && target->device() == x.device() &&
                    target->is_contiguous(),
                "aux (cuda): target must be a contiguous float32 tensor shaped like x ",
                x.sizes(), " on ", x.device(), ", got ", target->scalar_type(), " ",
                target->sizes());
  }
}

at::Tensor aux_estimate_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& labels, double inv_spread,
                             double scale) {
  check_cuda_inputs(x, weight, bias, labels, nullptr);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g = at::empty_like(x);
  cudaError_t err = aux_cuda_estimate(
      x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
      labels.data_ptr<int64_t>(), g.data_ptr<float>(), (int)x.size(0), (int)x.size(1),
      (int)weight.size(1), x.size(2), (float)inv_spread, (float)scale,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aux_estimate (cuda): launch failed: ", cudaGetErrorString(err));
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aux_align_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& labels, const at::Tensor& target, double spread, double scale) {
  check_cuda_inputs(x, weight, bias, labels, &target);
  TORCH_CHECK(spread >= 1, "aux_align (cuda): spread must be >= 1, got ", spread);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(0), B = x.size(1), D = x.size(2), C = weight.size(1);
  const int splits = aux_cuda_row_splits((int)B);
  TORCH_CHECK(K * splits <= 65535, "aux_align (cuda): K * row splits must be <= 65535 (grid z), got K=",
              K, " splits=", splits);
  auto opt = x.options();
  at::Tensor loss = at::empty({K}, opt);
  at::Tensor dW = at::empty({K, C, D}, opt);
  at::Tensor db = at::empty({K, C}, opt);
  at::Tensor ws_R = at::empty({K, B, D}, opt);
  at::Tensor ws_G = at::empty({K, B, C}, opt);
  at::Tensor ws_dz = at::empty({K, B, C}, opt);
  at::Tensor ws_row_loss = at::empty({K, B}, opt);
  at::Tensor ws_part = at::empty({K, splits, C, D}, opt);
  cudaError_t err = aux_cuda_align(
      x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
      labels.data_ptr<int64_t>(), target.data_ptr<float>(), loss.data_ptr<float>(),
      dW.data_ptr<float>(), db.data_ptr<float>(), ws_R.data_ptr<float>(),
      ws_G.data_ptr<float>(), ws_dz.data_ptr<float>(), ws_row_loss.data_ptr<float>(),
      ws_part.data_ptr<float>(), (int)K, (int)B, (int)C, D, (float)spread, (float)scale,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aux_align (cuda): launch failed: ", cudaGetErrorString(err));
  return {loss, dW, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsl_fast, CUDA, m) {
  m.impl("aux_estimate", &aux_estimate_cuda);
  m.impl("aux_align", &aux_align_cuda);
}
