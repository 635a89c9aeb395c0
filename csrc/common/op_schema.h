// FASTKD_OP_SCHEMAS(forward, backward): declares an op's two schemas (C string literals) in the fastkd
// namespace (real implementations: CUDA kernels on the CUDA key, C++ on the CPU key) and, with the same
// text, in fastkd_emulated (the CUDA kernel sources on CPU tensors through the emulator). Used once per op,
// in csrc/<op>/<op>_schema.cpp.
#pragma once

#include <torch/library.h>

#define FASTKD_OP_SCHEMAS(forward, backward)   \
  TORCH_LIBRARY_FRAGMENT(fastkd, m) {          \
    m.def(forward);                            \
    m.def(backward);                           \
  }                                            \
  TORCH_LIBRARY_FRAGMENT(fastkd_emulated, m) { \
    m.def(forward);                            \
    m.def(backward);                           \
  }
