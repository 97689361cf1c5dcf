r"""Every private torch API torch_mps_ext uses, in one place.

Checked against torch ``CHECKED_AGAINST``. A torch upgrade is a review of
this file: the Python names below are imported from here by the rest of the
package (``tests/test_compat.py`` resolves each of them), and the native core's
use of torch internals is listed at the end with the file that relies on each.

Python (imported here, re-exported):

=====================================================  ===========================================
private API                                            used by / for
=====================================================  ===========================================
``torch._register_device_module``                      _registration: installs ``torch.mps_ext``
``torch._C._DisableFuncTorch``                         random.set_rng_state: clone outside functorch
``torch._utils.classproperty``                         storage: the legacy storage classes' dtype
``torch.storage._LegacyStorage``,                      storage: ``torch.mps_ext.FloatStorage`` &c.
``_dtype_to_storage_type_map``, ``_warn_typed_storage_removal``
``torch._C._distributed_c10d`` (ProcessGroupGloo,      distributed: the ``"mps_ext"`` c10d backend
options classes), ``dist.Backend._plugins``
``torchgen/packaged/ATen/native/                       fidelity: which operators have an MPS kernel
native_functions.yaml`` (the operator table torch     (``native_functions_yaml()``, parsed by
ships; its layout: ``- func:`` entries, ``dispatch:``  fidelity/_optable.py)
keys, ``structured_delegate``, ``autogen``)
``torch/_tensor_str.py``, ``amp/grad_scaler.py``      fidelity/mps_overrides.txt: torch code that
(their ``device.type == "mps"`` branches, by file and  takes another branch on MPS (by file:function)
function name)
``torch._dynamo.device_interface`` (MpsInterface,      _inductor: torch.compile on mps_ext
register_interface_for_device); ``torch._inductor``    (imported on first compile, ``inductor()``)
codegen.common/mps/mps_device_op_overrides/wrapper/
wrapper_fxir, lowering.unsupported_input_tensor,
runtime.runtime_utils.compile_mps_shader
=====================================================  ===========================================

C++ (csrc/, reviewed by reading each file named):

* ``TensorImpl`` internals: ``set_sizes_and_strides``, ``_set_conj``/``_set_neg``,
  ``set_storage_keep_dtype``, ``set_wrapped_number``, ``has_compatible_shallow_copy_type``
  (aten/HostView.cpp, Fallback.cpp, Ops.cpp, HotOps.cpp).
* ``StorageImpl::set_data_ptr``/``set_data_ptr_noswap``/``set_nbytes`` (aten/HostView.cpp,
  Fallback.cpp, Ops.cpp).
* ``at::native::*`` kernels and structured classes called directly: ``copy_``, ``set_``,
  ``set_storage_cpu_``, ``set_tensor_``, ``as_strided_tensorimpl``, ``_reshape_alias``,
  ``_local_scalar_dense_cpu``, ``structured_ufunc_add_CPU`` & co., ``relu``, ``result_type``
  (aten/Ops.cpp, HotOps.cpp).
* ``DispatchStub`` internals (``DispatchStubImpl`` entries for PrivateUse1; HAVE_*_CPU_DEFINITION
  layout) (aten/HotOps.cpp, DispatchStubs.cpp, CMakeLists.txt).
* ``c10::SetCPUAllocator`` with a priority (aten/HostView.cpp).
* ``c10::AutogradState`` TLS (core/ThreadState.cpp).
* ``at::detail::empty_generic``/``empty_strided_generic``, ``scalar_tensor_static``
  (aten/Ops.cpp, HostView.cpp).
* Kineto's ``PrivateUse1ProfilerRegistry`` and the autograd profiler's legacy device hooks
  (core/ProfilerKineto.cpp, ProfilerStubs.cpp); ``c10d::Logger`` timers (core/DdpTimer.cpp).
* ``caffe2::GetBuildOptions()["COMMIT_SHA"]``, which MPS's NotImplementedError names
  (aten/Fidelity.cpp); ``c10::Warning`` with ``verbatim`` (aten/Fidelity.cpp).
* ``torch/csrc/autograd/python_variable.h`` (``THPVariable_Unpack``) and
  ``torch/csrc/Generator.h`` in the bindings (python/Shaders.cpp, Random.cpp).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as _dist
from torch._C import _DisableFuncTorch as DisableFuncTorch  # noqa: F401
from torch._utils import classproperty  # noqa: F401
from torch.storage import (  # noqa: F401
    _LegacyStorage as LegacyStorage,
    _dtype_to_storage_type_map as dtype_to_storage_type_map,
    _warn_typed_storage_removal as warn_typed_storage_removal,
)

CHECKED_AGAINST = "2.13.0"

register_device_module = torch._register_device_module


def distributed_backend_plugins() -> dict:
    """c10d's registry of third-party backends (``dist.Backend._plugins``)."""
    return _dist.Backend._plugins


