"""module_db conformance: every nn module of PyTorch's ``module_db`` on
mps_ext vs CPU.

Instantiated through torch's own device-generic framework
(``instantiate_device_type_tests`` with ``PrivateUse1TestBase`` and the
``@modules`` parametrizer), beside the OpInfo sweep (tests/test_opinfo.py).
For every ModuleInfo, dtype and (when the module's train and eval modes
differ) mode, each sample input of its ``module_inputs_func`` builds the
module on CPU (``.to(dtype)``, ``.train(training)``) and a deep copy of it
moved with ``.to("mps_ext")``; the forward inputs are copied to both sides
with the same sizes, strides and storage offset. Lazy modules are
materialized on each side by one forward under ``no_grad``, then the device
copy loads CPU's state_dict. Two tests per (module, dtype, mode):

- ``test_forward``: parameters and buffers arrive on mps_ext unchanged; the
  outputs match CPU in value, dtype, shape and strides and are mps_ext
  tensors; an output aliases an input on mps_ext iff it does on CPU; the
  inputs (in-place modules write them) and the buffers after the forward
  (running statistics) match CPU. If CPU raises, mps_ext must raise too.
- ``test_backward``: inputs that require grad; ``autograd.backward`` from
  every differentiable output with the same fixed random cotangent on both
  sides; every parameter's ``.grad`` and every input's ``.grad`` vs CPU.

Besides the samples (at most MAX_SAMPLES, evenly spread over the list), the
first sample whose first input is 4-D or 5-D runs again in channels_last
(module and inputs).

Random modules (``module_db_expectations.RANDOM_MODULES``): module_db has
none, so ``RANDOM_MODULE_DB`` below adds the dropout family and RReLU. In
training mode they are checked by statistics and by their own consistency
(``RANDOM_CHECKS``), not by value against CPU; in eval mode by value.

The reviewed xfail/skip list is ``module_db_expectations.EXPECTATIONS``.

Selection (environment):
- ``TORCH_MPS_EXT_MODULEDB=fast`` (default, part of ``make test``): the
  modules of FAST_MODULES at float32; ``full``: every module at float32 and
  float64 where the ModuleInfo lists it (``make conformance``).
- ``TORCH_MPS_EXT_MODULEDB_MODULES=nn.Linear,nn.LSTM``: only these modules.
- ``TORCH_MPS_EXT_MODULEDB_MAX_SAMPLES`` (default 6 fast / 40 full).
"""

import copy
import math
import os
import os.path
import sys
import tempfile
import unittest

import torch
import torch_mps_ext  # noqa: F401  (must precede torch.testing._internal.common_device_type)

from torch.testing import make_tensor
from torch.testing._internal.common_device_type import (
    instantiate_device_type_tests,
)
from torch.testing._internal.common_modules import (
    FunctionInput,
    ModuleInfo,
    ModuleInput,
    module_db,
    modules,
)
from torch.testing._internal.common_utils import TestCase, run_tests
from torch.testing._internal.opinfo.core import DecorateInfo
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from module_db_expectations import EXPECTATIONS, RANDOM_MODULES  # noqa: E402
from sweep_common import DEVICE_TYPE, register_privateuse1_base, sweep_settings  # noqa: E402

register_privateuse1_base()
MODE, ONLY, MAX_SAMPLES = sweep_settings("TORCH_MPS_EXT_MODULEDB", "MODULES", 6, 40)

