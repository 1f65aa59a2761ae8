// The Python module dsa_ext._C. Importing it runs the static TORCH_LIBRARY registrations of the
// operators; the few functions here are switches that are not operators.
#include <torch/extension.h>

#include "checks.h"
#include "cpu/bf16_tiles.h"
#include "cpu/parallel.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsa_ext native operators (registered as torch.ops.dsa.*)";
  m.def("set_index_checks", &dsa::set_index_checks, py::arg("enabled"),
        "Check CUDA index tensors for entries outside [-1, S) (one device sync per call).");
  m.def("index_checks_enabled", &dsa::index_checks_enabled);
  m.attr("openmp_version") = dsa::cpu::openmp_version();
  m.def("take_cpu_threads_seen", &dsa::cpu::take_threads_seen,
        "Bit mask of the threads that ran CPU kernel work since the last call (bit i: thread i); clears it.");
  m.def("cpu_bf16_tiles_available", &dsa::cpu::bf16::available,
        "Whether this CPU has AVX512-BF16, which the bfloat16 CPU kernels use when it is switched on.");
  m.def("set_cpu_bf16_tiles", &dsa::cpu::bf16::set_enabled, py::arg("enabled"),
        "Switch the AVX512-BF16 micro-kernels of the bfloat16 CPU kernels on (default) or off.");
  m.def("cpu_bf16_tiles_enabled", &dsa::cpu::bf16::enabled);
#ifdef DSA_EXT_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
