// CUDA binding of the flat-buffer FedAvg (compiled only in a CUDA build, FSL_FAST_WITH_CUDA).
// Validates tensors, then calls the plain launcher of fedavg_kernels.cu on the current stream
// (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream returns; the c10 header
// is lighter and lets this file be syntax-checked without the full CUDA library headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

// fedavg.cpp: device-independent argument checks.
void fsl_fast_fedavg_check(const at::Tensor& buf, const at::Tensor& weights, const at::Tensor& out);

// fedavg_kernels.cu
cudaError_t fsl_fast_fedavg_cuda_launch(void* buf, bool is_bf16, int64_t K, int64_t P, int64_t ld,
                                        const float* w, float* out, bool broadcast,
                                        cudaStream_t stream);

namespace {

void run_cuda(const at::Tensor& buf, const at::Tensor& weights, const at::Tensor& out, bool broadcast) {
  fsl_fast_fedavg_check(buf, weights, out);
  TORCH_CHECK(buf.is_cuda(), "fedavg (cuda kernel): buf must be a CUDA tensor, got ", buf.device());
  const c10::cuda::CUDAGuard guard(buf.device());
  const int64_t K = buf.size(0), P = buf.size(1);
  const int64_t ld = K == 1 ? P : buf.stride(0);
  const cudaError_t err = fsl_fast_fedavg_cuda_launch(
      buf.data_ptr(), buf.scalar_type() == at::kBFloat16, K, P, ld, weights.data_ptr<float>(),
      out.data_ptr<float>(), broadcast, c10::cuda::getCurrentCUDAStream(buf.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fedavg (cuda kernel): launch failed for buf ", buf.sizes(), " ",
              buf.scalar_type(), ": ", cudaGetErrorString(err));
}

void fedavg_cuda(const at::Tensor& buf, const at::Tensor& weights, at::Tensor out) {
  run_cuda(buf, weights, out, false);
}

void fedavg_broadcast_cuda(at::Tensor buf, const at::Tensor& weights, at::Tensor out) {
  run_cuda(buf, weights, out, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fsl_fast, CUDA, m) {
  m.impl("fedavg", &fedavg_cuda);
  m.impl("fedavg_broadcast", &fedavg_broadcast_cuda);
}
