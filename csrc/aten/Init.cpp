// Layer 3: backend initialisation (Init.h).
#include "aten/Init.h"

#include "aten/Fallback.h"
#include "core/Allocator.h"
#include "core/Hooks.h"
#include "runtime/Device.h"

namespace torch_mps_ext {

void initialize() {
  runtime::initialize();
  validateAllocatorEnvironment();
  registerHooks();
  preferCpuKernels();
}

} // namespace torch_mps_ext