# The fast subset: one or two modules per family (linear, conv, transposed
# conv, lazy, pooling, normalization in train and eval mode, attention,
# recurrent, embedding, losses with integer targets, activations with
# parameters, padding, random modules).
FAST_MODULES = {
    "nn.Linear", "nn.Bilinear", "nn.Conv2d", "nn.ConvTranspose1d",
    "nn.LazyConv2d", "nn.MaxPool2d", "nn.AdaptiveAvgPool2d",
    "nn.FractionalMaxPool2d", "nn.BatchNorm2d", "nn.LayerNorm", "nn.GroupNorm",
    "nn.MultiheadAttention", "nn.TransformerEncoderLayer", "nn.RNN",
    "nn.LSTM", "nn.Embedding", "nn.CrossEntropyLoss", "nn.CTCLoss",
    "nn.PReLU", "nn.GELU", "nn.ReflectionPad2d", "nn.Dropout2d",
    "nn.AlphaDropout", "nn.RReLU",
}
FAST_DTYPES = (torch.float32,)
FULL_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------ random modules (extra)
def _positive(shape, device, dtype, requires_grad):
    """Values in [0.5, 2): no zeros, so a dropped element is recognizable."""
    return make_tensor(shape, device=device, dtype=dtype, low=0.5, high=2.0,
                       requires_grad=requires_grad)


def _signed(shape, device, dtype, requires_grad):
    """Values with |x| in [0.5, 2) and both signs."""
    gen = torch.Generator().manual_seed(1)
    mag = make_tensor(shape, device="cpu", dtype=dtype, low=0.5, high=2.0)
    sign = torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1
    return (mag * sign).to(device).requires_grad_(requires_grad)


def _dropout_inputs(shapes, ps=(0.5, 0.2), inplace=True):
    def fn(module_info, device, dtype, requires_grad, training, **kwargs):
        out = []
        for shape in shapes:
            for p in ps:
                out.append(ModuleInput(
                    FunctionInput(p),
                    FunctionInput(_positive(shape, device, dtype, requires_grad)),
                    desc=f"p={p} {shape}"))
        if inplace:
            out.append(ModuleInput(
                FunctionInput(0.5, inplace=True),
                FunctionInput(_positive(shapes[0], device, dtype, requires_grad)),
                desc="inplace"))
        return out
    return fn


def _rrelu_inputs(module_info, device, dtype, requires_grad, training, **kwargs):
    return [
        ModuleInput(FunctionInput(),
                    FunctionInput(_signed((64, 128), device, dtype, requires_grad)),
                    desc="default bounds"),
        ModuleInput(FunctionInput(0.1, 0.6),
                    FunctionInput(_signed((4, 8, 16, 16), device, dtype, requires_grad)),
                    desc="lower=0.1 upper=0.6"),
        ModuleInput(FunctionInput(0.1, 0.6, inplace=True),
                    FunctionInput(_signed((64, 128), device, dtype, requires_grad)),
                    desc="inplace"),
    ]


def _random_info(cls, fn):
    return ModuleInfo(cls, module_inputs_func=fn, train_and_eval_differ=True)


RANDOM_MODULE_DB = [
    _random_info(torch.nn.Dropout, _dropout_inputs([(64, 128), (2, 3, 40, 40)])),
    _random_info(torch.nn.Dropout1d, _dropout_inputs([(32, 64, 8), (256, 9)])),
    _random_info(torch.nn.Dropout2d, _dropout_inputs([(32, 64, 3, 3)])),
    _random_info(torch.nn.Dropout3d, _dropout_inputs([(16, 64, 2, 2, 2), (512, 2, 2, 2)])),
    _random_info(torch.nn.AlphaDropout, _dropout_inputs([(64, 128)])),
    _random_info(torch.nn.FeatureAlphaDropout, _dropout_inputs([(32, 64, 3, 3)])),
    _random_info(torch.nn.RReLU, _rrelu_inputs),
]
assert {m.name for m in RANDOM_MODULE_DB} == set(RANDOM_MODULES)
assert not {m.name for m in RANDOM_MODULE_DB} & {m.name for m in module_db}


def _with_expectations(infos):
    """Copies of the ModuleInfos with the expectation list as decorators."""
    out = []
    for info in infos:
        entries = EXPECTATIONS.get(info.name, ())
        if entries:
            info = copy.copy(info)
            extra = []
            for e in entries:
                deco = (unittest.expectedFailure if e.action == "xfail"
                        else unittest.skip(f"expectation: {e.reason}"))
                for kind in e.kinds:
                    extra.append(DecorateInfo(
                        deco, "TestModuleDB", "test_" + kind, dtypes=e.dtypes,
                        active_if=lambda p, t=e.training: t is None or p["training"] == t))
            info.decorators = tuple(info.decorators) + tuple(extra)
        out.append(info)
    return out


