// CUDA binding of the quantize ops (kernels in quantize_kernels.cu; schemas in quantize.cpp).
// Validates tensors, picks the device and current stream, and calls the plain launchers.
// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

cudaError_t fsl_quantize_cuda_launch(const void* x, int dtype, int64_t N, int64_t M, int64_t G,
                                     int64_t gs, int64_t code_cols, int bits, bool stochastic,
                                     uint32_t key, void* codes, float* scales,
                                     cudaStream_t stream);
cudaError_t fsl_dequantize_cuda_launch(const void* codes, const float* scales, int64_t N,
                                       int64_t M, int64_t G, int64_t gs, int64_t code_cols,
                                       int bits, void* out, int out_dtype, cudaStream_t stream);

namespace {

int dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK(false, what, " must be float32/float16/bfloat16, got ", t);
  }
  return -1;
}

void check_common(const char* op, int64_t N, int64_t M, int64_t bits, int64_t gs,
                  const at::Tensor& codes, const at::Tensor& scales, const at::Device& dev) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, op, ": bits must be 8, 4 or 2, got ", bits);
  const int64_t per_byte = 8 / bits;
  TORCH_CHECK(gs >= 1 && gs % per_byte == 0, op,
              ": group_size must be >= 1 (even for int4, divisible by 4 for int2), got ", gs);
  const int64_t C = (M + per_byte - 1) / per_byte;
  const int64_t G = (M + gs - 1) / gs;
  TORCH_CHECK(codes.is_cuda() && codes.device() == dev && codes.is_contiguous() &&
                  codes.dim() == 2 && codes.size(0) == N && codes.size(1) == C &&
                  codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              op, ": codes must be a contiguous ", (bits == 8 ? "int8" : "uint8"), " [", N, ", ",
              C, "] tensor on ", dev, ", got ", codes.scalar_type(), " ", codes.sizes(), " on ",
              codes.device());
  TORCH_CHECK(scales.is_cuda() && scales.device() == dev && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G &&
                  scales.scalar_type() == at::kFloat,
              op, ": scales must be a contiguous float32 [", N, ", ", G, "] tensor on ", dev,
              ", got ", scales.scalar_type(), " ", scales.sizes(), " on ", scales.device());
}

void quantize_rows_cuda(const at::Tensor& x, int64_t bits, int64_t gs, bool stochastic,
                        int64_t key, at::Tensor codes, at::Tensor scales) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "quantize_rows_: x must be a contiguous 2-D [N, M] CUDA tensor, got shape ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(key >= 0 && key <= 0xFFFFFFFFLL, "quantize_rows_: key must fit 32 bits, got ", key);
  const int dt = dtype_code(x.scalar_type(), "quantize_rows_: x");
  const int64_t N = x.size(0), M = x.size(1);
  if (N == 0 || M == 0) {
    scales.zero_();
    return;
  }
  check_common("quantize_rows_", N, M, bits, gs, codes, scales, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = fsl_quantize_cuda_launch(
      x.data_ptr(), dt, N, M, scales.size(1), gs, codes.size(1), static_cast<int>(bits),
      stochastic, static_cast<uint32_t>(key), codes.data_ptr(), scales.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "quantize_rows_ (cuda): launch failed: ",
              cudaGetErrorString(err));
}

void dequantize_rows_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                          int64_t gs, at::Tensor out) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.is_contiguous(),
              "quantize_dequantize_: out must be a contiguous 2-D [N, M] CUDA tensor, got ",
              out.sizes(), " on ", out.device());
  const int dt = dtype_code(out.scalar_type(), "quantize_dequantize_: out");
  const int64_t N = out.size(0), M = out.size(1);
  if (N == 0 || M == 0) return;
  TORCH_CHECK(M < (int64_t(1) << 31), "quantize_dequantize_: rows longer than 2^31 elements are "
              "not supported, got M = ", M);
  check_common("quantize_dequantize_", N, M, bits, gs, codes, scales, out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t err = fsl_dequantize_cuda_launch(
      codes.data_ptr(), scales.data_ptr<float>(), N, M, scales.size(1), gs, codes.size(1),
      static_cast<int>(bits), out.data_ptr(), dt, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "quantize_dequantize_ (cuda): launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fsl_fast, CUDA, m) {
  m.impl("quantize_rows_", &quantize_rows_cuda);
  m.impl("quantize_dequantize_", &dequantize_rows_cuda);
}
