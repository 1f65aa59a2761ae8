// The Python module dsa_ext._C. Importing it runs the static TORCH_LIBRARY registrations of the
// operators; the few functions here are switches that are not operators.
#include <torch/extension.h>

#include "checks.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsa_ext native operators (registered as torch.ops.dsa.*)";
  m.def("set_index_checks", &dsa::set_index_checks, py::arg("enabled"),
        "Check CUDA index tensors for entries outside [-1, S) (one device sync per call).");
  m.def("index_checks_enabled", &dsa::index_checks_enabled);
#ifdef DSA_EXT_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
