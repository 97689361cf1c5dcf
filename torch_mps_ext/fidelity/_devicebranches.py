r"""torch code that decides by device type and takes another path on MPS than
on mps_ext, reproduced in mps mode where the operator table cannot see it
(docs/fidelity.md, "Torch's own branches").

* ``torch.linalg.matrix_rank``, ``torch.linalg.pinv`` and ``torch.pinverse``
  compute their default tolerances in float64, in float32 on MPS (ATen's
  ``get_atol_rtol`` picks the dtype by device type). In mps mode the float64
  they create for a non-float64 input is therefore not refused; a float64
  input still is, as on a Mac.
* ``nn.SyncBatchNorm`` in training with ``torch.distributed`` initialized
  accepts cuda, hpu, xpu and the PrivateUse1 device -- mps_ext, not mps: a
  Mac raises its ``ValueError`` (naming the PrivateUse1 backend as a Mac
  names it, ``privateuseone``) after the input checks and the
  ``num_batches_tracked`` update, as the module does.

* ``torch.nn.functional.linear`` (``nn.Linear``): MPS registers its own
  kernel for ``aten::linear`` (``_mps_linear``, operations/Linear.mm), which
  checks its arguments before computing -- floating or complex dtypes, every
  tensor on the device -- with texts of its own; on mps_ext ``linear`` is
  ATen's composite, whose ``addmm``/``matmul`` would answer with CPU's texts.
  The wrapper makes the same checks, in the same order, when a tensor is on
  the device (the call MPS's kernel would get).

Installed by ``set_fidelity("mps")``, removed by ``set_fidelity("off")``: the
wrappers replace the attributes of ``torch.linalg``, ``torch`` and
``torch.Tensor``, so a name imported from them earlier is not covered.
"""

from __future__ import annotations

import functools
import threading

import torch

DEVICE = "mps_ext"
_WIDE = (torch.float64, torch.complex128)
SYNC_BATCH_NORM_TEXT = ("SyncBatchNorm expected input tensor to be on GPU or XPU or "
                        "privateuseone")

_local = threading.local()
_MISSING = object()
_saved: dict[tuple[object, str], object] = {}  # the owner's own attribute, or _MISSING


def excusing() -> bool:
    """True while a wrapped tolerance computation runs on this thread."""
    return getattr(_local, "depth", 0) > 0


def _tolerance_wrapper(fn):
    @functools.wraps(fn)
    def wrapper(input, *args, **kwargs):
        if (isinstance(input, torch.Tensor) and input.device.type == DEVICE
                and input.dtype not in _WIDE):
            _local.depth = getattr(_local, "depth", 0) + 1
            try:
                return fn(input, *args, **kwargs)
            finally:
                _local.depth -= 1
        return fn(input, *args, **kwargs)

    wrapper.__torch_mps_ext_branch__ = fn
    return wrapper


def _sync_batch_norm_forward(original):
    @functools.wraps(original)
    def forward(self, input):
        import torch.distributed as dist

        if (input.device.type == DEVICE and self.training and dist.is_available()
                and dist.is_initialized()):
            # What the module does before it decides, then a Mac's refusal.
            from .._compat import sync_batch_norm_input_checks

            sync_batch_norm_input_checks(self, input)
            if self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            raise ValueError(SYNC_BATCH_NORM_TEXT)
        return original(self, input)

    forward.__torch_mps_ext_branch__ = original
    return forward


def _linear_supported(t) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def _linear_wrapper(fn):
    @functools.wraps(fn)
    def linear(input, weight, bias=None):
        tensors = [t for t in (input, weight, bias) if isinstance(t, torch.Tensor)]
        if any(t.device.type == DEVICE for t in tensors) and len(tensors) == len(
                [t for t in (input, weight, bias) if t is not None]):
            # _mps_linear's checks, in its order, with its texts.
            if not _linear_supported(input):
                raise RuntimeError("MPS device does not support linear for non-float inputs")
            if input.device.type != DEVICE:
                raise RuntimeError(f"Tensor for argument input is on {input.device} "
                                   "but expected on mps")
            if not _linear_supported(weight):
                raise RuntimeError("MPS device does not support linear for non-float weights")
            if weight.device.type != DEVICE:
                raise RuntimeError(f"Tensor for argument weight is on {weight.device} "
                                   "but expected on mps")
            if bias is not None:
                if bias.device.type != DEVICE:
                    raise RuntimeError(f"Tensor for argument bias is on {bias.device} "
                                       "but expected on mps")
                if not _linear_supported(bias):
                    raise RuntimeError("MPS device does not support linear for non-float bias")
        return fn(input, weight, bias)

    linear.__torch_mps_ext_branch__ = fn
    return linear


def _targets():
    return [
        (torch.linalg, "matrix_rank", _tolerance_wrapper),
        (torch.linalg, "pinv", _tolerance_wrapper),
        (torch, "pinverse", _tolerance_wrapper),
        (torch.Tensor, "pinverse", _tolerance_wrapper),
        (torch.nn.SyncBatchNorm, "forward", _sync_batch_norm_forward),
        (torch.nn.functional, "linear", _linear_wrapper),
    ]


def install() -> None:
    for owner, name, make in _targets():
        key = (owner, name)
        if key in _saved:
            continue
        _saved[key] = vars(owner).get(name, _MISSING)  # torch.Tensor inherits pinverse
        setattr(owner, name, make(getattr(owner, name)))


def uninstall() -> None:
    for (owner, name), original in list(_saved.items()):
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
        del _saved[(owner, name)]
