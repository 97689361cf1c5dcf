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
``torch._C._distributed_c10d`` (ProcessGroup,          distributed: the ``"mps_ext"`` c10d backend
ProcessGroupGloo, ``ProcessGroup._register_backend``,  (a group with gloo for CPU tensors, handed
``boxed``/``unbox``; gloo's ``options``,               to the C++ side as a custom-class value)
``_set_sequence_number_for_group``),
``_DistributedBackendOptions``' fields,
``dist.Backend._plugins``
``device_mesh.init_device_mesh``'s letters-only        distributed (``adapt_distributed_checks``):
device-type check (``str.isalpha``),                   ``init_device_mesh("mps_ext", ...)``, and
``DeviceMesh._device_type``; ``monitored_barrier``'s   ``dist.monitored_barrier`` on mps_ext groups
gloo-only check (``get_backend(group)``)
``torchgen/packaged/ATen/native/                       fidelity: which operators have an MPS kernel
native_functions.yaml`` (the operator table torch     (``native_functions_yaml()``, parsed by
ships; its layout: ``- func:`` entries, ``dispatch:``  fidelity/_optable.py)
keys, ``structured_delegate``, ``autogen``)
``torch/_tensor_str.py``, ``amp/grad_scaler.py``      fidelity/mps_overrides.txt: torch code that
(their ``device.type == "mps"`` branches, by file and  takes another branch on MPS (by file:function)
function name)
``torch._dynamo.device_interface`` (MpsInterface,      _inductor: torch.compile on mps_ext
register_interface_for_device); ``torch._inductor``    (imported on first compile, ``inductor()``):
codegen.common (register_backend_for_device,           the device registration: C++ or Metal
register_device_op_overrides, DeviceOpOverrides),      generator, Python wrapper calling C++
codegen.cpp.CppScheduling, codegen.mps.MetalScheduling kernels on mps_ext, cache-key pass
codegen.wrapper (PythonWrapperCodegen and its
``_generate_kernel_call_helper``/``write_header``/
``create``, SubgraphPythonWrapperCodegen),
wrapper_fxir, custom_graph_pass.CustomGraphModulePass,
virtualized.V, runtime.runtime_utils.compile_mps_shader
Inductor's ``device.type == "cpu"`` decisions,         _inductor._adapt_inductor: the C++
wrapped to include mps_ext under the C++ generator:    generator gets CPU's answers on mps_ext
``utils.get_current_backend`` (and the modules that
import it by name: codegen.common, scheduler,
kernel.mm_common), ``ir.is_cpu``,
``scheduler.BaseSchedulerNode.is_cpu``,
``codecache.FxGraphHashDetails.
_may_generate_cpu_cpp_code``;
``lowering.unsupported_input_tensor`` (Metal: float64)
``torch._utils.`` ``_augment_memory_snapshot_``       memory._snapshot(augment_with_fx_traces=True):
``stack_traces``                                       FX source lines in a snapshot's frames
``torch.testing._internal``: common_utils              fidelity/_testmps.py (``test-mps``): the Mac
(``TEST_MPS``, ``MACOS_VERSION``), common_device_type  test_mps.py believes in
(``TEST_MPS``, ``MPSTestBase``), common_mps            (``testing_internals()``)
``torch/testing/_internal/common_mps.py`` (read as     fidelity/_commonmps.py: common_mps's lists
text), ``common_methods_invocations.op_db``,           mapped to ATen operators (maintainer tool,
``torch.utils._python_dispatch.TorchDispatchMode``,    ``--write``)
``torch.utils._pytree.tree_leaves``
``torch._C._dispatch_get_all_op_names``,               fidelity: operators with an MPS kernel
``_dispatch_has_kernel_for_dispatch_key``,             registered from Python at import, outside
``_dispatch_dump`` (its "MPS: registered at" line)     the table (``python_mps_kernels()``)
``nn.SyncBatchNorm._check_input_dim``,                 fidelity/_devicebranches.py: a Mac's
``_check_non_zero_input_channels``                     SyncBatchNorm ValueError after its checks
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
* c10d's C++ interfaces: ``c10d::Backend`` and ``c10d::Work`` (every virtual the mps_ext backend
  overrides or forwards), ``c10d::ProcessGroup``'s ``setBackend``/``setDefaultBackend``/
  ``getBackend``/``getStore``/``getBackendName``, and the TorchScript custom class
  ``c10d.ProcessGroup`` in an operator schema (distributed/ProcessGroupMpsExt.cpp,
  python/Distributed.cpp).
* ``caffe2::GetBuildOptions()["COMMIT_SHA"]``, which MPS's NotImplementedError names
  (aten/Fidelity.cpp); ``c10::Warning`` with ``verbatim`` (aten/Fidelity.cpp).
