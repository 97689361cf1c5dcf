"""OpInfo conformance: every op of PyTorch's ``op_db`` on mps_ext vs CPU.

Instantiated through torch's own device-generic framework
(``instantiate_device_type_tests`` with ``PrivateUse1TestBase``), like a
downstream backend runs ``test_ops.py``. Four test kinds per (op, dtype):

- ``test_forward``: every sample input (OpInfo's, incl. broadcasting ones,
  plus non-contiguous versions of the first samples) built on mps_ext, run
  there and on an exact CPU copy (same sizes, strides and storage offset);
  outputs must match in value, dtype, shape, strides, and be mps_ext tensors;
  inputs must be left the same. If CPU raises, mps_ext must raise too.
- ``test_out``: the ``out=`` overload, with outputs of the right size (the
  returned tensors must be the ``out`` tensors) and empty ones (resized).
- ``test_inplace``: the in-place variant returns ``self`` and matches CPU.
- ``test_grad``: backward (``autograd.grad`` with the same cotangents) vs CPU
  for differentiable ops.

Ops in ``opinfo_expectations.NONDETERMINISTIC_OPS`` (random numbers,
uninitialized memory) are compared by shape, dtype and device only. The
reviewed xfail/skip list is ``opinfo_expectations.EXPECTATIONS``.

Selection (environment):
- ``TORCH_MPS_EXT_OPINFO=fast`` (default, part of ``make test``): a fixed
  subset of ops and dtypes that covers the fallback's mechanisms;
  ``full``: every op of op_db, every dtype the op supports on CPU
  (``make conformance``).
- ``TORCH_MPS_EXT_OPINFO_CATEGORIES=unary,linalg,...``: only these categories
  (see ``category``), to run the full sweep in chunks.
"""

import copy
import os
import unittest

import torch
import torch_mps_ext  # noqa: F401  (must precede torch.testing._internal.common_device_type)

from torch.testing._internal.common_device_type import (
    OpDTypes,
    instantiate_device_type_tests,
    ops,
)
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_utils import TestCase, run_tests
from torch.testing._internal.opinfo.core import (
    BinaryUfuncInfo,
    DecorateInfo,
    ReductionOpInfo,
    SampleInput,
    SpectralFuncInfo,
    UnaryUfuncInfo,
)
from torch.utils._pytree import tree_flatten

import os.path
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from opinfo_expectations import EXPECTATIONS, NONDETERMINISTIC_OPS, random_sample  # noqa: E402
from sweep_common import DEVICE_TYPE, register_privateuse1_base, sweep_settings  # noqa: E402

register_privateuse1_base()
# MAX_SAMPLES: at most this many sample inputs per (op, dtype), evenly spread
# over the OpInfo's list (a few ops generate over a thousand).
MODE, CATEGORIES, MAX_SAMPLES = sweep_settings("TORCH_MPS_EXT_OPINFO", "CATEGORIES", 10, 40)
# Forward: non-contiguous versions of the first N samples are added.
NONCONTIG_SAMPLES = 2
# out=: only the first N samples (each runs twice: exact size and resized).
OUT_SAMPLES = 3


def category(op):
    """The op's family in docs/conformance.md."""
    name = op.name
    if op.full_name in NONDETERMINISTIC_OPS:
        return "random/uninitialized"
    for prefix in ("linalg", "fft", "special", "nn.functional", "signal",
                   "masked", "sparse"):
        if name.startswith(prefix + "."):
            return prefix
    if isinstance(op, SpectralFuncInfo):
        return "fft"
    if isinstance(op, UnaryUfuncInfo):
        return "unary"
    if isinstance(op, BinaryUfuncInfo):
        return "binary"
    if isinstance(op, ReductionOpInfo):
        return "reduction"
    return "other"


# The fast subset: ops that exercise the fallback's mechanisms (new outputs,
# views, in-place/out= aliasing, resizes, multiple outputs, tensor lists,
# CPU scalars, factories with a device argument, data-dependent shapes,
# random ops, linalg/fft, nn) at a few dtypes.
FAST_OPS = {
    "add", "mul", "div.no_rounding_mode", "where", "abs", "sum", "amax",
    "max.reduction_with_dim", "sort", "nonzero", "matmul", "addmm", "cat",
    "stack", "transpose", "reshape", "expand", "as_strided", "index_select",
    "index_put", "scatter_add", "masked_select", "full_like", "arange",
    "zeros", "resize_", "item", "to", "linalg.solve", "fft.rfft2",
    "nn.functional.conv2d", "nn.functional.layer_norm",
    "nn.functional.cross_entropy", "nn.functional.embedding", "softmax",
    "bernoulli", "randn", "empty",
}
FAST_DTYPES = (torch.float32,)
FAST_GRAD_DTYPES = (torch.float32,)
# The full sweep's gradient cases: the single-precision real and complex
# dtypes (backward runs the same kernels at every precision; these two
# cover the real and the complex autograd formulas at the dtypes users train
# in). TORCH_MPS_EXT_OPINFO_GRAD_DTYPES=all for every backward dtype.
FULL_GRAD_DTYPES = (
    None if os.environ.get("TORCH_MPS_EXT_OPINFO_GRAD_DTYPES") == "all"
    else (torch.float32, torch.complex64))


