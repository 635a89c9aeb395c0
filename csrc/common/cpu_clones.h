// FASTKD_CPU_CLONES: the attribute of the hot functions of the C++ CPU implementations (the *_cpu.cpp files).
// Such a function is compiled twice, for AVX2 + FMA (x86-64-v3) and for the baseline, and the faster one the
// processor supports is picked when the library loads (GCC and Clang function multiversioning; elsewhere the
// macro is empty and the function is compiled once, for the baseline). Functions a clone calls inline are
// compiled into each clone.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define FASTKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTKD_CPU_CLONES
#endif