def _selected(info):
    if ONLY:
        return info.name in ONLY
    return MODE == "full" or info.name in FAST_MODULES


_known = {m.name for m in module_db} | set(RANDOM_MODULES)
assert set(EXPECTATIONS) <= _known, set(EXPECTATIONS) - _known
assert FAST_MODULES <= _known, FAST_MODULES - _known
assert ONLY <= _known, f"unknown modules: {ONLY - _known}"

ALL_MODULES = _with_expectations([m for m in list(module_db) + RANDOM_MODULE_DB if _selected(m)])
DTYPES = FAST_DTYPES if MODE == "fast" else FULL_DTYPES


# ---------------------------------------------------------------- helpers
def exact_copy(t, device, requires_grad=None):
    """A leaf copy of `t` on `device` with the same sizes, strides and
    storage offset (and overlap), so kernels see the same geometry."""
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


def to_device(obj, device):
    """Every tensor of a (nested) forward input copied exactly to `device`,
    as fresh leaves that require grad iff the original does."""
    return tree_map(lambda x: exact_copy(x, device) if isinstance(x, torch.Tensor) else x, obj)


def _channels_last(obj):
    def conv(x):
        if isinstance(x, torch.Tensor) and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            return x.detach().contiguous(memory_format=fmt).requires_grad_(x.requires_grad)
        return x
    return tree_map(conv, obj)