* ``torch::CapturedTraceback::gather`` and ``torch::symbolize``
  (``torch/csrc/profiler/combined_traceback.h``: the stacks of memory history, whose Python
  unwinder torch installs at import), ``c10::CachingDeviceAllocator::RecordContext`` /
  ``CreateContextFn`` (python/Memory.cpp, core/Allocator.cpp).
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
    """gloo's process group (c10d's C++ backend)."""
    from torch._C._distributed_c10d import ProcessGroupGloo

    return SimpleNamespace(ProcessGroupGloo=ProcessGroupGloo)


def gloo_process_group(opts):
    """A c10d ProcessGroup whose CPU tensors go to a new gloo backend, made
    from c10d's ``_DistributedBackendOptions`` as torch makes its gloo groups
    (group name and global ranks in the backend's options, the group's
    sequence number agreed through the store)."""
    from torch._C._distributed_c10d import ProcessGroup

    store, rank, size = opts.store, opts.group_rank, opts.group_size
    gloo_backend = gloo().ProcessGroupGloo(store, rank, size, opts.timeout)
    gloo_backend.options.global_ranks_in_group = opts.global_ranks_in_group
    gloo_backend.options.group_name = opts.group_id
    gloo_backend._set_sequence_number_for_group()
    group = ProcessGroup(store, rank, size)
    group._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, gloo_backend)
    return group


def process_group_through(op, group):
    """``op`` applied to a process group as a TorchScript value: c10d's
    ProcessGroup crosses to a dispatcher operator (and back) as the custom
    class ``c10d.ProcessGroup`` (``boxed()``/``unbox()``), without pybind11."""
    from torch._C._distributed_c10d import ProcessGroup

    return ProcessGroup.unbox(op(group.boxed()))


class _DeviceTypeName(str):
    """A device-type name that ``init_device_mesh``'s check ("device types
    are letters only", meant to refuse "cuda:0") accepts although it has an
    underscore: ``mps_ext`` (the name the PrivateUse1 backend was given)."""

    def isalpha(self) -> bool:
        return self.replace("_", "a").isalpha()


def adapt_distributed_checks(device_type: str) -> None:
    """Lets two torch.distributed entry points accept ``device_type``'s groups
    and meshes (idempotent):

    * ``init_device_mesh(device_type, ...)``: torch refuses a device type
      whose name is not all letters ("Device type with index is not
      supported"); the name is passed through that check as a
      ``_DeviceTypeName`` and the mesh keeps the plain string. Every loaded
      module that imported torch's function by name gets the adapted one
      (torch.distributed, .device_mesh, .tensor, FSDP's init).
    * ``monitored_barrier(group)``: torch accepts only groups whose backend
      is named "gloo"; for a group named ``device_type`` (its CPU
      tensors are gloo's, where c10d's monitored barrier runs) it calls the
      group's ``monitored_barrier`` as torch does for gloo groups.
    """
    import functools
    import sys
    from datetime import timedelta

    import torch.distributed.device_mesh as device_mesh

    torch_init = device_mesh.init_device_mesh
    if not getattr(torch_init, "_mps_ext_adapted", False):
        @functools.wraps(torch_init)
        def init_device_mesh(*args, **kwargs):
            # device_type: torch's first parameter, by position or by name
            given = args[0] if args else kwargs.get("device_type")
            if not (isinstance(given, str) and given == device_type):
                return torch_init(*args, **kwargs)
            if args:
                args = (_DeviceTypeName(device_type), *args[1:])
            else:
                kwargs["device_type"] = _DeviceTypeName(device_type)
            mesh = torch_init(*args, **kwargs)
            mesh._device_type = device_type
            return mesh

        init_device_mesh._mps_ext_adapted = True
        for name, module in list(sys.modules.items()):
            if name.startswith("torch.distributed") and \
                    getattr(module, "init_device_mesh", None) is torch_init:
                module.init_device_mesh = init_device_mesh

    c10d = _dist.distributed_c10d
    torch_barrier = c10d.monitored_barrier
    if not getattr(torch_barrier, "_mps_ext_adapted", False):
        @functools.wraps(torch_barrier)
        def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
            pg = group
            if pg is None and _dist.is_initialized():
                pg = c10d._get_default_group()
            # The group's own name: get_backend(group) says "undefined" for
            # a default group made by init_process_group() without a name.
            if isinstance(pg, _dist.ProcessGroup) and pg.name() == device_type:
                if timeout is None:
                    timeout = _dist.constants.default_pg_timeout
                elif isinstance(timeout, (int, float)):
                    timeout = timedelta(seconds=timeout)
                return pg.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)
            return torch_barrier(group, timeout, wait_all_ranks)

        monitored_barrier._mps_ext_adapted = True
        c10d.monitored_barrier = monitored_barrier
        _dist.monitored_barrier = monitored_barrier