def _selected(op):
    if MODE == "fast" and op.full_name not in FAST_OPS:
        return False
    return not CATEGORIES or category(op) in CATEGORIES


def _with_expectations(ops_list):
    """Copies of the OpInfos with the expectation list as decorators."""
    by_op = {}
    for e in EXPECTATIONS:
        by_op.setdefault(e.op, []).append(e)
    out = []
    for op in ops_list:
        entries = by_op.get(op.full_name)
        if entries:
            op = copy.copy(op)
            extra = []
            for e in entries:
                deco = (unittest.expectedFailure if e.action == "xfail"
                        else unittest.skip(f"expectation: {e.reason}"))
                extra.append(DecorateInfo(deco, "TestOpInfo", "test_" + e.kind,
                                          dtypes=e.dtypes))
            op.decorators = tuple(op.decorators) + tuple(extra)
        out.append(op)
    return out


ALL_OPS = _with_expectations([op for op in op_db if _selected(op)])
OUT_OPS = [op for op in ALL_OPS if op.supports_out]
INPLACE_OPS = [op for op in ALL_OPS if op.inplace_variant is not None]
GRAD_OPS = [op for op in ALL_OPS if op.supports_autograd]
FWD_DTYPES = FAST_DTYPES if MODE == "fast" else None
GRAD_DTYPES = FAST_GRAD_DTYPES if MODE == "fast" else FULL_GRAD_DTYPES