def _same_values(a, b):
    """Bitwise-equal values (NaNs equal): the fast path of the comparison."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        both_nan = (a != a) & (b != b)
        return bool(((a == b) | both_nan).all())
    return False


def _significant_strides(t):
    return tuple(s for s, n in zip(t.stride(), t.size()) if n > 1)


def _storage(t):
    return t.untyped_storage().data_ptr() if t.numel() else None


def call(m, fin):
    args, kwargs = fin
    try:
        return m(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001  (any error is compared with CPU's)
        return None, e


class Sample:
    """A ModuleInput, possibly turned channels_last."""

    def __init__(self, module_input, channels_last=False):
        self.mi = module_input
        self.channels_last = channels_last
        fin = module_input.forward_input
        self.forward = (tuple(fin.args), dict(fin.kwargs))
        self.memory_format = None
        if channels_last:
            # Module.to(memory_format=) converts 4-D and 5-D parameters alike:
            # the format of the (first) input's rank.
            self.memory_format = (torch.channels_last if _first_input(self.forward).dim() == 4
                                  else torch.channels_last_3d)
            self.forward = _channels_last(self.forward)

    def __str__(self):
        return (f"sample {self.mi.desc or '(no desc)'!r}"
                + (" channels_last" if self.channels_last else ""))


def _first_input(fin):
    leaves = [x for x in tree_flatten(fin)[0] if isinstance(x, torch.Tensor)]
    return leaves[0] if leaves else None


# ------------------------------------------------ random-module checks
# Each check sees the device's own results (on CPU) and the pristine input:
# forward(test, module, x, out) and backward(test, module, x, out, cot, grad).
def _feature_dims(module):
    return {torch.nn.Dropout1d: 3, torch.nn.Dropout2d: 4, torch.nn.Dropout3d: 5,
            torch.nn.FeatureAlphaDropout: 4}.get(type(module))


def _draws(module, mask):
    """The mask as (draws, elements per draw): feature dropout draws one
    value per (batch, channel), the rest one per element."""
    dims = _feature_dims(module)
    if dims is None:
        return mask.reshape(-1, 1)
    if mask.dim() == dims - 1:  # no batch dimension
        return mask.reshape(mask.shape[0], -1)
    return mask.reshape(mask.shape[0] * mask.shape[1], -1)


def _check_fraction(test, observed, expected_p, n, what):
    sd = math.sqrt(expected_p * (1 - expected_p) / n)
    test.assertLessEqual(abs(observed - expected_p), 6 * sd + 1e-6,
                         msg=f"{what}: fraction {observed:.4f} over {n} draws, expected "
                             f"{expected_p} (6 sd = {6 * sd:.4f})")


def _check_mask(test, module, mask):
    draws = _draws(module, mask)
    test.assertTrue(bool((draws == draws[:, :1]).all()),
                    msg="feature dropout: the mask must be constant over each channel")
    dropped = (~draws[:, 0]).double().mean().item()
    _check_fraction(test, dropped, module.p, draws.shape[0], "dropped")


class DropoutCheck:
    @staticmethod
    def forward(test, module, x, out):
        kept = out != 0
        test.assertEqual(out[kept], x[kept] / (1 - module.p),
                         msg="kept elements must be x/(1-p)")
        _check_mask(test, module, kept)
        return kept

    @staticmethod
    def backward(test, module, x, out, cot, grad):
        kept = DropoutCheck.forward(test, module, x, out)
        test.assertEqual(grad, cot * kept.to(cot.dtype) / (1 - module.p),
                         msg="grad must be cot * mask / (1-p)")


# ATen's _dropout_impl (aten/src/ATen/native/Dropout.cpp) for alpha dropout:
# kept: a*x + alpha*a*p, dropped: alpha*a*(p-1), grad: cot*a*mask.
_ALPHA = 1.7580993408473766


class AlphaDropoutCheck:
    @staticmethod
    def forward(test, module, x, out):
        p = module.p
        a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
        dropped_value = _ALPHA * a * (p - 1)
        kept_value = x * a + _ALPHA * a * p
        dropped = torch.isclose(out, torch.full_like(out, dropped_value))
        kept = torch.isclose(out, kept_value)
        test.assertTrue(bool((dropped | kept).all()),
                        msg="every element must be a*x+b (kept) or alpha*a*(p-1) (dropped)")
        # x in [0.5, 2): a kept value never equals the dropped one.
        _check_mask(test, module, ~dropped)
        return ~dropped, a

    @staticmethod
    def backward(test, module, x, out, cot, grad):
        kept, a = AlphaDropoutCheck.forward(test, module, x, out)
        test.assertEqual(grad, cot * a * kept.to(cot.dtype), msg="grad must be cot * a * mask")


class RReLUCheck:
    @staticmethod
    def forward(test, module, x, out):
        pos = x >= 0
        test.assertEqual(out[pos], x[pos], msg="x >= 0 must pass unchanged")
        slopes = out[~pos] / x[~pos]
        lo, hi = module.lower, module.upper
        eps = 1e-6 if x.dtype == torch.float32 else 1e-12
        test.assertTrue(bool(((slopes >= lo - eps) & (slopes <= hi + eps)).all()),
                        msg=f"negative slopes must lie in [{lo}, {hi}]")
        n = slopes.numel()
        sd = (hi - lo) / math.sqrt(12 * n)
        mean = slopes.double().mean().item()
        test.assertLessEqual(abs(mean - (lo + hi) / 2), 6 * sd,
                             msg=f"mean slope {mean:.4f} over {n}, expected {(lo + hi) / 2}")
        test.assertGreater(slopes.unique().numel(), n // 2, msg="slopes must be drawn per element")
        return torch.where(pos, torch.ones_like(x), out / x)

    @staticmethod
    def backward(test, module, x, out, cot, grad):
        slope = RReLUCheck.forward(test, module, x, out)
        test.assertEqual(grad, cot * slope, msg="grad must be cot * slope")


RANDOM_CHECKS = {
    "nn.Dropout": DropoutCheck, "nn.Dropout1d": DropoutCheck,
    "nn.Dropout2d": DropoutCheck, "nn.Dropout3d": DropoutCheck,
    "nn.AlphaDropout": AlphaDropoutCheck, "nn.FeatureAlphaDropout": AlphaDropoutCheck,
    "nn.RReLU": RReLUCheck,
}
assert set(RANDOM_CHECKS) == set(RANDOM_MODULES)


class TestModuleDB(TestCase):
    exact_dtype = True

    def setUp(self):
        super().setUp()
        # Nothing of a test may write into the user's cache (shaders). Per
        # test, not per class: torch's instantiate_test calls setUpClass at
        # import time without a matching tearDownClass.
        cache = tempfile.TemporaryDirectory(prefix="mps_ext_moduledb_")
        old = os.environ.get("TORCH_MPS_EXT_SHADER_CACHE")
        os.environ["TORCH_MPS_EXT_SHADER_CACHE"] = cache.name

        def restore():
            if old is None:
                os.environ.pop("TORCH_MPS_EXT_SHADER_CACHE", None)
            else:
                os.environ["TORCH_MPS_EXT_SHADER_CACHE"] = old
            cache.cleanup()
        self.addCleanup(restore)

    # -- comparisons
    def assert_device_result(self, cpu, dev, what, device=DEVICE_TYPE, shape_only=False):
        cl, cspec = tree_flatten(cpu)
        dl, dspec = tree_flatten(dev)
        self.assertEqual(len(cl), len(dl), msg=f"{what}: structure differs ({cspec} vs {dspec})")
        for i, (c, d) in enumerate(zip(cl, dl)):
            where = f"{what}[{i}]" if len(cl) > 1 else what
            if isinstance(c, torch.Tensor):
                self.assertIsInstance(d, torch.Tensor, msg=where)
                if device is not None and d.device.type != device:
                    self.fail(f"{where} is on {d.device}, expected a {device} tensor")
                if c.dtype != d.dtype or c.shape != d.shape:
                    self.fail(f"{where}: {d.dtype}{tuple(d.shape)} on {DEVICE_TYPE}, "
                              f"{c.dtype}{tuple(c.shape)} on CPU")
                if _significant_strides(c) != _significant_strides(d):
                    self.fail(f"{where} strides {d.stride()} on {DEVICE_TYPE}, "
                              f"{c.stride()} on CPU")
                if shape_only:
                    continue
                c, d = c.detach(), d.detach().cpu()
                if not _same_values(c, d):
                    self.assertEqual(d, c, equal_nan=True, msg=f"{where} values")
            elif not shape_only:
                self.assertEqual(d, c, msg=where)

    def assert_same_state(self, cpu_m, dev_m, what, grads=False):
        cp, dp = dict(cpu_m.named_parameters()), dict(dev_m.named_parameters())
        self.assertEqual(list(dp), list(cp), msg=f"{what}: parameter names")
        cb, db = dict(cpu_m.named_buffers()), dict(dev_m.named_buffers())
        self.assertEqual(list(db), list(cb), msg=f"{what}: buffer names")
        if grads:
            for name in cp:
                cg, dg = cp[name].grad, dp[name].grad
                self.assertEqual(dg is None, cg is None,
                                 msg=f"{name}.grad is {'None' if dg is None else 'set'} on "
                                     f"{DEVICE_TYPE}, {'None' if cg is None else 'set'} on CPU")
                if cg is not None:
                    self.assert_device_result(cg, dg, what=f"{name}.grad")
            return
        for name in cp:
            self.assertIsInstance(dp[name], torch.nn.Parameter, msg=name)
            self.assert_device_result(cp[name], dp[name], what=f"{what}: parameter {name}")
        for name in cb:
            if cb[name] is None:
                self.assertIsNone(db[name])
                continue
            self.assert_device_result(cb[name], db[name], what=f"{what}: buffer {name}")

    # -- set-up
    def samples(self, module_info, dtype, training, requires_grad):
        inputs = module_info.module_inputs_func(module_info, device="cpu", dtype=dtype,
                                                requires_grad=requires_grad, training=training)
        inputs = [mi for mi in inputs if mi.forward_input is not None]
        n = len(inputs)
        if n > MAX_SAMPLES:
            picks = sorted({round(i * (n - 1) / (MAX_SAMPLES - 1)) for i in range(MAX_SAMPLES)})
            inputs = [inputs[i] for i in picks]
        out = [Sample(mi) for mi in inputs]
        for mi in inputs:
            first = _first_input((mi.forward_input.args, mi.forward_input.kwargs))
            if first is not None and first.dim() in (4, 5) and first.is_floating_point():
                out.append(Sample(mi, channels_last=True))
                break
        return out

    def build(self, module_info, sample, dtype, training):
        """(cpu module, device module, cpu forward input, device forward input),
        or None when CPU cannot build the module (the device must fail too)."""
        ci = sample.mi.constructor_input
        cpu_m = module_info.module_cls(*ci.args, **ci.kwargs)
        cpu_m.to(dtype)
        if sample.channels_last and not module_info.is_lazy:
            cpu_m.to(memory_format=sample.memory_format)
        cpu_m.train(training)
        dev_m = copy.deepcopy(cpu_m).to(DEVICE_TYPE)
        cpu_in, dev_in = to_device(sample.forward, "cpu"), to_device(sample.forward, DEVICE_TYPE)
        if module_info.is_lazy:
            with torch.no_grad():
                _, cpu_err = call(cpu_m, to_device(sample.forward, "cpu"))
                _, dev_err = call(dev_m, to_device(sample.forward, DEVICE_TYPE))
            if cpu_err is not None:
                self.assertIsNotNone(dev_err, msg=f"{sample}: CPU's lazy initialization raised "
                                                  f"{cpu_err!r}, {DEVICE_TYPE}'s did not")
                return None
            if dev_err is not None:
                raise dev_err
            for name, p in dev_m.named_parameters():
                self.assertEqual(p.device.type, DEVICE_TYPE, msg=f"lazy {name} materialized on {p.device}")
            dev_m.load_state_dict(cpu_m.state_dict())
            if sample.channels_last:
                cpu_m.to(memory_format=sample.memory_format)
                dev_m.to(memory_format=sample.memory_format)
        self.assert_same_state(cpu_m, dev_m, f"{sample}: after .to({DEVICE_TYPE!r})")
        return cpu_m, dev_m, cpu_in, dev_in

    def both_raised(self, sample, cpu_err, dev_err):
        """True when CPU raised (and so did the device: asserted); raises when
        only the device did."""
        if cpu_err is not None:
            self.assertIsNotNone(dev_err, msg=f"{sample}: CPU raised {cpu_err!r}, "
                                              f"{DEVICE_TYPE} did not")
            return True
        if dev_err is not None:
            raise AssertionError(f"{sample}: {DEVICE_TYPE} raised "
                                 f"{type(dev_err).__name__}: {dev_err}") from dev_err
        return False

    def random_check(self, module_info, training):
        return RANDOM_CHECKS.get(module_info.name) if training else None

    # -- forward
    @modules(ALL_MODULES, allowed_dtypes=DTYPES)
    def test_forward(self, device, dtype, module_info, training):
        check = self.random_check(module_info, training)
        ran = 0
        for sample in self.samples(module_info, dtype, training, requires_grad=False):
            built = self.build(module_info, sample, dtype, training)
            if built is None:
                continue
            cpu_m, dev_m, cpu_in, dev_in = built
            expected, cpu_err = call(cpu_m, cpu_in)
            actual, dev_err = call(dev_m, dev_in)
            if self.both_raised(sample, cpu_err, dev_err):
                continue
            self.assert_device_result(expected, actual, what=f"{sample}: output",
                                      shape_only=check is not None)
            self.assert_aliasing(expected, actual, cpu_in, dev_in, sample)
            if check is not None:
                x = _first_input(sample.forward).detach()
                out = actual.detach().cpu()
                check.forward(self, dev_m, x, out)
            else:
                self.assert_device_result(cpu_in, dev_in, what=f"{sample}: input", device=None)
            self.assert_same_state(cpu_m, dev_m, f"{sample}: after forward")
            ran += 1
        if not ran:
            self.skipTest("no sample input runs on CPU")

    def assert_aliasing(self, expected, actual, cpu_in, dev_in, sample):
        ins_c = [_storage(t) for t in tree_flatten(cpu_in)[0] if isinstance(t, torch.Tensor)]
        ins_d = [_storage(t) for t in tree_flatten(dev_in)[0] if isinstance(t, torch.Tensor)]
        outs_c = [t for t in tree_flatten(expected)[0] if isinstance(t, torch.Tensor)]
        outs_d = [t for t in tree_flatten(actual)[0] if isinstance(t, torch.Tensor)]
        for i, (c, d) in enumerate(zip(outs_c, outs_d)):
            ac = [j for j, s in enumerate(ins_c) if s is not None and s == _storage(c)]
            ad = [j for j, s in enumerate(ins_d) if s is not None and s == _storage(d)]
            self.assertEqual(ad, ac, msg=f"{sample}: output[{i}] aliases inputs {ad} on "
                                         f"{DEVICE_TYPE}, {ac} on CPU")

    # -- backward
    @modules(ALL_MODULES, allowed_dtypes=DTYPES)
    def test_backward(self, device, dtype, module_info, training):
        check = self.random_check(module_info, training)
        ran = 0
        for sample in self.samples(module_info, dtype, training, requires_grad=True):
            built = self.build(module_info, sample, dtype, training)
            if built is None:
                continue
            cpu_m, dev_m, cpu_in, dev_in = built
            cpu_outs, cpu_err = self._backward(cpu_m, cpu_in, None)
            if cpu_err is None and not cpu_outs:
                continue  # no differentiable output for this sample
            dev_outs, dev_err = self._backward(dev_m, dev_in, DEVICE_TYPE)
            # CPU may raise, e.g. an in-place module on a leaf that requires grad
            if self.both_raised(sample, cpu_err, dev_err):
                continue
            self.assertEqual(len(dev_outs), len(cpu_outs),
                             msg=f"{sample}: differentiable outputs")
            cpu_leaves = [t for t in tree_flatten(cpu_in)[0]
                          if isinstance(t, torch.Tensor) and t.requires_grad]
            dev_leaves = [t for t in tree_flatten(dev_in)[0]
                          if isinstance(t, torch.Tensor) and t.requires_grad]
            cg = [t.grad for t in cpu_leaves]
            dg = [t.grad for t in dev_leaves]
            self.assertEqual([g is None for g in dg], [g is None for g in cg],
                             msg=f"{sample}: which inputs get a grad")
            if check is not None:
                # The random draws differ: shapes here, values by the check.
                self.assert_device_result(cg, dg, what=f"{sample}: input grad",
                                          device=None, shape_only=True)
                out, cot = dev_outs[0]
                check.backward(self, dev_m, _first_input(sample.forward).detach(),
                               out.detach().cpu(), cot.cpu(), dg[0].cpu())
            else:
                self.assert_device_result(cg, dg, what=f"{sample}: input grad", device=None)
            self.assert_same_state(cpu_m, dev_m, f"{sample}: parameter grads",
                                   grads=check is None)
            ran += 1
        if not ran:
            self.skipTest("no sample input is differentiable on CPU")

    def _backward(self, m, fin, device):
        """Forward, then backward from every differentiable output with a
        fixed random cotangent. [(output, cotangent)], error."""
        try:
            out = m(*fin[0], **fin[1])
            outs = [t for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            if not outs:
                return [], None
            gen = torch.Generator().manual_seed(0)
            cots = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in outs]
            if device is not None:
                cots = [c.to(device) for c in cots]
            torch.autograd.backward(outs, cots)
            return list(zip(outs, cots)), None
        except Exception as e:  # noqa: BLE001
            return None, e


instantiate_device_type_tests(TestModuleDB, globals(), only_for="privateuse1")

if __name__ == "__main__":
    run_tests()