def augment_memory_snapshot_stack_traces():
    """Adds FX graphs' original source lines to a memory snapshot's frames
    (what torch.cuda.memory._snapshot(augment_with_fx_traces=True) calls;
    device-agnostic)."""
    from torch._utils import _augment_memory_snapshot_stack_traces

    return _augment_memory_snapshot_stack_traces


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
    from torch._inductor import codecache, config, ir, lowering, scheduler
    from torch._inductor.codegen.common import (
        DeviceOpOverrides,
        register_backend_for_device,
        register_device_op_overrides,
    )
    from torch._inductor.codegen.cpp import CppScheduling
    from torch._inductor.codegen.mps import MetalScheduling
    from torch._inductor.codegen.wrapper import (
        PythonWrapperCodegen,
        SubgraphPythonWrapperCodegen,
    )
    from torch._inductor.codegen.wrapper_fxir import WrapperFxCodegen
    from torch._inductor.custom_graph_pass import CustomGraphModulePass
    from torch._inductor.runtime import runtime_utils
    from torch._inductor.virtualized import V

    import sys

    from torch._inductor import utils
    from torch._inductor.kernel import mm_common  # noqa: F401  (imports get_current_backend)

    def imports_of(function):
        """The Inductor modules holding ``function`` under its own name."""
        name = function.__name__
        return [m for k, m in list(sys.modules.items())
                if k.startswith("torch._inductor") and getattr(m, name, None) is function]

    return SimpleNamespace(
        utils=utils, imports_of=imports_of, MpsInterface=MpsInterface, register_interface_for_device=register_interface_for_device,
        codecache=codecache, config=config, ir=ir, lowering=lowering, scheduler=scheduler,
        DeviceOpOverrides=DeviceOpOverrides, register_backend_for_device=register_backend_for_device,
        register_device_op_overrides=register_device_op_overrides, CppScheduling=CppScheduling,
        MetalScheduling=MetalScheduling, PythonWrapperCodegen=PythonWrapperCodegen,
        SubgraphPythonWrapperCodegen=SubgraphPythonWrapperCodegen,
        WrapperFxCodegen=WrapperFxCodegen, CustomGraphModulePass=CustomGraphModulePass,
        runtime_utils=runtime_utils, V=V)


# torch's testing modules whose sample-input code asks
# `torch.device(device).type == "mps"` (no float64 samples on MPS); the
# test-mps runner widens that test to mps_ext (fidelity/_testmps.py).
# Checked against torch 2.13.0 (grep the four files for `.type == "mps"`).
SAMPLE_BRANCH_MODULES = (
    "torch.testing._internal.common_dtype",
    "torch.testing._internal.opinfo.definitions._masked",
    "torch.testing._internal.opinfo.definitions.linalg",
    "torch.testing._internal.common_methods_invocations",
)


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


def has_kernel_for_dispatch_key(operator: str, key: str) -> bool:
    """Whether the dispatcher has a kernel of ``operator`` ("aten::name.overload")
    registered for dispatch key ``key`` (an alias key like
    "CompositeExplicitAutogradNonFunctional" included). Checked against torch
    2.13.0's torch._C._dispatch_has_kernel_for_dispatch_key."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(operator, key))


def python_mps_kernels(names=None) -> dict[str, str]:
    """``{"aten::linalg_lu_solve.out": "torch/_refs/linalg/__init__.py:437"}``:
    the operators (of ``names``, or all) this process has a kernel for the
    ``MPS`` dispatch key for, with where it was registered. A CPU build of torch compiles no MPS
    kernels, so each was registered from Python at import (torch 2.13:
    ``torch/_refs/linalg`` registers ``linalg_lu_solve.out`` for MPS), code
    that runs on a Mac too."""
    import os
    import re

    C = torch._C
    found = {}
    for name in C._dispatch_get_all_op_names() if names is None else names:
        if not C._dispatch_has_kernel_for_dispatch_key(name, "MPS"):
            continue
        m = re.search(r"^MPS: registered at (\S+?)(?::(\d+))? ::", C._dispatch_dump(name), re.M)
        where = (m.group(1) + (":" + m.group(2) if m.group(2) else "")) if m else "unknown"
        marker = os.sep + "torch" + os.sep
        if marker in where:
            where = "torch/" + where.rsplit(marker, 1)[1].replace(os.sep, "/")
        found[name] = where
    return found


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
