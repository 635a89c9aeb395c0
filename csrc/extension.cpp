// Framework glue of fastkd._C: the Python module and the torch.ops.fastkd operator library.
//
// fastkd._C has no pybind11 bindings. Python code calls the operators through the dispatcher
// (torch.ops.fastkd.<op>), so the module only has to exist: importing it loads this shared library, which
// runs the static initializers of TORCH_LIBRARY / TORCH_LIBRARY_IMPL below and in the other glue files.
// See csrc/README.md for where kernels and their registrations go.

#include <Python.h>

#include <torch/library.h>

#include <string>

#ifdef FASTKD_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION of the toolkit the extension was compiled with
#endif

// FASTKD_BUILD_TORCH_VERSION and FASTKD_BUILD_CUDA_ARCHS ("8.0,9.0+PTX", empty without CUDA) as string
// literals, written by setup.py into its build folder (-D values would be split at commas by nvcc).
#include "fastkd_build_config.h"

namespace fastkd {
namespace {

// "key=value;key=value": what the extension was built with. fastkd/_extension.py parses this format.
std::string build_info() {
  std::string info;
  const auto add = [&info](const char* key, const std::string& value) {
    if (!info.empty()) {
      info += ';';
    }
    info += key;
    info += '=';
    info += value;
  };
#ifdef FASTKD_WITH_CUDA
  add("cuda", "1");
#else
  add("cuda", "0");
#endif
  add("torch", FASTKD_BUILD_TORCH_VERSION);
#if defined(FASTKD_WITH_CUDA) && defined(CUDA_VERSION)
  add("cuda_version", std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10));
#else
  add("cuda_version", "");
#endif
  add("archs", FASTKD_BUILD_CUDA_ARCHS);
#ifdef _OPENMP
  add("openmp", "1");
#else
  add("openmp", "0");
#endif
  return info;
}

}  // namespace
}  // namespace fastkd

// The one TORCH_LIBRARY block of the fastkd namespace. Every op declares its schema in csrc/<op>/<op>_schema.cpp
// (TORCH_LIBRARY_FRAGMENT), in both: fastkd holds the real implementations (CUDA kernels on the CUDA key,
// C++ CPU implementations on the CPU key, registered with TORCH_LIBRARY_IMPL in <op>_cuda.cpp and
// <op>_cpu.cpp); fastkd_emulated runs the same CUDA kernel sources on CPU tensors (<op>_emulated.cpp; its
// TORCH_LIBRARY block is in emulator/selftest.cpp).
TORCH_LIBRARY(fastkd, m) {
  // A plain function, not a per-dispatch-key kernel: it is the same for every device (and takes no tensor).
  m.def("build_info() -> str", &fastkd::build_info);
}


// The module init function Python looks up when importing fastkd._C; it returns an empty module.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "fastkd._C",  // m_name
      "fastkd's compiled operators; importing this module registers them as torch.ops.fastkd.*",  // m_doc
      -1,       // m_size: no per-interpreter state
      nullptr,  // m_methods: none, the operators are called through torch.ops
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