# ---------------------------------------------------------------- helpers
def exact_copy(t, device, requires_grad=None):
    """A copy of `t` on `device` with the same sizes, strides and storage
    offset (and overlap), so kernels see the same geometry on both sides."""
    rg = t.requires_grad if requires_grad is None else requires_grad
    t = t.detach()
    if t.layout != torch.strided or t.is_conj() or t.is_neg():
        return t.to(device).requires_grad_(rg)
    itemsize = t.element_size()
    n = t.untyped_storage().nbytes() // itemsize
    flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), 0, (n,), (1,))
    copied = flat.to(device, copy=True)
    out = torch.empty(0, dtype=t.dtype, device=device).set_(
        copied.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out.requires_grad_(rg)


def _is_dev(d):
    return (isinstance(d, torch.device) and d.type == DEVICE_TYPE) or (
        isinstance(d, str) and d.split(":")[0] == DEVICE_TYPE)


def copy_sample(sample, device="cpu"):
    """The sample with every tensor exactly copied: to CPU, with every
    device="mps_ext" argument made device="cpu" (the default); or, with
    `device=None`, where each tensor already is (fresh leaves)."""
    def conv(x):
        if isinstance(x, torch.Tensor):
            return exact_copy(x, x.device if device is None else device)
        if _is_dev(x) and device == "cpu":
            return "cpu" if isinstance(x, str) else torch.device("cpu")
        if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            return type(x)(conv(e) for e in x)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    with torch.no_grad():
        return SampleInput(conv(sample.input), args=conv(sample.args),
                           kwargs=conv(sample.kwargs),
                           output_process_fn_grad=sample.output_process_fn_grad,
                           broadcasts_input=sample.broadcasts_input,
                           name=sample.name)


def result_device(sample):
    """Where the op's results belong: the `device` argument if given, else
    mps_ext when any input tensor is on mps_ext, else CPU."""
    dev = sample.kwargs.get("device")
    if dev is not None:
        return torch.device(dev).type
    leaves, _ = tree_flatten((sample.input, sample.args, sample.kwargs))
    if any(isinstance(t, torch.Tensor) and t.device.type == DEVICE_TYPE for t in leaves):
        return DEVICE_TYPE
    return "cpu"


def call(fn, sample, **extra):
    try:
        return fn(sample.input, *sample.args, **sample.kwargs, **extra), None
    except Exception as e:  # noqa: BLE001  (any error is compared with CPU's)
        return None, e


def _same_values(a, b):
    """Bitwise-equal values (NaNs equal): the fast path of the comparison."""
    a, b = a.resolve_conj().resolve_neg(), b.resolve_conj().resolve_neg()
    if a.is_quantized or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.complex32:  # CPU has no equal/ne for ComplexHalf
        a, b = a.to(torch.complex64), b.to(torch.complex64)
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        both_nan = (a != a) & (b != b)
        return bool(((a == b) | both_nan).all())
    return False


def _significant_strides(t):
    return tuple(s for s, n in zip(t.stride(), t.size()) if n > 1)


class TestOpInfo(TestCase):
    exact_dtype = True

    # -- comparisons
    def assert_device_result(self, cpu, dev, shape_only=False, what="output",
                             device=DEVICE_TYPE, tensors_only=False):
        cl, _ = tree_flatten(cpu)
        dl, _ = tree_flatten(dev)
        self.assertEqual(len(cl), len(dl), msg=f"{what}: structure differs")
        for i, (c, d) in enumerate(zip(cl, dl)):
            where = f"{what}[{i}]"
            if isinstance(c, torch.Tensor):
                self.assertIsInstance(d, torch.Tensor, msg=where)
                if device is not None and d.device.type != device:
                    self.fail(f"{where} is on {d.device}, expected a {device} tensor")
                if c.dtype != d.dtype or c.shape != d.shape:
                    self.fail(f"{where}: {d.dtype}{tuple(d.shape)} on {DEVICE_TYPE}, "
                              f"{c.dtype}{tuple(c.shape)} on CPU")
                if shape_only or c.layout != torch.strided:
                    continue
                if _significant_strides(c) != _significant_strides(d):
                    self.fail(f"{where} strides {d.stride()} on {DEVICE_TYPE}, "
                              f"{c.stride()} on CPU")
                c = c.detach()
                d = d.detach().cpu()
                if not _same_values(c, d):
                    self.assertEqual(d, c, equal_nan=True, msg=f"{where} values")
            elif not shape_only and not tensors_only:
                self.assertEqual(d, c, msg=where)

    def samples(self, op, device, dtype, requires_grad=False, noncontig=0):
        samples = list(op.sample_inputs(device, dtype, requires_grad=requires_grad))
        n = len(samples)
        if n > MAX_SAMPLES:
            picks = sorted({round(i * (n - 1) / (MAX_SAMPLES - 1)) for i in range(MAX_SAMPLES)})
            samples = [samples[i] for i in picks]
        for i, s in enumerate(samples):
            yield s
            if i < noncontig and isinstance(s.input, torch.Tensor):
                yield s.noncontiguous()

    # -- forward
    if ALL_OPS:  # @ops refuses an empty list (e.g. a category without out=)
        @ops(ALL_OPS, allowed_dtypes=FWD_DTYPES)
        def test_forward(self, device, dtype, op):
            ran = 0
            for sample in self.samples(op, device, dtype, noncontig=NONCONTIG_SAMPLES):
                shape_only = random_sample(op, sample)
                cpu_sample = copy_sample(sample)
                expected, cpu_err = call(op, cpu_sample)
                actual, dev_err = call(op, sample)
                if cpu_err is not None:
                    self.assertIsNotNone(dev_err, msg=f"CPU raised {cpu_err!r}, {DEVICE_TYPE} did not "
                                         f"({sample.summary() if hasattr(sample, 'summary') else sample})")
                    continue
                if dev_err is not None:
                    raise dev_err
                self.assert_device_result(expected, actual, shape_only,
                                          device=result_device(sample))
                # Inputs (some ops write to them, aliasing must be right).
                self.assert_device_result(
                    (cpu_sample.input, cpu_sample.args, cpu_sample.kwargs),
                    (sample.input, sample.args, sample.kwargs), shape_only, what="input",
                    device=None, tensors_only=True)
                ran += 1
            if not ran:
                self.skipTest("no sample input runs on CPU")

    # -- out=
    if OUT_OPS:  # @ops refuses an empty list (e.g. a category without out=)
        @ops(OUT_OPS, allowed_dtypes=FWD_DTYPES)
        def test_out(self, device, dtype, op):
            ran = 0
            for i, sample in enumerate(self.samples(op, device, dtype)):
                shape_only = random_sample(op, sample)
                if i >= OUT_SAMPLES:
                    break
                cpu_sample = copy_sample(sample)
                expected, err = call(op, cpu_sample)
                if err is not None:
                    continue
                leaves, _ = tree_flatten(expected)
                if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
                    continue
                single = isinstance(expected, torch.Tensor)
                for resize in (False, True):
                    def make(dev):
                        if resize:
                            return [torch.empty(0, dtype=t.dtype, device=dev) for t in leaves]
                        return [torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=dev)
                                for t in leaves]
                    cpu_outs, dev_outs = make("cpu"), make(device)
                    # The same sentinel in both, so a kernel that leaves part
                    # of `out` unwritten compares equal only if CPU's does too
                    # (fft.ihfftn in torch 2.13 leaves 1-D outs unwritten on
                    # CPU).
                    for o in cpu_outs + dev_outs:
                        o.fill_(7)
                    as_arg = (lambda o: o[0]) if single else tuple
                    cpu_res, cpu_err = call(op, cpu_sample, out=as_arg(cpu_outs))
                    dev_res, dev_err = call(op, sample, out=as_arg(dev_outs))
                    if cpu_err is not None:
                        self.assertIsNotNone(dev_err, msg=f"CPU raised {cpu_err!r}, {DEVICE_TYPE} did not")
                        continue
                    if dev_err is not None:
                        raise dev_err
                    if cpu_res is None:  # e.g. unbind_copy.int_out returns ()
                        self.assertIsNone(dev_res)
                    else:
                        res_leaves, _ = tree_flatten(dev_res)
                        self.assertEqual(len(res_leaves), len(dev_outs))
                        for r, o in zip(res_leaves, dev_outs):
                            self.assertTrue(r is o, msg="out= must return the out tensors")
                    self.assert_device_result(cpu_outs, dev_outs, shape_only, what="out")
                    self.assert_device_result(cpu_res, dev_res, shape_only, what="result")
                    ran += 1
            if not ran:
                self.skipTest("no sample input runs with out= on CPU")

    # -- in-place
    if INPLACE_OPS:  # @ops refuses an empty list (e.g. a category without out=)
        @ops(INPLACE_OPS, allowed_dtypes=FWD_DTYPES)
        def test_inplace(self, device, dtype, op):
            ran = 0
            for sample in self.samples(op, device, dtype, noncontig=1):
                shape_only = random_sample(op, sample)
                if not isinstance(sample.input, torch.Tensor):
                    continue
                cpu_sample = copy_sample(sample)
                cpu_res, cpu_err = call(op.inplace_variant, cpu_sample)
                dev_res, dev_err = call(op.inplace_variant, sample)
                if cpu_err is not None:
                    self.assertIsNotNone(dev_err, msg=f"CPU raised {cpu_err!r}, {DEVICE_TYPE} did not")
                    continue
                if dev_err is not None:
                    raise dev_err
                self.assertTrue(dev_res is sample.input, msg="in-place must return self")
                self.assert_device_result(cpu_sample.input, sample.input, shape_only, what="self")
                ran += 1
            if not ran:
                self.skipTest("no sample input runs in place on CPU")

    # -- gradients
    if GRAD_OPS:  # @ops refuses an empty list (e.g. a category without out=)
        @ops(GRAD_OPS, dtypes=OpDTypes.supported_backward, allowed_dtypes=GRAD_DTYPES)
        def test_grad(self, device, dtype, op):
            ran = 0
            for sample in self.samples(op, device, dtype, requires_grad=True):
                shape_only = random_sample(op, sample)
                cpu_sample = copy_sample(sample)
                # Both sides get fresh leaves: an OpInfo sample can hold a
                # leaf that is a view of another leaf, whose gradient torch
                # leaves None on every device, and exact copies have none.
                sample = copy_sample(sample, device=None)
                cpu_grads, cpu_err = self._grads(op, cpu_sample, None)
                if cpu_err is not None or cpu_grads is None:
                    continue  # not differentiable on CPU either for this sample
                dev_grads, dev_err = self._grads(op, sample, device)
                if dev_err is not None:
                    raise dev_err
                self.assert_device_result(cpu_grads, dev_grads, shape_only, what="grad",
                                          device=None)
                ran += 1
            if not ran:
                self.skipTest("no sample input is differentiable on CPU")

    def _grads(self, op, sample, device):
        def inputs_of(s):
            leaves, _ = tree_flatten((s.input, s.args, s.kwargs))
            return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        try:
            out = op.gradcheck_wrapper(op.get_op(), sample.input, *sample.args, **sample.kwargs)
            out = sample.output_process_fn_grad(out)
            outs = [t for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            ins = inputs_of(sample)
            if not outs or not ins:
                return None, None
            gen = torch.Generator().manual_seed(0)
            cots = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in outs]
            if device is not None:
                cots = [c.to(device) for c in cots]
            grads = torch.autograd.grad(outs, ins, cots, allow_unused=True)
            return list(grads), None
        except Exception as e:  # noqa: BLE001
            return None, e


instantiate_device_type_tests(TestOpInfo, globals(), only_for="privateuse1")

if __name__ == "__main__":
    run_tests()
