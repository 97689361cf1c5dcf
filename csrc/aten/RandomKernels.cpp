// Layer 3: the baseline-ISA build of the random kernels, and the run-time
// choice between it and the AVX2 build (RandomKernelsAVX2.cpp).

#include "aten/RandomKernels.h"
#include "runtime/Settings.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace torch_mps_ext::rng {

namespace avx2 {
const Kernels* variant();  // RandomKernelsAVX2.cpp; nullptr without AVX2
}

namespace base {
#include "aten/RandomKernelsImpl.h"
}

void philoxBlock(std::uint64_t seed, std::uint64_t block, std::uint32_t out[4]) {
  base::philox(seed, block, 1, out);
}

const Kernels* kernelVariant(int which) {
  static const Kernels baseline = base::makeKernels();
  return which == 0 ? &baseline : avx2::variant();
}

const Kernels& kernels() {
  // TORCH_MPS_EXT_RNG_BASELINE=1 forces the baseline build (tests compare the
  // two builds' results; they must be identical).
  static const Kernels* chosen = [] {
    bool baseline = runtime::settings::flag("TORCH_MPS_EXT_RNG_BASELINE").value_or(false);
    const Kernels* k = baseline ? nullptr : avx2::variant();
    return k ? k : kernelVariant(0);
  }();
  return *chosen;
}

} // namespace torch_mps_ext::rng