def gloo():
    """gloo's process group and the collective option classes."""
    from torch._C._distributed_c10d import (
        AllgatherOptions,
        AllToAllOptions,
        ProcessGroupGloo,
        ReduceScatterOptions,
    )

    return SimpleNamespace(ProcessGroupGloo=ProcessGroupGloo, AllgatherOptions=AllgatherOptions,
                           AllToAllOptions=AllToAllOptions,
                           ReduceScatterOptions=ReduceScatterOptions)


def native_functions_yaml() -> str:
    """The operator table the installed torch ships (torchgen's packaged copy
    of ATen's native_functions.yaml), located without importing torchgen."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchgen")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchgen (shipped with torch) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "packaged", "ATen", "native",
                        "native_functions.yaml")


def inductor():
    """Dynamo's and Inductor's internals used by torch.compile on mps_ext
    (imported on the first compile: Inductor is heavy)."""
    from torch._dynamo.device_interface import MpsInterface, register_interface_for_device
    from torch._inductor import lowering
    from torch._inductor.codegen.common import register_device_op_overrides
    from torch._inductor.codegen.mps import MetalScheduling
    from torch._inductor.codegen.mps_device_op_overrides import MPSDeviceOpOverrides
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    from torch._inductor.codegen.wrapper_fxir import WrapperFxCodegen
    from torch._inductor.runtime import runtime_utils

    return SimpleNamespace(
        MpsInterface=MpsInterface, register_interface_for_device=register_interface_for_device,
        lowering=lowering, register_device_op_overrides=register_device_op_overrides,
        MetalScheduling=MetalScheduling, MPSDeviceOpOverrides=MPSDeviceOpOverrides,
        PythonWrapperCodegen=PythonWrapperCodegen, WrapperFxCodegen=WrapperFxCodegen,
        runtime_utils=runtime_utils)


def testing_internals(macos_version: float):
    """PyTorch's test framework as ``python -m torch_mps_ext.fidelity
    test-mps`` needs it (torch_mps_ext/fidelity/_testmps.py): common_utils
    and common_device_type with their MPS switches set as on a Mac of
    ``macos_version`` (read at their import: TEST_MPS, MACOS_VERSION), and
    common_mps imported after them so that it defines its expectation lists
    (it does only ``if torch.backends.mps.is_available()``, at import)."""
    import importlib
    import sys

    from torch.testing._internal import common_utils

    common_utils.TEST_MPS = True
    common_utils.MACOS_VERSION = macos_version
    from torch.testing._internal import common_device_type

    common_device_type.TEST_MPS = True
    if "torch.testing._internal.common_mps" in sys.modules:
        common_mps = importlib.reload(sys.modules["torch.testing._internal.common_mps"])
    else:
        from torch.testing._internal import common_mps
    return SimpleNamespace(common_utils=common_utils, common_device_type=common_device_type,
                           common_mps=common_mps, MPSTestBase=common_device_type.MPSTestBase)


def common_mps_path() -> str:
    """The installed torch's torch/testing/_internal/common_mps.py (read as
    text by torch_mps_ext/fidelity/_commonmps.py, not imported)."""
    import os

    return os.path.join(os.path.dirname(torch.__file__), "testing", "_internal", "common_mps.py")


def op_db():
    """PyTorch's OpInfo database (maintainer tool only: slow to import)."""
    from torch.testing._internal.common_methods_invocations import op_db as db

    return db


def torch_dispatch_mode():
    """The base class of Python dispatch modes (maintainer tool only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_leaves(tree) -> list:
    """torch's pytree flattening (maintainer tool only)."""
    from torch.utils._pytree import tree_leaves as leaves

    return leaves(tree)


def sync_batch_norm_input_checks(module, input) -> None:
    """nn.SyncBatchNorm.forward's input checks (its private methods), run by
    mps fidelity mode before it raises a Mac's ValueError
    (torch_mps_ext/fidelity/_devicebranches.py)."""
    module._check_input_dim(input)
    module._check_non_zero_input_channels(input)
