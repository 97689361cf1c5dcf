"""The reviewed expectation list of the module_db conformance sweep
(tests/test_module_db.py).

``EXPECTATIONS`` maps a module name (``ModuleInfo.name``, e.g. ``nn.LSTM``)
to the entries for it. Each entry is either a backend bug still to fix
(``xfail``: the test runs and must fail; if it starts passing pytest reports
the unexpected success as a failure, and the entry goes) or a documented,
justified difference (``skip``). One line of reason each, checked.

``kinds`` are the test kinds (``forward``, ``backward``); ``dtypes`` (torch
dtypes) None means every dtype; ``training`` None means both train and eval mode (only
modules whose ModuleInfo has ``train_and_eval_differ`` run both).

``RANDOM_MODULES`` maps the modules whose training-mode results depend on
the random number stream to why: they are compared by statistics and by
their own consistency (see tests/test_module_db.py, ``RANDOM_CHECKS``), not
by value. The device generator is Philox, CPU's is mt19937, so the same seed
gives different masks by design.
"""


class Expect:
    __slots__ = ("action", "reason", "kinds", "dtypes", "training")

    def __init__(self, action, reason, kinds=("forward", "backward"), dtypes=None,
                 training=None):
        assert action in ("xfail", "skip"), action
        assert reason, "every expectation needs a reason"
        for k in kinds:
            assert k in ("forward", "backward"), k
        assert training in (None, True, False), training
        self.action, self.reason = action, reason
        self.kinds = tuple(kinds)
        self.dtypes = None if dtypes is None else tuple(dtypes)
        self.training = training


# Form: "nn.Name": (Expect("xfail", "reason", kinds=("forward",),
#                          dtypes=(torch.float64,), training=True), ...)
# Empty: no module_db difference is legitimate so far, and a backend bug is
# reported and fixed rather than listed here. (The RNN cells' missing
# _thnn_fused_lstm_cell/_thnn_fused_gru_cell kernels were fixed in 36216a9,
# before this sweep's first run.)
EXPECTATIONS = {
}


# module_db itself has no random module (its Transformer and
# MultiheadAttention samples use dropout=0.0, FractionalMaxPool's pass
# _random_samples): the sweep adds ModuleInfos for these (test_module_db.py,
# RANDOM_MODULE_DB), so the device's random modules are covered too. Eval
# mode is deterministic and compared by value.
_PHILOX = "(device: Philox stream, CPU: mt19937; values differ by design)"
RANDOM_MODULES = {
    "nn.Dropout": f"Bernoulli mask {_PHILOX}; checked: kept = x/(1-p), zero fraction ~ p, grad = cot*mask/(1-p)",
    "nn.Dropout1d": f"per-channel Bernoulli mask {_PHILOX}; checked like nn.Dropout, mask constant per channel",
    "nn.Dropout2d": f"per-channel Bernoulli mask {_PHILOX}; checked like nn.Dropout, mask constant per channel",
    "nn.Dropout3d": f"per-channel Bernoulli mask {_PHILOX}; checked like nn.Dropout, mask constant per channel",
    "nn.AlphaDropout": f"Bernoulli mask {_PHILOX}; checked: kept = a*x+b, dropped = one constant, fraction ~ p, grad = cot*a*mask",
    "nn.FeatureAlphaDropout": f"per-channel Bernoulli mask {_PHILOX}; checked like nn.AlphaDropout, mask constant per channel",
    "nn.RReLU": f"negative slopes uniform in [lower, upper] {_PHILOX}; checked: slopes in range, mean ~ (lower+upper)/2, grad = cot*slope",
}
