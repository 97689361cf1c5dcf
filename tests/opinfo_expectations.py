"""The reviewed expectation list of the OpInfo conformance sweep.

Every entry is either a backend bug still to fix (``xfail``: the test runs and
must fail; if it starts passing pytest reports it, and the entry goes) or a
documented, justified difference (``skip``). One line of reason each.

``kind`` is one of ``forward``, ``out``, ``inplace``, ``grad``; ``op`` is the
OpInfo's full name (``name.variant``); ``dtypes`` None means every dtype.
"""

import torch

# Ops whose results depend on a random number stream or on uninitialized
# memory: mps_ext is compared with CPU by shape, dtype and device only.
# (The device generator is Philox, CPU's is mt19937: values differ by design;
# the statistical tests of the random ops live in the RNG suite.)
NONDETERMINISTIC_OPS = frozenset({
    # random number generators
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal",
    "multinomial", "normal", "normal.in_place", "normal.number_mean",
    "uniform", "rand_like", "randint", "randint_like", "randn", "randn_like",
    "nn.functional.dropout", "nn.functional.dropout2d",
    "nn.functional.dropout3d", "nn.functional.alpha_dropout",
    "nn.functional.feature_alpha_dropout.with_train",
    "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d",
    "nn.functional.fractional_max_pool3d",
    # randomized algorithms (random projections drawn with torch.randn)
    "svd_lowrank", "pca_lowrank",
    # uninitialized memory
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
    "new_empty_strided",
})


def _dropout_p(sample, position):
    """The sample's dropout probability: keyword, else positional argument
    `position` (counting the input as 0)."""
    if "dropout_p" in sample.kwargs:
        return sample.kwargs["dropout_p"]
    args = sample.args
    return args[position - 1] if len(args) >= position else 0.0


# Ops that draw random numbers only for some samples (attention with dropout):
# those samples are compared like NONDETERMINISTIC_OPS.
RANDOM_SAMPLES = {
    "nn.functional.scaled_dot_product_attention":
        lambda s: _dropout_p(s, 4) > 0,
    "nn.functional.multi_head_attention_forward":
        lambda s: _dropout_p(s, 10) > 0 and s.kwargs.get("training", True),
}


def random_sample(op, sample):
    """True when the op's result for this sample depends on a random stream
    or uninitialized memory (compared by shape, dtype and device only)."""
    if op.full_name in NONDETERMINISTIC_OPS:
        return True
    pred = RANDOM_SAMPLES.get(op.full_name)
    return bool(pred and pred(sample))


class Expect:
    __slots__ = ("kind", "op", "dtypes", "action", "reason")

    def __init__(self, kind, op, action, reason, dtypes=None):
        assert kind in ("forward", "out", "inplace", "grad"), kind
        assert action in ("xfail", "skip"), action
        assert reason, "every expectation needs a reason"
        self.kind, self.op, self.action, self.reason = kind, op, action, reason
        self.dtypes = None if dtypes is None else tuple(dtypes)


EXPECTATIONS = [
    # The harness, not mps_ext: sparse.sampled_addmm takes a sparse CSR input,
    # which torch's SampleInput.noncontiguous() refuses ("Sparse CSR tensors
    # do not have is_contiguous", on CPU as well), and returns a sparse CSR
    # tensor, which has no strides for test_out's empty_strided outputs. Its
    # sparse results are compared in tests/test_sparse.py; its grad runs here.
    Expect("forward", "sparse.sampled_addmm", "skip", "harness: SampleInput.noncontiguous() refuses its sparse CSR input (on CPU too)"),
    Expect("out", "sparse.sampled_addmm", "skip", "harness: its sparse CSR result has no strides for the out= tensors (on CPU too)"),
    # torch picks linear_cross_entropy's chunked accumulation per device type
    # (torch/nn/modules/linear_cross_entropy_options.py, _AUTO_DEFAULTS and
    # _resolve_auto_acc_dtype): float32 accumulation ("accurate") on CPU,
    # half-precision ("compact") on unlisted devices such as mps and mps_ext.
    Expect("forward", "nn.functional.linear_cross_entropy.chunked", "skip",
           "torch accumulates in fp16/bf16 on non-CPU devices, in float32 on CPU (per-device policy)",
           dtypes=(torch.float16, torch.bfloat16)),
    Expect("forward", "nn.functional.linear_cross_entropy.chunked_none", "skip",
           "torch accumulates in fp16/bf16 on non-CPU devices, in float32 on CPU (per-device policy)",
           dtypes=(torch.float16, torch.bfloat16)),
]
