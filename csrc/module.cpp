// Python module shell of fsl_fast._C. The ops themselves register with the PyTorch dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in each op's file), so importing this module is
// what makes torch.ops.fsl_fast.* available. Each op's file is self-contained: no central list.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static bool cuda_built() {
#ifdef FSL_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fsl_fast fused ops (registered under torch.ops.fsl_fast)";
  m.def("cuda_built", &cuda_built, "True when the CUDA kernels were compiled into this module");
  m.def("omp_max_threads", &omp_max_threads, "OpenMP thread count seen by the kernels");
}
