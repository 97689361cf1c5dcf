// Layer 3: the AVX2 build of the random kernels. Standard headers come before
// the target pragma so that only this file's own code is compiled for AVX2
// (no AVX2 copies of shared inline functions). FMA stays off: the bits must
// equal the baseline build's.
#include "aten/RandomKernels.h"

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2")
#define TORCH_MPS_EXT_HAVE_AVX2_BUILD 1
#define MPS_EXT_RNG_AVX2 1
#endif

namespace torch_mps_ext::rng::avx2 {

#ifdef TORCH_MPS_EXT_HAVE_AVX2_BUILD
#include "aten/RandomKernelsImpl.h"
#pragma GCC pop_options

const Kernels* variant() {
  static const Kernels* k = [] {
    static const Kernels table = makeKernels();
    return __builtin_cpu_supports("avx2") ? &table : nullptr;
  }();
  return k;
}
#else
const Kernels* variant() { return nullptr; }
#endif

} // namespace torch_mps_ext::rng::avx2
