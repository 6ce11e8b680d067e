// CUDA binding of topk_rows_ (kernel in topk_kernels.cu; schema and CPU kernel in topk.cpp).
// Validates tensors, runs the kernel on the current stream, and reports the first row holding a
// non-finite value with the CPU kernel's message (one device-to-host copy of the row flags).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

cudaError_t fsl_topk_cuda_launch(const float* x, int64_t N, int64_t M, int64_t k, int64_t* index,
                                 float* values, int* bad, cudaStream_t stream);

namespace {

void topk_rows_cuda(const at::Tensor& x, int64_t k, at::Tensor index, at::Tensor values) {
  const char* op = "topk_rows_";
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous 2-D float32 CUDA tensor, got ", x.scalar_type(), " ", x.sizes(),
              " on ", x.device());
  const int64_t N = x.size(0), M = x.size(1);
  TORCH_CHECK(k >= 1 && k <= M, op, ": k must be in [1, M = ", M, "], got ", k);
  TORCH_CHECK(M < (int64_t(1) << 31), op, ": rows of 2^31 or more values are not supported (the "
              "kernel counts them in 32 bits), got M = ", M);
  TORCH_CHECK(index.device() == x.device() && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.dim() == 2 && index.size(0) == N && index.size(1) == k,
              op, ": index must be a contiguous int64 [", N, ", ", k, "] tensor on ", x.device(), ", got ",
              index.scalar_type(), " ", index.sizes(), " on ", index.device());
  TORCH_CHECK(values.device() == x.device() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.dim() == 2 && values.size(0) == N && values.size(1) == k,
              op, ": values must be a contiguous float32 [", N, ", ", k, "] tensor on ", x.device(), ", got ",
              values.scalar_type(), " ", values.sizes(), " on ", values.device());
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor bad = at::zeros({N}, x.options().dtype(at::kInt));
  const cudaError_t err = fsl_topk_cuda_launch(x.data_ptr<float>(), N, M, k, index.data_ptr<int64_t>(),
                                               values.data_ptr<float>(), bad.data_ptr<int>(),
                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): launch failed: ", cudaGetErrorString(err));
  const at::Tensor rows = bad.nonzero();
  TORCH_CHECK(rows.size(0) == 0, op, ": non-finite value in row ", rows[0][0].item<int64_t>());
}

}  // namespace

TORCH_LIBRARY_IMPL(fsl_fast, CUDA, m) { m.impl("topk_rows_", &topk_rows_cuda); }
