"""MPS fidelity mode (docs/fidelity.md, issue 14): in "mps" mode mps_ext
refuses what Apple's MPS backend refuses, with MPS's error types and texts;
the default mode accepts everything, as before.

Numbered as the issue: 1 the switch, 2 float64/complex128, 3 operators
without an MPS kernel (and PYTORCH_ENABLE_MPS_FALLBACK), 4 memory, 5 the
compatibility report (python -m torch_mps_ext.fidelity), 6 docs and example;
then the test derived from torch's operator table."""

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_python
import torch_mps_ext
from torch_mps_ext import fidelity
from torch_mps_ext.fidelity import _optable

DEV = "mps_ext"
SHA = torch.version.git_version

DOUBLE_NEW = ("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
              "support float64. Please use float32 instead.")
DOUBLE_OPERAND = ("Cannot convert a float64 Tensor to MPS as the MPS framework doesn't support "
                  "float64. Please use float32 instead.")
COMPLEX_DOUBLE = ("Trying to convert ComplexDouble to the MPS backend but it does not have "
                  "support for that dtype.")


def not_implemented(op):
    return (f"The operator '{op}' is not currently implemented for the MPS device. If you "
            "want this op to be considered for addition please comment on "
            "https://github.com/pytorch/pytorch/issues/141287 and mention use-case, that "
            f"resulted in missing op as well as commit hash {SHA}. As a temporary fix, you "
            "can set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU "
            "as a fallback for this op. WARNING: this will be slower than running natively "
            "on MPS.")


def fallback_warning(op):
    return (f"The operator '{op}' is not currently supported on the MPS backend and will fall "
            "back to run on the CPU. This may have performance implications.")


@contextlib.contextmanager
def mps_mode_on():
    torch.mps_ext.set_fidelity("mps")
    try:
        yield
    finally:
        torch.mps_ext.set_fidelity("off")


@pytest.fixture
def mps_mode():
    with mps_mode_on():
        yield


def raises_exactly(kind, text, fn):
    with pytest.raises(kind) as info:
        fn()
    assert str(info.value) == text
    return info


# ---------------------------------------------------------------- 1. the switch

def test_default_mode_is_off_and_accepts_float64_and_every_op():
    assert torch.mps_ext.get_fidelity() == "off"
    x = torch.randn(4, 4, device=DEV)
    assert x.double().dtype == torch.float64
    assert torch.zeros(2, dtype=torch.float64, device=DEV).sum().item() == 0
    z = torch.ones(2, dtype=torch.complex128, device=DEV)
    assert (z * z).sum().item() == 2
    assert torch.linalg.eig(x).eigenvalues.device.type == DEV
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.linalg.svd(x)


def test_set_and_get_fidelity(mps_mode):
    assert torch.mps_ext.get_fidelity() == "mps"
    torch.mps_ext.set_fidelity("off")
    assert torch.mps_ext.get_fidelity() == "off"
    torch.mps_ext.set_fidelity("mps")
    assert torch.mps_ext.get_fidelity() == "mps"


@pytest.mark.parametrize("bad", ["MPS", "on", "", None, 1])
def test_set_fidelity_refuses_other_values(bad):
    with pytest.raises(ValueError) as info:
        torch.mps_ext.set_fidelity(bad)
    assert str(info.value) == f"fidelity mode must be 'off' or 'mps', got {bad!r}"
    assert torch.mps_ext.get_fidelity() == "off"


def test_environment_variable_sets_the_mode_at_import():
    proc = run_python("""
        import torch, torch_mps_ext
        print(torch.mps_ext.get_fidelity())
        try:
            torch.zeros(1, dtype=torch.float64, device="mps_ext")
        except TypeError as e:
            print("TypeError", e)
    """, env={"TORCH_MPS_EXT_FIDELITY": "mps"})
    assert proc.stdout.splitlines() == ["mps", f"TypeError {DOUBLE_NEW}"]
    proc = run_python("import torch, torch_mps_ext; print(torch.mps_ext.get_fidelity())",
                      env={"TORCH_MPS_EXT_FIDELITY": "off"})
    assert proc.stdout.strip() == "off"


def test_environment_variable_bad_value():
    proc = run_python("import torch_mps_ext", env={"TORCH_MPS_EXT_FIDELITY": "strict"},
                      check=False)
    assert proc.returncode != 0
    assert "ValueError: TORCH_MPS_EXT_FIDELITY must be off or mps, got 'strict'" in proc.stderr


# ---------------------------------------------------------------- 2. float64 and complex128

FLOAT64_REFUSALS = {
    "zeros": lambda x: torch.zeros(2, dtype=torch.float64, device=DEV),
    "empty_strided": lambda x: torch.empty_strided((2, 2), (1, 2), dtype=torch.float64,
                                                   device=DEV),
    "tensor": lambda x: torch.tensor([1.0, 2.0], dtype=torch.float64, device=DEV),
    "arange": lambda x: torch.arange(3, dtype=torch.float64, device=DEV),
    "from_numpy_to": lambda x: torch.from_numpy(__import__("numpy").arange(3.0)).to(DEV),
    "cpu_double_to": lambda x: torch.ones(3, dtype=torch.float64).to(DEV),
    "module_to": lambda x: torch.nn.Linear(2, 2).double().to(DEV),
    "double": lambda x: x.double(),
    "to_dtype": lambda x: x.to(torch.float64),
    "to_device_dtype": lambda x: x.to(DEV, torch.float64),
    "to_cpu_float64": lambda x: x.to("cpu", torch.float64),  # MPS converts on the device
    "new_tensor": lambda x: x.new_zeros(2, dtype=torch.float64),
}


@pytest.mark.parametrize("case", sorted(FLOAT64_REFUSALS))
def test_float64_is_refused_with_mps_text(mps_mode, case):
    x = torch.randn(3, device=DEV)
    raises_exactly(TypeError, DOUBLE_NEW, lambda: FLOAT64_REFUSALS[case](x))


def test_float64_default_dtype_is_refused(mps_mode):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        raises_exactly(TypeError, DOUBLE_NEW, lambda: torch.ones(2, device=DEV))
    finally:
        torch.set_default_dtype(old)


def test_what_a_mac_allows_around_float64(mps_mode):
    x = torch.randn(3, device=DEV)
    assert x.cpu().double().dtype == torch.float64          # converted on the CPU
    y = torch.arange(3, dtype=torch.float64).to(DEV, torch.float32)  # idem, then uploaded
    assert y.dtype == torch.float32 and y.device.type == DEV
    assert x.half().float().dtype == torch.float32
    assert x.to(torch.bfloat16).dtype == torch.bfloat16
    assert isinstance(x.sum().item(), float)


def test_float64_made_before_the_switch_is_refused_as_an_operand():
    x = torch.ones(3, dtype=torch.float64, device=DEV)
    with mps_mode_on():
        raises_exactly(TypeError, DOUBLE_OPERAND, lambda: x.sin())
        raises_exactly(TypeError, DOUBLE_OPERAND, lambda: torch.add(x, x))
        raises_exactly(TypeError, DOUBLE_OPERAND, lambda: x.to(torch.float32))


def test_complex128_is_created_and_moved_but_not_computed_on(mps_mode):
    # MPS (aten/src/ATen/mps/EmptyTensor.cpp) refuses only float64 when it
    # allocates; its kernels refuse complex128 (getMPSDataType,
    # aten/src/ATen/native/mps/OperationUtils.mm). Copies are byte copies.
    cpu = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex128)
    z = cpu.to(DEV)
    assert z.dtype == torch.complex128 and z.device.type == DEV
    assert torch.equal(z.cpu(), cpu)
    assert torch.equal(z.clone().cpu(), cpu)
    assert torch.empty(2, dtype=torch.complex128, device=DEV).dtype == torch.complex128
    assert z.real.dtype == torch.float64  # a view: nothing computed
    # abs's float64 result is allocated first, as on MPS: refused as float64.
    raises_exactly(TypeError, DOUBLE_NEW, lambda: z.abs())
    for compute in (lambda: z.sum(), lambda: torch.mul(z, z),
                    lambda: torch.ones(2, dtype=torch.complex128, device=DEV),
                    lambda: torch.randn(2, 2, dtype=torch.complex64, device=DEV).to(
                        torch.complex128)):
        raises_exactly(TypeError, COMPLEX_DOUBLE, compute)
    # Complex normals are drawn on the float64 view (view_as_real), as MPS's
    # normal_ does: refused as a float64 operand.
    raises_exactly(TypeError, DOUBLE_OPERAND,
                   lambda: torch.randn(2, dtype=torch.complex128, device=DEV))
    w = torch.randn(2, dtype=torch.complex64, device=DEV)
    assert (w * w).dtype == torch.complex64  # complex64 is MPS's


def test_printing_and_grad_scaler_do_not_trip_over_torchs_own_float64(mps_mode):
    # torch converts to float64 to print, and GradScaler takes the reciprocal
    # in float64, except on MPS (`device.type == "mps"` branches): listed in
    # mps_overrides.txt, so mps mode does not refuse what a Mac never sees.
    x = torch.tensor([1.5, -2.25], device=DEV)
    assert repr(x) == "tensor([ 1.5000, -2.2500], device='mps_ext:0')"
    model = torch.nn.Linear(4, 2).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEV)
    with torch.autocast(DEV):
        loss = model(torch.randn(3, 4, device=DEV)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


# ---------------------------------------------------------------- 3. operators

def test_operator_without_mps_kernel_is_refused_with_mps_text(mps_mode):
    x = torch.randn(3, 3, device=DEV)
    raises_exactly(NotImplementedError, not_implemented("aten::linalg_eig"),
                   lambda: torch.linalg.eig(x))
    out = (torch.empty(3, dtype=torch.complex64, device=DEV),
           torch.empty(3, 3, dtype=torch.complex64, device=DEV))
    raises_exactly(NotImplementedError, not_implemented("aten::linalg_eig.out"),
                   lambda: torch.linalg.eig(x, out=out))
    raises_exactly(NotImplementedError, not_implemented("aten::mode"), lambda: torch.mode(x))
    # An operator MPS does have, with its overload name.
    values = torch.empty(3, device=DEV)
    indices = torch.empty(3, dtype=torch.long, device=DEV)
    torch.kthvalue(x, 2, out=(values, indices))
    assert torch.equal(values.cpu(), torch.kthvalue(x.cpu(), 2).values)


def test_native_kernels_mps_lacks_are_refused_too(mps_mode):
    x = torch.rand(4, device=DEV)
    raises_exactly(NotImplementedError, not_implemented("aten::poisson"),
                   lambda: torch.poisson(x))
    raises_exactly(NotImplementedError, not_implemented("aten::rrelu_with_noise"),
                   lambda: torch.nn.functional.rrelu(x, training=True))


def test_turning_the_mode_off_accepts_again():
    x = torch.randn(3, 3, device=DEV)
    torch.mps_ext.set_fidelity("mps")
    with pytest.raises(NotImplementedError):
        torch.linalg.eig(x)
    torch.mps_ext.set_fidelity("off")
    torch.linalg.eig(x)
    assert x.double().dtype == torch.float64


FALLBACK_PROGRAM = """
    import warnings, torch, torch_mps_ext
    warnings.simplefilter("always")
    x = torch.randn(3, 3, device="mps_ext")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            e = torch.linalg.eig(x)          # no MPS kernel: runs on the CPU
            torch.mode(x)
        x.sin(); x @ x                       # MPS kernels: no warning
    assert e.eigenvalues.device.type == "mps_ext"
    print(repr([(w.category.__name__, str(w.message)) for w in caught]))
"""


def test_enable_mps_fallback_runs_them_with_one_warning_per_operator():
    proc = run_python(FALLBACK_PROGRAM, env={"TORCH_MPS_EXT_FIDELITY": "mps",
                                             "PYTORCH_ENABLE_MPS_FALLBACK": "1"})
    assert eval(proc.stdout) == [("UserWarning", fallback_warning("aten::linalg_eig")),
                                 ("UserWarning", fallback_warning("aten::mode"))]


def test_enable_mps_fallback_changes_nothing_in_default_mode():
    proc = run_python(FALLBACK_PROGRAM, env={"TORCH_MPS_EXT_FIDELITY": None,
                                             "PYTORCH_ENABLE_MPS_FALLBACK": "1"})
    assert eval(proc.stdout) == []


def test_enable_mps_fallback_is_read_at_import():
    proc = run_python("""
        import os, torch, torch_mps_ext
        os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] = "1"   # too late, as on MPS
        torch.mps_ext.set_fidelity("mps")
        try:
            torch.linalg.eig(torch.randn(2, 2, device="mps_ext"))
        except NotImplementedError:
            print("refused")
    """, env={"PYTORCH_ENABLE_MPS_FALLBACK": None})
    assert proc.stdout.strip() == "refused"
    proc = run_python("import torch_mps_ext", env={"PYTORCH_ENABLE_MPS_FALLBACK": "yes"},
                      check=False)
    assert "ValueError: PYTORCH_ENABLE_MPS_FALLBACK must be 0 or 1, got 'yes'" in proc.stderr


def test_operators_mps_always_runs_on_the_cpu_warn_once(mps_mode):
    # MPSFallback.mm registers its CPU fallback for these whatever the
    # environment: a Mac runs them, with the warning.
    x = torch.randn(4, 4, device=DEV)
    proc = run_python("""
        import warnings, torch, torch_mps_ext
        torch.mps_ext.set_fidelity("mps")
        x = torch.randn(4, 4, device="mps_ext")
        emb = torch.nn.Embedding(10, 3, max_norm=1.0).to("mps_ext")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                u, s, vh = torch.linalg.svd(x)
                emb(torch.tensor([1, 2], device="mps_ext"))
        assert s.device.type == "mps_ext"
        print(repr([str(w.message) for w in caught]))
    """, env={"PYTORCH_ENABLE_MPS_FALLBACK": None})
    assert eval(proc.stdout) == [fallback_warning("aten::linalg_svd"),
                                 fallback_warning("aten::embedding_renorm_")]
    # ... while the operator the composite reaches has no MPS kernel: a Mac
    # names the out variant its generated functional kernel calls.
    raises_exactly(NotImplementedError, not_implemented("aten::_linalg_svd.U"),
                   lambda: torch.linalg.svdvals(x))


def test_the_float32_training_path_runs_without_a_word(mps_mode):
    # Linear, conv, norms, attention, recurrent layers, losses, optimizers,
    # autocast: what MPS runs, mps mode runs as before, with no warning.
    nn, F = torch.nn, torch.nn.functional
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=2), nn.GroupNorm(2, 8),
                            nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                            nn.Linear(8, 4)).to(DEV)
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, activation="gelu")
        tr = nn.Sequential(nn.Embedding(20, 16), layer, nn.LayerNorm(16), nn.Linear(16, 20))
        tr = tr.to(DEV)
        lstm, gru = nn.LSTM(8, 8, batch_first=True).to(DEV), nn.GRU(8, 8).to(DEV)
        params = [*cnn.parameters(), *tr.parameters(), *lstm.parameters(), *gru.parameters()]
        for opt in (torch.optim.SGD(params, lr=0.01, momentum=0.9), torch.optim.Adam(params),
                    torch.optim.AdamW(params, fused=True), torch.optim.RMSprop(params)):
            for amp in (None, torch.float16, torch.bfloat16):
                opt.zero_grad()
                with torch.autocast(DEV, dtype=amp or torch.float16, enabled=amp is not None):
                    x = torch.randn(2, 3, 12, 12, device=DEV)
                    loss = F.cross_entropy(cnn(x), torch.tensor([1, 3], device=DEV))
                    t = torch.randint(0, 20, (2, 6), device=DEV)
                    loss = loss + F.cross_entropy(tr(t).flatten(0, 1).float(), t.flatten())
                    q = torch.randn(2, 4, 6, 4, device=DEV)
                    loss = loss + F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
                    loss = loss + lstm(torch.randn(2, 5, 8, device=DEV))[0].sum()
                    loss = loss + gru(torch.randn(5, 2, 8, device=DEV))[0].sum()
                    w = cnn[0].weight.float()
                    loss = loss + F.mse_loss(w, torch.zeros_like(w))
                loss.float().backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
        # an empty last batch trains through the CNN too (batch_norm's empty path)
        out = cnn(torch.randn(0, 3, 12, 12, device=DEV, requires_grad=True))
        out.sum().backward()
        assert out.shape == (0, 4)
        tr.eval()
        with torch.no_grad():  # the encoder layer's inference fast path
            tr(torch.randint(0, 20, (2, 6), device=DEV))
        # The inference fast paths with a padding mask (nested tensors on
        # mps_ext; a Mac takes the regular path): torch's own prototype
        # warning aside, no word either.
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
        mha = nn.MultiheadAttention(16, 4, batch_first=True)
        enc, mha = enc.to(DEV).eval(), mha.to(DEV).eval()
        with torch.no_grad():
            q = torch.randn(2, 5, 16, device=DEV)
            mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=DEV)
            enc(q, src_key_padding_mask=mask)
            mha(q, q, q, key_padding_mask=mask)
        assert torch.isfinite(loss)


# ---------------------------------------------------------------- 4. memory

MEMORY_PROGRAM = """
    import torch, torch_mps_ext
    print(torch.mps_ext.get_fidelity(), torch.mps_ext.get_per_process_memory_fraction())
    keep = torch.empty(8 << 20, dtype=torch.uint8, device="mps_ext")
    try:
        torch.empty(48 << 20, dtype=torch.uint8, device="mps_ext")
    except torch.OutOfMemoryError as e:
        print(e)
    print(keep.numel())
"""

MIB64 = str(64 << 20)


def test_mps_watermarks_and_oom_text_in_mps_mode():
    proc = run_python(MEMORY_PROGRAM, env={
        "TORCH_MPS_EXT_MEMORY_BYTES": MIB64, "TORCH_MPS_EXT_FIDELITY": "mps",
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.5", "PYTORCH_MPS_LOW_WATERMARK_RATIO": "0.25"})
    first, oom, kept = proc.stdout.splitlines()
    assert first == "mps 0.5"
    assert re.fullmatch(
        r"MPS backend out of memory \(MPS allocated: [0-9.]+ MiB, other allocations: 0 bytes, "
        r"max allowed: 32\.00 MiB\)\. Tried to allocate 48\.00 MiB on private pool\. Use "
        r"PYTORCH_MPS_HIGH_WATERMARK_RATIO=0\.0 to disable upper limit for memory allocations "
        r"\(may cause system failure\)\.", oom), oom
    assert kept == str(8 << 20)  # nothing lost, the process goes on


def test_mps_watermarks_are_ignored_in_default_mode():
    proc = run_python(MEMORY_PROGRAM, env={
        "TORCH_MPS_EXT_MEMORY_BYTES": MIB64, "TORCH_MPS_EXT_FIDELITY": None,
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.5",
        "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO": "0.75"})
    first, oom, _ = proc.stdout.splitlines()
    assert first == "off 0.75"
    assert oom.startswith("mps_ext out of memory on device mps_ext:0 (")


def test_switching_the_mode_switches_the_default_limit():
    proc = run_python("""
        import torch, torch_mps_ext
        f = torch.mps_ext.get_per_process_memory_fraction
        a = f(); torch.mps_ext.set_fidelity("mps"); b = f(); torch.mps_ext.set_fidelity("off")
        print(a, b, f())
    """, env={"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.5", "TORCH_MPS_EXT_FIDELITY": None,
              "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO": None})
    assert proc.stdout.split() == ["1.7", "0.5", "1.7"]


def test_mps_watermark_without_ext_ones_falls_back_and_unlimited_text():
    proc = run_python(MEMORY_PROGRAM, env={
        "TORCH_MPS_EXT_MEMORY_BYTES": MIB64, "TORCH_MPS_EXT_FIDELITY": "mps",
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO": None,
        "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO": "0.5"})
    first, oom, _ = proc.stdout.splitlines()
    assert first == "mps 0.5"  # the _EXT_ value when MPS's own is unset
    assert oom.startswith("MPS backend out of memory (MPS allocated: ")


@pytest.mark.parametrize("name,value,allowed", [
    ("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "2.5", "a number in [0, 2]"),
    ("PYTORCH_MPS_LOW_WATERMARK_RATIO", "1.9", "a number in [0, 1.7]"),
])
def test_mps_watermark_bad_values(name, value, allowed):
    proc = run_python("import torch_mps_ext", env={name: value}, check=False)
    assert f"ValueError: {name} must be {allowed}, got '{value}'" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- 5. the report command

def run_report(args, cwd, env=None, timeout=300):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    for key in ("TORCH_MPS_EXT_FIDELITY", "PYTORCH_ENABLE_MPS_FALLBACK"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "torch_mps_ext.fidelity", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


PROGRAM = """\
import sys
import torch
import torch_mps_ext

x = torch.randn(4, 4, device="mps_ext")
model = torch.nn.Linear(3, 3).double().to("mps_ext")
for _ in range(3):
    torch.linalg.eig(x)
u, s, vh = torch.linalg.svd(x)
print("ran to the end", sys.argv[1:], (x @ x).sum().item() == (x @ x).sum().item())
"""


def test_report_records_every_incompatibility_and_exits_1(tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    report = tmp_path / "report.json"
    proc = run_report(["--report", str(report), "prog.py", "a", "--b"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "ran to the end ['a', '--b'] True" in proc.stdout  # float64 recorded, not raised
    data = json.loads(report.read_text())
    assert data["program_status"] == 0 and data["exit_status"] == 1
    rows = {(r["kind"], r["operator"] or r["dtype"]): r for r in data["incompatibilities"]}
    assert set(rows) == {("operator", "aten::linalg_eig"), ("dtype", "float64")}
    eig = rows[("operator", "aten::linalg_eig")]
    assert eig["count"] == 3 and eig["first"] == "prog.py:8"
    f64 = rows[("dtype", "float64")]
    # Module.to's copies happen inside torch.nn: the first user frame is line 6.
    assert f64["first"] == "prog.py:6" and f64["operators"] == {"tensor creation": 2}
    assert [(r["operator"], r["count"], r["first"]) for r in data["cpu_fallbacks"]] == [
        ("aten::linalg_svd", 1, "prog.py:9")]
    table = proc.stderr
    assert "2 incompatibilities with Apple's MPS backend" in table
    assert re.search(r"operator\s+aten::linalg_eig\s+3\s+prog\.py:8", table), table
    assert re.search(r"dtype\s+float64 \(tensor creation\)\s+2\s+prog\.py:6", table), table
    assert re.search(r"cpu\s+aten::linalg_svd\s+1\s+prog\.py:9", table), table


def test_report_exit_statuses(tmp_path):
    (tmp_path / "clean.py").write_text(
        "import torch, torch_mps_ext\nprint((torch.ones(2, device='mps_ext') * 2).sum().item())\n")
    proc = run_report(["clean.py"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "No incompatibility with Apple's MPS backend found." in proc.stderr
    # The program's own status wins when it failed, incompatibilities or not.
    (tmp_path / "exits.py").write_text(
        "import sys, torch, torch_mps_ext\ntorch.linalg.eig(torch.eye(2, device='mps_ext'))\n"
        "sys.exit(3)\n")
    assert run_report(["exits.py"], tmp_path).returncode == 3
    (tmp_path / "raises.py").write_text("raise KeyError('boom')\n")
    proc = run_report(["raises.py"], tmp_path)
    assert proc.returncode == 1 and "KeyError: 'boom'" in proc.stderr
    (tmp_path / "clean_exit0.py").write_text(
        "import sys, torch, torch_mps_ext\ntorch.zeros(1, dtype=torch.float64, "
        "device='mps_ext')\nsys.exit(0)\n")
    assert run_report(["clean_exit0.py"], tmp_path).returncode == 1
    proc = run_report([], tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m torch_mps_ext.fidelity")


def test_report_runs_modules_and_covers_processes_they_start(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "work.py").write_text(textwrap.dedent("""\
        import subprocess, sys
        import torch, torch_mps_ext
        print("args", sys.argv[1:])
        subprocess.run([sys.executable, "-c", "import torch, torch_mps_ext\\n"
                        "torch.mode(torch.ones(3, device='mps_ext'))"], check=True)
    """))
    report = tmp_path / "r.json"
    proc = run_report(["--report", str(report), "-m", "mypkg.work", "x"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "args ['x']" in proc.stdout
    rows = json.loads(report.read_text())["incompatibilities"]
    assert [(r["operator"], r["count"], r["first"]) for r in rows] == [
        ("aten::mode", 1, "<string>:2")]


def test_report_as_a_pytest_ci_step(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""\
        import torch, torch_mps_ext

        def test_fine():
            assert (torch.ones(2, device="mps_ext") + 1).sum().item() == 4

        def test_mac_incompatible():
            assert torch.arange(3, dtype=torch.float64).to("mps_ext").sum().item() == 3
    """))
    proc = run_report(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
                      tmp_path)
    assert "2 passed" in proc.stdout
    assert proc.returncode == 1
    assert re.search(r"dtype\s+float64 \(.*tensor creation.*\)\s+2\s+\S*test_user\.py:7",
                     proc.stderr), proc.stderr


# ---------------------------------------------------------------- 6. docs and example

def test_docs_and_readme_section():
    doc = open(os.path.join(ROOT, "docs", "fidelity.md")).read()
    for topic in ("TORCH_MPS_EXT_FIDELITY", "PYTORCH_ENABLE_MPS_FALLBACK", "native_functions.yaml",
                  "mps_overrides.txt", "python -m torch_mps_ext.fidelity", "cannot"):
        assert topic in doc, topic
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "## Testing code for Macs on Linux" in readme
    assert os.path.exists(os.path.join(ROOT, "examples", "mac_compat_check.py"))


# ---------------------------------------------------------------- the operator table

def test_table_reading():
    table = _optable.load()
    assert table["add.out"].verdict == _optable.MPS
    assert table["add.Tensor"].verdict == _optable.MPS          # structured delegate
    assert "structured_delegate: add.out" in table["add.Tensor"].why
    assert table["linalg_eig"].verdict == _optable.NONE
    assert table["linalg_svd"].verdict == _optable.COMPOSITE    # no dispatch: implicit
    assert table["kthvalue"].verdict == _optable.COMPOSITE      # CompositeExplicitAutograd
    assert table["embedding_renorm"].verdict == _optable.COMPOSITE  # autogen
    # The table is the installed torch's: every ATen operator of this build
    # with a CPU kernel is in it.
    names = {n[len("aten::"):] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::")}
    cpu = set(torch._C._dispatch_get_registrations_for_dispatch_key("CPU"))
    missing = {n for n in names if f"aten::{n}" in cpu and n not in table}
    # Outside the table: quantized RNNs (aten/src/ATen/native/quantized).
    assert all(n.startswith(("quantized_lstm.", "quantized_gru.")) for n in missing), missing


def test_override_file_is_reviewed_and_current():
    raw = _optable.load()
    overrides = fidelity.read_overrides()
    assert overrides
    torch_dir = os.path.dirname(torch.__file__)
    for name, (verdict, reason) in overrides.items():
        assert len(reason.split()) >= 3, name  # a reason, not a word
        if verdict == fidelity.BRANCH:
            path, function = name[len("torch/"):].rsplit(":", 1)
            source = open(os.path.join(torch_dir, path)).read()
            assert "mps" in source and (function == "*" or f"def {function}(" in source), name
            continue
        entry = raw.get(name[len("aten::"):])
        assert entry is not None, f"{name}: not an operator of this torch"
        # An override says what the table does not: stale lines fail here.
        if verdict in (fidelity.MPS, fidelity.ROUTE):
            assert entry.verdict == _optable.NONE, f"{name}: the table already accepts it"
        elif verdict == fidelity.NONE:
            assert entry.verdict != _optable.NONE, f"{name}: the table already refuses it"
        else:
            assert entry.verdict != fidelity.CPU, name


def test_mps_kernels_torch_registers_from_python_are_accepted(mps_mode):
    # torch/_refs/linalg registers linalg_lu_solve.out for MPS at import (on
    # every build); the table names CPU and CUDA only. A Mac runs it, and the
    # backward of det/slogdet/solve, which calls it.
    table = fidelity.operator_table()
    for name in ("aten::linalg_lu_solve.out", "aten::linalg_lu_solve"):
        v = table[name]
        assert (v.verdict, v.source) == (fidelity.MPS, "registered"), v
        assert "torch/_refs/linalg/__init__.py" in v.why
    assert _optable.load()["linalg_lu_solve.out"].verdict == _optable.NONE  # the table alone
    A = torch.tensor([[4.0, 1.0, 2.0], [1.0, 5.0, 3.0], [2.0, 3.0, 6.0]])
    B = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    LU, piv = torch.linalg.lu_factor(A)
    got = torch.linalg.lu_solve(LU.to(DEV), piv.to(DEV), B.to(DEV))
    torch.testing.assert_close(got.cpu(), torch.linalg.lu_solve(LU, piv, B))
    a = A.to(DEV).requires_grad_()
    (grad,) = torch.autograd.grad(torch.linalg.det(a), a)
    a_cpu = A.clone().requires_grad_()
    torch.testing.assert_close(grad.cpu(), torch.autograd.grad(torch.linalg.det(a_cpu), a_cpu)[0])
    # An operator neither the table nor Python gives MPS stays refused.
    with pytest.raises(NotImplementedError, match="'aten::linalg_eig' is not currently implemented"):
        torch.linalg.eig(a.detach())


def _reached_ops(fn):
    """The ATen operators the call reaches at the backend with mps_ext
    tensors (after composite decompositions), and whether any involves a
    float64/complex128 device tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Reached(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.wide = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            flat = tree_flatten((args, kwargs, out))[0]
            dev = [t for t in flat if isinstance(t, torch.Tensor) and t.device.type == DEV]
            factory = isinstance(kwargs.get("device"), torch.device) and \
                kwargs["device"].type == DEV
            if dev or factory:
                self.ops.append(func.name())
                self.wide |= any(t.dtype in (torch.float64, torch.complex128) for t in dev)
            return out

    with Reached() as mode:
        fn()
    return mode.ops, mode.wide


# OpInfos whose operators MPS lacks, and some it has, to be sure both kinds
# are in the sample; the rest of the sample is every 9th OpInfo by name.
SURE = ["linalg.eig", "linalg.eigh", "put", "heaviside", "frexp", "mode", "logspace",
        "geqrf", "linalg.lstsq", "matrix_exp", "special.airy_ai", "linalg.ldl_factor",
        "add", "mm", "sin", "softmax", "nn.functional.conv2d", "nn.functional.layer_norm",
        "cumsum", "sort", "index_select", "nn.functional.embedding"]


def _sample_ops():
    from torch.testing._internal.common_methods_invocations import op_db

    by_name = sorted(op_db, key=lambda o: (o.name, o.variant_test_name))
    chosen = [o for i, o in enumerate(by_name) if i % 9 == 0] + \
        [o for o in by_name if o.name in SURE and not o.variant_test_name]
    seen, out = set(), []
    for o in chosen:
        key = (o.name, o.variant_test_name)
        if key not in seen and torch.float32 in o.supported_dtypes("cpu"):
            seen.add(key)
            out.append(o)
    return out


def _kernel_refusal_texts() -> tuple[str, ...]:
    from torch_mps_ext.fidelity import _commonmps

    return ("Adaptive pool MPS:", "ConvTranspose 3D with BF16 or FP16") + tuple(
        text for _, _, text in _commonmps.read_kernel_data().values())


def test_mps_mode_follows_the_operator_table():
    """For a sample of OpInfos: the operators each reaches on mps_ext (traced
    in the default mode) are judged by the table (with the overrides); mps
    mode then refuses the call, naming the first operator without an MPS
    kernel, exactly when there is one, and runs it otherwise."""
    table = fidelity.operator_table()
    refused, accepted, skipped = [], [], []
    for opinfo in _sample_ops():
        try:
            sample = next(iter(opinfo.sample_inputs(DEV, torch.float32, requires_grad=False)))
        except Exception:  # noqa: BLE001 - OpInfos whose samples need other devices
            skipped.append(opinfo.name)
            continue

        def call():
            return opinfo.op(sample.input, *sample.args, **sample.kwargs)

        try:
            ops, wide = _reached_ops(call)
        except Exception:  # noqa: BLE001 - an error input: not this test's subject
            skipped.append(opinfo.name)
            continue
        verdicts = [table.get(op) for op in ops]
        # Only leaves are judged here: a composite reached at the backend
        # (CompositeExplicitAutograd) calls operators the trace cannot see.
        if wide or not ops or any(v is None or v.verdict == fidelity.COMPOSITE
                                  for v in verdicts):
            skipped.append(opinfo.name)
            continue
        first_refused = next((op for op, v in zip(ops, verdicts)
                              if v.verdict == fidelity.NONE), None)
        with mps_mode_on():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "cpu" verdicts warn
                if first_refused is None:
                    try:
                        call()
                        accepted.append(opinfo.name)
                    except (RuntimeError, NotImplementedError) as e:
                        # an MPS kernel's own refusal of these sizes (adaptive
                        # pooling that does not divide): not the table's
                        if not str(e).startswith(_kernel_refusal_texts()):
                            raise
                        skipped.append(opinfo.name)
                else:
                    with pytest.raises(NotImplementedError) as info:
                        call()
                    # named as a Mac names it (a structured functional: its out variant)
                    shown = fidelity.shown_name(table[first_refused]) or first_refused
                    assert str(info.value) == not_implemented(shown), opinfo.name
                    refused.append((opinfo.name, first_refused))
        call()  # and the default mode runs it
    assert len(refused) >= 8, refused
    assert len(accepted) >= 20, accepted
    names = {name for name, _ in refused}
    assert {"linalg.eig", "linalg.eigh", "heaviside", "geqrf", "mode"} <= names, refused


def test_native_kernels_of_operators_mps_lacks_ask_the_mode():
    # Operators mps_ext implements natively (not through the fallback, which
    # asks the mode for every call) and MPS lacks must refuse in mps mode:
    # each such kernel calls mpsLacks(...) (csrc/aten/Fidelity.h). A new
    # native kernel for a CUDA-only operator fails here until it does.
    table = fidelity.operator_table()
    aten = os.path.join(ROOT, "csrc", "aten")
    unchecked = []
    for name in sorted(os.listdir(aten)):
        # SparseFallback.cpp registers on the sparse keys only, which the
        # mode does not model (docs/fidelity.md); the table is the dense one.
        if not name.endswith(".cpp") or name == "SparseFallback.cpp":
            continue
        source = open(os.path.join(aten, name)).read()
        for op in re.findall(r'm\.impl\("([a-z0-9_.]+)"', source):
            verdict = table.get(f"aten::{op}")
            if verdict is None or verdict.accepted:
                continue
            base, _, overload = op.partition(".")
            if f'mpsLacks("aten::{base}", "{overload}")' not in source:
                unchecked.append(f"{name}: {op}")
    assert not unchecked, unchecked
    with pytest.raises(NotImplementedError, match=re.escape(not_implemented(
            "aten::batch_norm_stats"))):
        with mps_mode_on():
            torch.batch_norm_stats(torch.randn(2, 3, 4, device=DEV), 1e-5)


# ---------------------------------------------------------------- PyTorch's test_mps.py (issue 23)

def test_test_mps_rewrite_keeps_the_frameworks_device_type():
    from torch_mps_ext.fidelity import _testmps

    source = textwrap.dedent('''
        import torch.mps
        from torch.mps import synchronize
        x = torch.ones(2, device="mps").to("mps:0").mps()
        y = torch.device(f"mps:{0}")
        assert x.is_mps and self.device_type == "mps"
        torch.mps.synchronize(); torch.backends.mps.is_available()
        ops(mps_ops_modifier(op_db, device_type="mps"))
        DecorateInfo(skip, device_type="mps"); torch.autocast(device_type="mps")
        instantiate_device_type_tests(T, globals(), allow_mps=True, only_for="mps")
        s = "MPS mps tensor"
        code = "torch.ones(1, device='mps')"
    ''')
    tree, count = _testmps.rewrite(source)
    out = __import__("ast").unparse(tree)
    assert "torch.ones(2, device='mps_ext').to('mps_ext:0').mps_ext()" in out
    assert "torch.device(f'mps_ext:{0}')" in out
    assert "x.is_mps_ext and self.device_type == 'mps'" in out
    assert "torch.mps_ext.synchronize()" in out and "torch.backends.mps.is_available()" in out
    assert "mps_ops_modifier(op_db, device_type='mps')" in out
    assert "DecorateInfo(skip, device_type='mps')" in out
    assert "torch.autocast(device_type='mps_ext')" in out
    assert "only_for='mps'" in out and "'MPS mps tensor'" in out
    assert "code = \"torch.ones(1, device='mps_ext')\"" in out
    assert "from torch_mps_ext import synchronize" in out and "import torch_mps_ext as" in out
    assert count["'mps'"] == 5 and count["torch.mps"] == 1 and count["t.mps()"] == 1


STAND_IN = '''\
# A test_mps.py-shaped file: PyTorch's framework, op_db and common_mps.
import unittest
import torch
from torch.testing._internal.common_utils import TestCase, run_tests, MACOS_VERSION, NoTest
from torch.testing._internal.common_device_type import instantiate_device_type_tests, ops
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_mps import mps_ops_modifier
import torch.backends.mps

if not torch.backends.mps.is_available():
    TestCase = NoTest


class TestDevice(TestCase):
    def test_strings(self):
        x = torch.ones(3, device="mps")
        self.assertTrue(x.is_mps)
        self.assertEqual(x.device, torch.device("mps:0"))
        torch.mps.synchronize()
        self.assertEqual(str(torch.ones(2).mps().device), f"mps:{0}")
        self.assertEqual(MACOS_VERSION, 14.4)
        self.assertTrue(torch.backends.mps.is_macos_or_newer(14, 4))
        self.assertFalse(torch.backends.mps.is_macos_or_newer(15, 0))

    @unittest.expectedFailure
    def test_float64(self):
        torch.ones(2, dtype=torch.float64, device="mps")

    @unittest.expectedFailure
    def test_lenient(self):
        torch.ones(2, device="mps").add_(1)


class TestMetalLibrary(TestCase):
    def test_load_precompiled_metallib(self):
        torch.mps.load_metallib(b"MTLB" + bytes(60))


class TestConsistency(TestCase):
    @ops(mps_ops_modifier([op for op in op_db if op.name in ("linalg.eig", "abs")]),
         allowed_dtypes=[torch.float32])
    def test_output_match(self, device, dtype, op):
        self.assertEqual(device, "mps:0")
        for sample in op.sample_inputs(device, dtype):
            out = op(sample.input, *sample.args, **sample.kwargs)
            cpu = sample.transform(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t)
            self.assertEqual(out, op(cpu.input, *cpu.args, **cpu.kwargs))


instantiate_device_type_tests(TestConsistency, globals(), allow_mps=True, only_for="mps")

if __name__ == "__main__":
    run_tests()
'''


def test_test_mps_runner_judges_each_test_against_a_mac(tmp_path):
    path = tmp_path / "test_mps.py"
    path.write_text(STAND_IN)
    report = tmp_path / "r.json"
    proc = run_report(["test-mps", "--macos", "14.4", "--report", str(report), str(path),
                       "-q", "-p", "no:randomly"], cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # it found differences
    data = json.loads(report.read_text())
    classes = data["classes"]
    assert classes["TestDevice"]["counts"] == {"as on a Mac": 1, "MPS failure reproduced": 1,
                                               "passes where a Mac fails": 1}
    assert classes["TestDevice"]["differences"] == [
        {"test": "TestDevice::test_lenient", "outcome": "passes where a Mac fails",
         "reason": "unexpected success"}]
    metal = classes["TestMetalLibrary"]["differences"]
    assert len(metal) == 1 and metal[0]["reason"].startswith("[metal-only] loads Apple's binary .metallib")
    # common_mps's lists, applied as test_mps.py applies them: linalg.eig is
    # unimplemented on MPS (expected failure; refused here too), abs runs.
    consistency = classes["TestConsistencyMPS"]["counts"]
    assert consistency == {"as on a Mac": 1, "MPS failure reproduced": 1}, classes
    assert data["rewritten"]["'mps'"] >= 6 and data["rewritten"]["torch.mps"] == 2
    # the per-class table on stderr
    assert re.search(r"TestConsistencyMPS\s+1\s+1\s+0\s+0", proc.stderr), proc.stderr
    assert "[metal-only]" in proc.stderr and "passes where a Mac fails: unexpected success" in proc.stderr
    # nothing of the user's file changed on disk, no rewritten bytecode left behind
    assert path.read_text() == STAND_IN
    assert not (tmp_path / "__pycache__").exists() or not any(
        p.name.startswith("test_mps") for p in (tmp_path / "__pycache__").iterdir())


@pytest.mark.parametrize("args,text", [
    ([], "error: no test file given"),
    (["/nonexistent/test_mps.py"], "error: /nonexistent/test_mps.py: no such file"),
    (["--macos", "fifteen", "x.py"], "error: --macos must be a version like 15.0, got 'fifteen'"),
    (["-k", "x", "x.py"], "error: unknown option -k (pytest's options go after the file)"),
])
def test_test_mps_runner_usage_errors(tmp_path, args, text):
    proc = run_report(["test-mps", *args], cwd=str(tmp_path))
    assert proc.returncode == 2
    assert text in proc.stderr


def test_expectations_file_is_well_formed():
    from torch_mps_ext.fidelity import _testmps

    rows = _testmps.read_expectations()
    assert rows and all(r.category in _testmps.CATEGORIES and r.reason for r in rows)
    bad = os.path.join(os.path.dirname(_testmps.__file__), "x")
    with pytest.raises(FileNotFoundError):
        _testmps.read_expectations(bad)


def test_torch_mps_names_have_mps_ext_counterparts():
    # What code written for MPS (test_mps.py among it) reaches through
    # torch.mps, rewritten to torch.mps_ext (issue 23, item 5).
    import types

    def public(mod):
        return {n for n in dir(mod) if not n.startswith("_")
                and not isinstance(getattr(mod, n), type(torch))  # modules checked below
                and n not in ("Tensor", "torch")}  # typing re-exports

    assert public(torch.mps) - set(dir(torch.mps_ext)) == set()
    for sub in ("event", "profiler"):
        assert isinstance(getattr(torch.mps_ext, sub), types.ModuleType), sub
    assert torch.mps_ext.event.Event is torch.mps_ext.Event
    e = torch.mps_ext.event.Event(enable_timing=True)
    x = torch.ones(1000, device=DEV)
    e.record()
    (x * 2).sum()
    e.synchronize()
    assert e.query()
    assert {n for n in dir(torch.mps.profiler) if not n.startswith("_")} - set(
        dir(torch.mps_ext.profiler)) <= {"Iterator", "Literal", "ProfilerMode"}  # typing only


# ---------------------------------------------------------------- torch's device-type branches (issue 23)

def test_tolerances_of_matrix_rank_and_pinv_are_float32_as_on_mps(mps_mode):
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    d = a.to(DEV)
    # pinv: on a Mac its tolerances are float32 and its linalg_svd runs on
    # the CPU with MPS's warning; before issue 23 this raised the float64
    # TypeError here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (torch.linalg.pinv, torch.pinverse, torch.Tensor.pinverse):
            torch.testing.assert_close(fn(d).cpu(), torch.linalg.pinv(a), atol=1e-5, rtol=1e-5)
    assert fallback_warning("aten::linalg_svd") in {str(w.message) for w in caught}
    # matrix_rank: common_mps expects it to fail on MPS at _linalg_svd.U
    raises_exactly(NotImplementedError, not_implemented("aten::_linalg_svd.U"),
                   lambda: torch.linalg.matrix_rank(d))
    # a float64 input is still MPS's TypeError
    raises_exactly(TypeError, DOUBLE_NEW, lambda: torch.linalg.pinv(a.double().to(DEV)))
    # complex128: a Mac names ComplexDouble at the first computation; here the
    # float64 tolerances come first (docs/fidelity.md: the one text that differs)
    raises_exactly(TypeError, DOUBLE_NEW, lambda: torch.linalg.pinv(a.to(torch.complex128).to(DEV)))


def test_device_branches_are_removed_when_the_mode_goes_off():
    originals = (torch.linalg.pinv, torch.linalg.matrix_rank, torch.pinverse,
                 torch.nn.SyncBatchNorm.forward, torch.nn.functional.linear)
    with mps_mode_on():
        assert torch.linalg.pinv is not originals[0]
        assert torch.nn.functional.linear is not originals[4]
    assert (torch.linalg.pinv, torch.linalg.matrix_rank, torch.pinverse,
            torch.nn.SyncBatchNorm.forward, torch.nn.functional.linear) == originals
    assert "pinverse" not in vars(torch.Tensor)  # inherited again
    # default mode: float64 tolerances as on CPU, no refusal
    assert torch.linalg.matrix_rank(torch.eye(3, device=DEV)).item() == 3


def test_sync_batch_norm_raises_a_macs_value_error(mps_mode, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        m = torch.nn.SyncBatchNorm(3).to(DEV)
        x = torch.randn(2, 3, 4, device=DEV)
        raises_exactly(ValueError, "SyncBatchNorm expected input tensor to be on GPU or XPU or "
                       "privateuseone", lambda: m(x))
        assert m.num_batches_tracked.item() == 1  # updated before the refusal, as on a Mac
        raises_exactly(ValueError, "expected at least 2D input (got 1D input)",
                       lambda: m(torch.randn(3, device=DEV)))
        m.eval()  # no sync in eval mode: runs
        torch.testing.assert_close(m(x).cpu(), torch.nn.functional.batch_norm(
            x.cpu(), m.running_mean.cpu(), m.running_var.cpu(), m.weight.detach().cpu(),
            m.bias.detach().cpu(), False))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- MPS numerics in mps mode (issue 23, item 2)

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grid_sample_half_precision_is_computed_in_float32_in_mps_mode(dims, dtype):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(dims)
    spatial = (6,) * dims
    x = (torch.randn(2, 3, *spatial, generator=g) * 4).to(dtype)
    grid = (torch.rand(2, *(5,) * dims, dims, generator=g) * 2.2 - 1.1).to(dtype)
    go = torch.randn(2, 3, *(5,) * dims, generator=g).to(dtype)

    def run(x, grid, go):
        x = x.detach().requires_grad_()
        grid = grid.detach().requires_grad_()
        out = F.grid_sample(x, grid, align_corners=False)
        out.backward(go)
        return out.detach().cpu(), x.grad.cpu(), grid.grad.cpu()

    in_half = run(x, grid, go)  # CPU's kernels in half precision
    in_float = [t.to(dtype) for t in run(x.float(), grid.float(), go.float())]  # as MPS
    assert any(not torch.equal(a, b) for a, b in zip(in_half, in_float))  # they differ here
    with mps_mode_on():
        got = run(x.to(DEV), grid.to(DEV), go.to(DEV))
    for a, b in zip(got, in_float):
        assert a.dtype == dtype and torch.equal(a, b)
    # default mode: CPU's numerics, as before
    for a, b in zip(run(x.to(DEV), grid.to(DEV), go.to(DEV)), in_half):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weights_dtype, mps_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.int32, torch.int32), (torch.int8, torch.int32),
    (torch.uint8, torch.int32), (torch.int64, torch.int32), (torch.bool, torch.int32)])
def test_weighted_bincount_has_mps_result_dtype_in_mps_mode(weights_dtype, mps_dtype):
    x = torch.tensor([0, 1, 1, 1, 4], dtype=torch.int32)
    w = torch.tensor([1, 2, 3, 4, 5]).to(weights_dtype)
    cpu = torch.bincount(x, w)
    with mps_mode_on():
        got = torch.bincount(x.to(DEV), w.to(DEV))
        # MPS sums other integer weights as int32 (truncated first): wraps at 32 bits
        big = torch.bincount(x.to(DEV), torch.tensor([2**32 + 7, 1, 2, 3, 2**31 - 1]).to(DEV))
        empty = torch.bincount(torch.tensor([], dtype=torch.long, device=DEV),
                               torch.tensor([], device=DEV), minlength=3)
    assert got.dtype == mps_dtype and got.device.type == DEV
    assert torch.equal(got.cpu(), cpu.to(mps_dtype))
    assert big.dtype == torch.int32 and big.cpu().tolist() == [7, 6, 0, 0, 2**31 - 1]
    assert empty.dtype == torch.int64 and empty.cpu().tolist() == [0, 0, 0]
    # default mode: CPU's dtypes, as before
    assert torch.bincount(x.to(DEV), w.to(DEV)).dtype == cpu.dtype


def test_renorm_backward_runs_in_mps_mode_as_on_a_mac():
    # ATen's renorm backward accumulates in toAccumulateType(dtype, device):
    # float32 on MPS, float64 here, intermediates a Mac never has.
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    g = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(torch.renorm(x.requires_grad_(), 2, 1, 1.0), x, g)[0]
    xd = x.detach().to(DEV).requires_grad_()
    with mps_mode_on():
        got = torch.autograd.grad(torch.renorm(xd, 2, 1, 1.0), xd, g.to(DEV))[0]
        # float64 made in any other backward stays refused
        class Widen(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t * 2

            @staticmethod
            def backward(ctx, grad):
                return grad.double().float() * 2

        with pytest.raises(TypeError, match="doesn't support float64"):
            Widen.apply(xd).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want)


# ---------------------------------------------------------------- common_mps's per-dtype lists (issue 23, item 1)

def common_mps_text(op, dtype, key):
    return (f"The operator '{op}' has no MPS kernel for dtype {dtype} "
            f"(torch.testing._internal.common_mps: UNIMPLEMENTED_XFAILLIST['{key}'])")


def test_common_mps_per_dtype_refusals(mps_mode):
    import torch.nn.functional as F

    x = torch.ones(1, 2, 4, 4, dtype=torch.int32, device=DEV)
    raises_exactly(RuntimeError, common_mps_text("aten::avg_pool2d", "Int",
                                                 "nn.functional.avg_pool2d"),
                   lambda: F.avg_pool2d(x, 2))
    assert F.avg_pool2d(x.float(), 2).shape == (1, 2, 2, 2)  # float: MPS's kernel runs it
    raises_exactly(RuntimeError, common_mps_text("aten::median", "Bool", "median"),
                   lambda: torch.median(torch.tensor([True, False, True], device=DEV)))
    assert torch.median(torch.tensor([3, 1, 2], device=DEV)).item() == 2
    # the dtype judged is the operator's input, not its indices or targets
    logp = torch.randn(3, 5, device=DEV).log_softmax(1)
    F.nll_loss(logp, torch.tensor([1, 0, 4], device=DEV))
    raises_exactly(RuntimeError, common_mps_text("aten::nll_loss_forward", "Long",
                                                 "nn.functional.nll_loss"),
                   lambda: F.nll_loss(torch.ones(3, 5, dtype=torch.long, device=DEV),
                                      torch.tensor([1, 0, 4], device=DEV)))
    # complex: only for the OpInfos common_mps lists as supported
    a = torch.randn(3, 3, dtype=torch.complex64, device=DEV)
    raises_exactly(RuntimeError, "The operator 'aten::linalg_qr' has no MPS kernel for dtype "
                   "ComplexFloat (torch.testing._internal.common_mps: 'linalg.qr' is not in "
                   "SUPPORTED_COMPLEX_OPS)", lambda: torch.linalg.qr(a))
    assert torch.linalg.qr(a.real)[0].shape == (3, 3)
    # nn.functional.linear is listed: the addmm it reaches is not refused
    out = F.linear(a, a, torch.ones(3, dtype=torch.complex64, device=DEV))
    torch.testing.assert_close(out.cpu(), a.cpu() @ a.cpu().T + 1)


def test_common_mps_per_dtype_refusals_in_the_report(tmp_path):
    program = tmp_path / "prog.py"
    program.write_text("import torch, torch_mps_ext\n"
                       "torch.median(torch.tensor([True, False], device='mps_ext'))\n")
    proc = run_report(["--report", str(tmp_path / "r.json"), str(program)], cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["incompatibilities"]
    assert any(r["kind"] == "dtype" and r.get("dtype") == "Bool" and "aten::median" in
               r.get("operators", []) for r in rows), rows


def test_common_mps_dtype_data_is_current_with_the_installed_torch():
    from torch_mps_ext.fidelity import _commonmps

    listed = _commonmps.read_list()
    supported = _commonmps.read_set()
    table = fidelity.operator_table()
    data = _commonmps.read_data()
    sources = {source for _, source, _ in data.values()}
    assert len(data) >= 15 and sources == {_commonmps.LIST, _commonmps.COMPLEX_SET}
    for op, (dtypes, source, keys) in data.items():
        assert table[op].verdict == "mps", op  # an MPS kernel that refuses dtypes
        for key in keys.split():
            assert _commonmps._norm_op(op) == _commonmps._norm_key(key)
            if source == _commonmps.LIST:
                assert dtypes <= _commonmps._INTEGRAL, (op, dtypes)
                assert listed[key] and dtypes <= set(listed[key]), (op, key)
            else:
                assert dtypes == {"complex32", "complex64"} and key not in supported, (op, key)
    assert set(_commonmps.SCALAR_TYPE_CODES) >= {d for ds, _, _ in data.values() for d in ds}


CONV_INT = "Convolution is supported only for Floating types"
CONV_T3D_HALF = "ConvTranspose 3D with BF16 or FP16 types is not supported on MPS"
POOL_TAIL = (" Non-divisible input sizes are not implemented on MPS device yet. For now, you can "
             "manually transfer tensor to cpu in this case. Please refer to [this "
             "issue](https://github.com/pytorch/pytorch/issues/96056)")


def test_mps_mode_refuses_what_mps_kernels_refuse_with_their_texts(mps_mode):
    F = torch.nn.functional
    xi = torch.ones(1, 2, 5, dtype=torch.int64, device=DEV)
    wi = torch.ones(3, 2, 2, dtype=torch.int64, device=DEV)
    raises_exactly(RuntimeError, CONV_INT, lambda: F.conv1d(xi, wi))
    raises_exactly(RuntimeError, CONV_INT, lambda: F.conv_transpose1d(xi, wi.transpose(0, 1)))
    for dtype in (torch.float16, torch.bfloat16):
        x5 = torch.ones(1, 2, 3, 3, 3, dtype=dtype, device=DEV)
        w5 = torch.ones(2, 2, 2, 2, 2, dtype=dtype, device=DEV)
        raises_exactly(RuntimeError, CONV_T3D_HALF, lambda: F.conv_transpose3d(x5, w5))
        assert F.conv3d(x5, w5).shape == (1, 2, 2, 2, 2)  # not transposed: MPS has it
        x4, w4 = x5[:, :, 0], w5[:, :, 0]
        assert F.conv_transpose2d(x4, w4).shape == (1, 2, 4, 4)
    assert F.conv1d(xi.float(), wi.float()).cpu().tolist() == [[[4.0] * 4] * 3]
    v = torch.arange(3, dtype=torch.int32, device=DEV)
    raises_exactly(RuntimeError, "MPS device does not support addr for non-float input",
                   lambda: torch.addr(torch.zeros(3, 3, dtype=torch.int32, device=DEV), v, v))
    assert torch.equal(torch.addr(torch.zeros(3, 3, device=DEV), v.float(), v.float()).cpu(),
                       torch.outer(torch.arange(3.0), torch.arange(3.0)))
    # complex addr keeps common_mps's refusal ('addr' is not in SUPPORTED_COMPLEX_OPS)
    c = v.to(torch.complex64)
    with pytest.raises(RuntimeError, match="'addr' is not in SUPPORTED_COMPLEX_OPS"):
        torch.addr(torch.zeros(3, 3, dtype=torch.complex64, device=DEV), c, c)
    u8 = torch.ones(1, 1, 4, 4, dtype=torch.uint8, device=DEV)
    raises_exactly(RuntimeError, "_upsample_bicubic2d_aa_out_mps only supports floating-point dtypes",
                   lambda: torch.ops.aten._upsample_bicubic2d_aa(u8, [8, 8], False, None, None))


def test_default_mode_computes_what_mps_kernels_refuse():
    F = torch.nn.functional
    xi = torch.ones(1, 2, 5, dtype=torch.int64, device=DEV)
    wi = torch.ones(3, 2, 2, dtype=torch.int64, device=DEV)
    assert F.conv1d(xi, wi).cpu().tolist() == [[[4] * 4] * 3]
    v = torch.arange(3, dtype=torch.int32, device=DEV)
    assert torch.addr(torch.zeros(3, 3, dtype=torch.int32, device=DEV), v, v).cpu().tolist() == \
        [[0, 0, 0], [0, 1, 2], [0, 2, 4]]
    x = torch.arange(70.0).reshape(1, 2, 5, 7)
    torch.testing.assert_close(F.adaptive_avg_pool2d(x.to(DEV), (2, 3)).cpu(),
                               F.adaptive_avg_pool2d(x, (2, 3)))


def test_mps_mode_runs_complex_pow_ldexp_reaches_and_refuses_complex_lu_solve(mps_mode):
    from torch_mps_ext.fidelity import _commonmps

    assert not set(_commonmps.NOT_REFUSED) & set(_commonmps.read_data())
    x = torch.tensor([1 + 1j, 2 - 1j], device=DEV)
    e = torch.tensor([2 + 0j, -1 + 0j], device=DEV)
    # ldexp (in SUPPORTED_COMPLEX_OPS) computes x * 2**e: pow.Tensor_Tensor in complex64
    torch.testing.assert_close(torch.ldexp(x, e).cpu(), torch.ldexp(x.cpu(), e.cpu()))
    A = torch.eye(2, dtype=torch.complex64, device=DEV)
    LU, piv = torch.linalg.lu_factor(A.real)
    with pytest.raises(RuntimeError, match="'linalg.lu_solve' is not in SUPPORTED_COMPLEX_OPS"):
        torch.linalg.lu_solve(LU.to(torch.complex64), piv, A)


def test_narrow_copy_out_of_range_dim_is_mps_indexerror_in_mps_mode_only():
    x = torch.ones(10, 5, 20, device=DEV)
    with pytest.raises(RuntimeError, match=r"Expected dim < static_cast<int64_t>\(self_sizes"):
        torch.narrow_copy(x, 3, 0, 0)  # CPU's kernel, as on CPU
    with mps_mode_on():
        for dim in (3, -4):
            raises_exactly(IndexError, "Dimension out of range (expected to be in range of "
                           f"[-3, 2], but got {dim})", lambda: torch.narrow_copy(x, dim, 0, 0))
        y = torch.ones(10, device=DEV)
        with pytest.raises(RuntimeError, match=r"^narrow\(\): length must be non-negative\.$"):
            torch.narrow_copy(y, 0, 0, -1)  # CPU: "start (0) + length (-1) exceeds ..."
        assert torch.equal(torch.narrow_copy(x, -2, 1, 2).cpu(), torch.ones(10, 2, 20))


def test_mps_mode_refuses_adaptive_avg_pool_sizes_mps_cannot_pool(mps_mode):
    F = torch.nn.functional
    x = torch.arange(70.0).reshape(1, 2, 5, 7)
    raises_exactly(NotImplementedError,
                   "Adaptive pool MPS: input sizes must be divisible by output sizes." + POOL_TAIL,
                   lambda: F.adaptive_avg_pool2d(x.to(DEV), (2, 3)))
    raises_exactly(NotImplementedError,
                   "Adaptive pool MPS: input sizes must be divisible by output sizes." + POOL_TAIL,
                   lambda: F.adaptive_avg_pool1d(x[0].to(DEV), 3))
    small = torch.arange(12.0).reshape(1, 2, 2, 3)
    raises_exactly(NotImplementedError,
                   "Adaptive pool MPS: output sizes must be divisible by input sizes." + POOL_TAIL,
                   lambda: F.adaptive_avg_pool2d(small.to(DEV), (5, 6)))
    raises_exactly(NotImplementedError,
                   "Adaptive pool MPS: Input height and width must both be greater than, or equal "
                   "to, or lesser than output height and width",
                   lambda: F.adaptive_avg_pool2d(small.to(DEV), (1, 6)))
    # sizes that divide pool as on CPU, forward and backward; (1, 1) is a mean
    for inp, size in ((x[..., :4, :6], (2, 3)), (small, (4, 6)), (x, (1, 1)), (x, (5, 7))):
        a = inp.contiguous().to(DEV).requires_grad_()
        out = F.adaptive_avg_pool2d(a, size)
        (grad,) = torch.autograd.grad(out.sum(), a)
        ref = inp.contiguous().requires_grad_()
        torch.testing.assert_close(out.detach().cpu(), F.adaptive_avg_pool2d(ref, size).detach())
        torch.testing.assert_close(grad.cpu(), torch.ones_like(inp) * (out.numel() / inp.numel()))


# ------------------------------------------- half precision CPU lacks (mps mode)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mps_mode_computes_half_in_float32_where_cpu_has_no_half_kernel(mps_mode, dtype):
    x = torch.linspace(0.1, 5.0, 9).to(dtype)
    ref = torch.special.bessel_j0(x.float()).to(dtype)  # float32, rounded once
    got = torch.special.bessel_j0(x.to(DEV))
    assert got.dtype == dtype and torch.equal(got.cpu(), ref)
    out = torch.full((9,), 7.0, dtype=dtype, device=DEV)
    assert torch.special.bessel_j0(x.to(DEV), out=out) is out
    assert torch.equal(out.cpu(), ref)
    # an out= tensor the kernel has to grow, and a complex result (complex32 from half)
    grown = torch.empty(0, dtype=dtype, device=DEV)
    torch.special.chebyshev_polynomial_t(x.to(DEV), 3, out=grown)
    assert grown.shape == (9,)
    assert torch.equal(grown.cpu(), torch.special.chebyshev_polynomial_t(x.float(), 3).to(dtype))
    if dtype == torch.float16:
        z = torch.polar(x.to(DEV), x.to(DEV))
        assert z.dtype == torch.complex32
        torch.testing.assert_close(z.cpu().to(torch.complex64),
                                   torch.polar(x.float(), x.float()).to(torch.complex32).to(torch.complex64))


def test_default_mode_keeps_cpus_refusal_of_half_kernels_it_lacks():
    with pytest.raises(NotImplementedError, match="not implemented for 'Half'"):
        torch.special.bessel_j0(torch.ones(3, dtype=torch.float16))
    with pytest.raises(NotImplementedError, match="not implemented for 'Half'"):
        torch.special.bessel_j0(torch.ones(3, dtype=torch.float16, device=DEV))


def test_mps_mode_keeps_the_refusal_when_float32_fails_too(mps_mode):
    # i1's backward formula has no half kernel on MPS either (common_mps XFAILLIST_GRAD)
    x = torch.ones(3, dtype=torch.float16, device=DEV, requires_grad=True)
    with pytest.raises(NotImplementedError, match="i1_backward"):
        torch.special.i1(x).sum().backward()


def test_mps_mode_computes_bool_and_integer_cases_cpu_lacks_in_float32(mps_mode):
    b = torch.tensor([True, False, True], device=DEV)
    assert torch.equal(torch.ceil(b).cpu(), b.cpu())  # CPU: "ceil_vml_cpu" not implemented for 'Bool'
    # fmod by zero is NaN in float32, True as bool
    assert torch.fmod(b, b).cpu().tolist() == [False, True, False]
    h = torch.histc(torch.arange(10, dtype=torch.int32, device=DEV), bins=4, min=0, max=9)
    assert h.dtype == torch.int32
    assert h.cpu().tolist() == torch.histc(torch.arange(10.0), bins=4, min=0, max=9).int().tolist()


def test_test_mps_runner_answers_the_sysctl_keys_test_mps_reads_at_import():
    # test_mps.py runs `sysctl -n hw.memsize` at import; the runner answers
    # it for this host, other keys go to the system's sysctl
    code = ("import subprocess\n"
            "from torch_mps_ext.fidelity import _testmps\n"
            "_testmps._sysctl_on_path()\n"
            "print(int(subprocess.check_output(['sysctl', '-n', 'hw.memsize'])))\n"
            "print(int(subprocess.check_output(['sysctl', '-n', 'hw.ncpu'])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "MPSX_REAL_PATH"})
    memsize, ncpu = (int(x) for x in out.stdout.split())
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert memsize == kb * 1024
    assert ncpu == os.cpu_count()


def test_test_mps_runner_gives_mps_ext_the_sample_inputs_torch_gives_mps():
    # op_db's sample functions pick float32/bfloat16 instead of float64 where
    # `torch.device(device).type == "mps"`; the runner widens that to mps_ext
    from torch_mps_ext.fidelity._testmps import widen_sample_branches
    assert widen_sample_branches("x = torch.device(device).type == 'mps'") == (
        "x = torch.device(device).type in (\"mps\", \"mps_ext\")", 1)
    assert widen_sample_branches("if device == 'mps:0' and x:") == (
        "if device in (\"mps:0\", \"mps_ext:0\") and x:", 1)
    code = ("import torch, torch_mps_ext\n"
            "from torch_mps_ext.fidelity import _testmps\n"
            "_testmps.prepare()\n"
            "from torch.testing._internal.common_dtype import highest_precision_float\n"
            "from torch.testing._internal.common_methods_invocations import op_db\n"
            "op = next(o for o in op_db if o.name == 'full_like')\n"
            "dts = {s.kwargs.get('dtype') for s in op.sample_inputs('mps_ext:0', torch.float32)}\n"
            "bd = next(o for o in op_db if o.name == 'block_diag')\n"
            "real = {s.input.dtype for s in bd.sample_inputs('mps_ext:0', torch.complex64)}\n"
            "print(highest_precision_float('mps_ext:0'), highest_precision_float('cpu'), torch.float64 in dts,\n"
            "      *sorted(map(str, real)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # block_diag's complex samples mix in a real tensor: float32 where the
    # device is "mps:0" (the `device == "mps:0"` branch), float64 elsewhere
    assert out.stdout.split() == ["torch.float32", "torch.float64", "False",
                                  "torch.complex64", "torch.float32"]


def test_test_mps_runner_tells_a_copy_for_another_torch_from_a_difference(tmp_path):
    # a test that needs a torch API the installed torch lacks fails on a Mac
    # with this torch too: "needs another torch", not a difference of mps_ext;
    # a missing torch.mps name is ours (torch.mps is rewritten to torch.mps_ext)
    path = tmp_path / "test_mps.py"
    path.write_text(textwrap.dedent('''\
        import torch
        from torch.testing._internal.common_utils import TestCase, run_tests

        class TestNewer(TestCase):
            def test_new_api(self):
                torch._C._an_api_from_a_later_torch()

            def test_missing_name(self):
                torch.mps.a_name_mps_ext_lacks()
        '''))
    report = tmp_path / "r.json"
    proc = run_report(["test-mps", "--report", str(report), str(path), "-q"], cwd=str(tmp_path))
    data = json.loads(report.read_text())
    assert data["classes"]["TestNewer"]["counts"] == {"needs another torch": 1,
                                                      "fails where a Mac passes": 1}
    assert proc.returncode == 1  # the missing torch.mps_ext name is a difference
    assert "needs another torch: AttributeError: module 'torch._C' has no attribute" in proc.stderr


@pytest.mark.parametrize("mode", ["off", "mps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_rand_and_randn_advance_the_generator_as_mps_does(mode, dtype):
    # torch 2.13's MPS fills uniform_/normal_ with Metal kernels that take one
    # Philox round per 4 outputs and advance the offset by ceil(n / 4)
    # (pytorch#182247, #182386; test_mps.py's test_default_mps_generator
    # expects 4 after two randn(5)). mps_ext counts the same in both modes,
    # so a seed draws the same numbers whichever mode is on.
    torch.mps_ext.set_fidelity(mode)
    try:
        g = torch.mps_ext._get_default_mps_generator()
        torch.manual_seed(230)
        assert g.get_offset() == 0
        steps = []
        for n, draw in [(5, torch.randn), (5, torch.randn), (1, torch.rand), (4, torch.rand),
                        (9, torch.randn), (17, torch.rand)]:
            before = g.get_offset()
            draw(n, device=DEV, dtype=dtype)
            steps.append(g.get_offset() - before)
        assert steps == [2, 2, 1, 1, 3, 5]
        torch.mps_ext.manual_seed(230)
        a = torch.randn(5, device=DEV, dtype=dtype)
        state = torch.mps_ext.get_rng_state()
        b = torch.randn(5, device=DEV, dtype=dtype)
        assert g.get_offset() == 4 and not torch.equal(a, b)
        torch.mps_ext.set_rng_state(state)
        assert torch.equal(torch.randn(5, device=DEV, dtype=dtype), b)
    finally:
        torch.mps_ext.set_fidelity("off")


# ------------------------------------------- scaled-dot-product attention's MPS route (mps mode)

SDPA_MATH = "aten::_scaled_dot_product_attention_math_for_mps"
SDPA_CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _sdpa_inputs(dtype=torch.float32, L=16, S=32, D=64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, D, generator=g).to(dtype) for n in (L, S, S))
    mask = torch.zeros(2, 2, L, S, dtype=dtype)
    mask[..., 0, 0] = float("-inf")  # with is_causal, row 0 sees no key
    dev = [t.to(DEV).requires_grad_(grad) for t in (q, k, v)]
    return (q, k, v, mask), (*dev, mask.to(DEV))


def test_sdpa_takes_mps_route_in_mps_mode(mps_mode):
    import torch.nn.functional as F

    _, (q, k, v, mask) = _sdpa_inputs()
    # No grad needed: MPS's kernel, whatever the SDP flags say (MPS has no
    # backend choice).
    ops, _ = _reached_ops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert ops == [SDPA_MATH], ops
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        assert _reached_ops(lambda: F.scaled_dot_product_attention(q, k, v))[0] == [SDPA_MATH]
        # Also under inference mode (where a dispatch mode sees the composite
        # itself, on every device): MPS's kernel combines is_causal with the
        # mask, ATen's composite would refuse.
        with torch.inference_mode():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert torch.equal(out[:, :, 0].cpu(), torch.zeros(2, 2, 64))
    # Inputs requiring grad, or dropout: ATen's math composite, as on a Mac.
    qg = q.detach().requires_grad_()
    ops, _ = _reached_ops(lambda: F.scaled_dot_product_attention(qg, k, v))
    assert SDPA_MATH not in ops and SDPA_CPU_FLASH not in ops, ops
    assert any("softmax" in op for op in ops) and "aten::bmm" in ops, ops
    ops, _ = _reached_ops(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    assert SDPA_MATH not in ops and SDPA_CPU_FLASH not in ops, ops
    # CPU's flash kernel, which the default mode's backend choice picks, is
    # refused when called on a Mac's device.
    with pytest.raises(NotImplementedError) as info:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    assert str(info.value) == not_implemented(SDPA_CPU_FLASH)


def test_sdpa_default_mode_keeps_cpus_route():
    import torch.nn.functional as F

    _, (q, k, v, mask) = _sdpa_inputs()
    assert _reached_ops(lambda: F.scaled_dot_product_attention(q, k, v))[0] == [SDPA_CPU_FLASH]
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        with pytest.raises(RuntimeError) as info:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert str(info.value) == ("_scaled_dot_product_attention: Explicit attn_mask should not be "
                               "set when is_causal=True")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_causal_with_mask_combines_as_mps_prefill_kernel_does(mps_mode, dtype):
    # What a Mac accepts (test_mps.py's causal_with_inf): is_causal and a mask
    # together, with the math backend; row 0 is fully masked and gives 0, as
    # CPU's flash kernel gives.
    import torch.nn.functional as F

    (q, k, v, mask), dev = _sdpa_inputs(dtype)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        got = F.scaled_dot_product_attention(*dev[:3], attn_mask=dev[3], is_causal=True).cpu()
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                          is_causal=True)
    assert got.dtype == dtype
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_sdpa_bfloat16_is_computed_as_mps_kernels_compute_it(mps_mode):
    # test_mps.py's prefill sweep (bfloat16, head dim 80, the math backend)
    # against CPU's flash kernel: a Mac's kernels compute in float32 with the
    # probabilities rounded to bfloat16 for the product with V, as CPU's flash
    # kernel does; ATen's composite (no such rounding) missed test_mps.py's
    # tolerance by 0.078 mean relative error.
    import torch.nn.functional as F

    torch.manual_seed(1729)
    q, k, v = (torch.randn(2, 4, n, 80, dtype=torch.bfloat16) for n in (16, 32, 32))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        got = F.scaled_dot_product_attention(q.to(DEV), k.to(DEV), v.to(DEV)).cpu()
    cpu_flash = F.scaled_dot_product_attention(q, k, v)
    s = q.double() @ k.double().transpose(-2, -1) * 80 ** -0.5
    e = (s - s.amax(-1, keepdim=True)).exp()
    scheme = ((e.to(torch.bfloat16).double() @ v.double()) / e.sum(-1, keepdim=True))
    assert (got == scheme.to(torch.bfloat16)).float().mean() > 0.95
    denom = cpu_flash.abs().clamp_min(1e-6)
    assert ((got - cpu_flash).abs() / denom).float().mean() < 0.05


# ------------------------------------------- MPS's own kernel checks (issue 23)

def test_structured_operators_are_named_by_the_out_variant_a_mac_reaches(mps_mode):
    # On a Mac the functional variant of a structured operator without an MPS
    # kernel runs torch's generated composite, which calls the out variant:
    # MPS's error names that (test_mps.py's test_matrix_rank / test_pinv).
    a = torch.randn(4, 4, device=DEV)
    spd = (a @ a.mT + 4 * torch.eye(4, device=DEV))
    raises_exactly(NotImplementedError, not_implemented("aten::_linalg_eigh.eigenvalues"),
                   lambda: torch.linalg.pinv(spd, hermitian=True))
    raises_exactly(NotImplementedError, not_implemented("aten::_linalg_svd.U"),
                   lambda: torch.linalg.matrix_rank(a))
    # an operator without a structured delegate keeps its own name
    raises_exactly(NotImplementedError, not_implemented("aten::linalg_eig"),
                   lambda: torch.linalg.eig(a))
    verdict = fidelity.operator_table()["aten::_linalg_svd"]
    assert fidelity.shown_name(verdict) == "aten::_linalg_svd.U"
    assert fidelity.shown_name(fidelity.operator_table()["aten::linalg_eig"]) == ""


def test_structured_operators_fallback_warning_names_the_out_variant():
    proc = run_python("""
        import warnings, torch, torch_mps_ext
        torch.mps_ext.set_fidelity("mps")
        a = torch.randn(4, 4, device="mps_ext")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = torch.linalg.matrix_rank(a)
        assert r.device.type == "mps_ext"
        print(repr([str(w.message) for w in caught]))
    """, env={"PYTORCH_ENABLE_MPS_FALLBACK": "1"})
    assert eval(proc.stdout) == [fallback_warning("aten::_linalg_svd.U")]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.uint8, torch.bool])
def test_gelu_and_mse_loss_refuse_integers_with_mps_text(mps_mode, dtype):
    # CPU refuses them too, but with NotImplementedError, which mps mode's
    # widening used to rerun in float32: MPS's kernels refuse first.
    x = torch.tensor([0, 1, 1], dtype=dtype, device=DEV)
    raises_exactly(RuntimeError, "GELU is only implemented for floating types",
                   lambda: torch.nn.GELU()(x))
    raises_exactly(RuntimeError, "GELU is only implemented for floating types",
                   lambda: torch.nn.functional.gelu(x, approximate="tanh"))
    raises_exactly(RuntimeError, "mse_loss_out_mps: only defined for floating types",
                   lambda: torch.nn.MSELoss()(x, x))
    y = torch.tensor([0.5, -1.0, 2.0], device=DEV)
    assert torch.equal(torch.nn.GELU()(y).cpu(), torch.nn.GELU()(y.cpu()))
    assert torch.equal(torch.nn.MSELoss()(y, y).cpu(), torch.tensor(0.0))


def test_uint8_bicubic_interpolation_fails_as_on_a_mac():
    # MPS looks up the Metal function upsample_bicubic2d_uchar, which its
    # library lacks; CPU (and the default mode) interpolate uint8 bicubically.
    x = torch.randint(0, 255, (1, 2, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic")
    assert torch.equal(torch.nn.functional.interpolate(x.to(DEV), scale_factor=2, mode="bicubic").cpu(), want)
    with mps_mode_on():
        raises_exactly(RuntimeError, "Failed to create function state object for: upsample_bicubic2d_uchar",
                       lambda: torch.nn.functional.interpolate(x.to(DEV), scale_factor=2, mode="bicubic"))
        # float bicubic and uint8 bilinear run on a Mac
        y = x.float().to(DEV)
        assert torch.allclose(torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic").cpu(),
                              torch.nn.functional.interpolate(x.float(), scale_factor=2, mode="bicubic"))
        assert torch.equal(torch.nn.functional.interpolate(x.to(DEV), scale_factor=2, mode="bilinear").cpu(),
                           torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear"))


def test_gelu_of_integers_keeps_cpus_error_in_default_mode():
    x = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    with pytest.raises(NotImplementedError, match="\"GeluKernelImpl\" not implemented for 'Int'"):
        torch.nn.GELU()(x)


def test_kernel_dtype_file_is_reviewed_and_current():
    from torch_mps_ext.fidelity import _commonmps

    data = _commonmps.read_kernel_data()
    assert {"aten::gelu", "aten::mse_loss"} <= set(data)
    table = fidelity.operator_table()
    for op, (dtypes, _source, text) in data.items():
        # MPS runs the operator (its own kernel, or for convolution_overrideable
        # the convolution mps_ext reaches in place of MPS's _mps_convolution)
        assert table[op].verdict in ("mps", "composite"), op
        assert dtypes and len(text.split()) >= 4, op


def test_isin_with_a_cpu_tensor_raises_mps_text(mps_mode):
    c = torch.randn(1, 4, device=DEV)
    d = torch.randn(1, 4)
    raises_exactly(RuntimeError,
                   "Expected elements.is_mps() && test_elements.is_mps(), got mps_ext:0 and cpu",
                   lambda: torch.isin(c, d))
    raises_exactly(RuntimeError,
                   "Expected elements.is_mps() && test_elements.is_mps(), got cpu and mps_ext:0",
                   lambda: torch.isin(d, c))
    assert torch.equal(torch.isin(c, c).cpu(), torch.ones(1, 4, dtype=torch.bool))


def test_conv2d_with_input_and_weight_on_different_devices_raises_mps_text(mps_mode):
    w = torch.rand(1, 3, 3, 3, device=DEV)
    raises_exactly(RuntimeError,
                   "slow_conv2d_forward_mps: input(device='cpu') and weight(device=mps_ext:0')  "
                   "must be on the same device",
                   lambda: torch.conv2d(torch.rand(1, 3, 8, 8), w))


def test_conv2d_with_a_cpu_weight_raises_atens_type_check_as_on_mps(mps_mode):
    x = torch.rand(1, 3, 8, 8, device=DEV)
    raises_exactly(RuntimeError, "Input type (MPSFloatType) and weight type (torch.FloatTensor) "
                   "should be the same", lambda: torch.conv2d(x, torch.rand(1, 3, 3, 3)))
    w = torch.rand(1, 3, 3, 3, device=DEV)
    raises_exactly(RuntimeError, "Input type (MPSFloatType) and bias type (torch.FloatTensor) "
                   "should be the same", lambda: torch.conv2d(x, w, torch.rand(1)))
    torch.testing.assert_close(torch.conv2d(x, w).cpu(), torch.conv2d(x.cpu(), w.cpu()))


def test_linear_checks_its_arguments_as_mps_does(mps_mode):
    x = torch.rand(3, 3, device=DEV)
    raises_exactly(RuntimeError, "MPS device does not support linear for non-float weights",
                   lambda: torch.nn.functional.linear(
                       x, torch.randint(-10, 10, (3, 3), dtype=torch.int8, device=DEV)))
    raises_exactly(RuntimeError, "MPS device does not support linear for non-float inputs",
                   lambda: torch.nn.functional.linear(
                       torch.ones(3, 3, dtype=torch.int32, device=DEV), x))
    raises_exactly(RuntimeError, "Tensor for argument weight is on cpu but expected on mps",
                   lambda: torch.nn.functional.linear(x, torch.rand(3, 3)))
    raises_exactly(RuntimeError, "Tensor for argument input is on cpu but expected on mps",
                   lambda: torch.nn.functional.linear(torch.rand(3, 3), x))
    lin = torch.nn.Linear(3, 2).to(DEV)
    torch.testing.assert_close(lin(x).cpu(), lin.cpu()(x.cpu()))


def test_linear_keeps_cpus_errors_in_default_mode():
    x = torch.rand(3, 3, device=DEV)
    with pytest.raises(RuntimeError, match="expected m1 and m2 to have the same dtype"):
        torch.nn.functional.linear(x, torch.ones(3, 3, dtype=torch.int8, device=DEV))


def test_out_of_range_indices_raise_accelerator_error_as_on_mps(mps_mode):
    # MPS's indexing and embedding_bag kernels find a bad index on the device
    # and report it through the stream: torch.AcceleratorError.
    x = torch.rand(10, 1, 10, device=DEV)
    raises_exactly(torch.AcceleratorError, "index 1 is out of bounds for dimension 0 with size 1",
                   lambda: x[:, [1]])
    # an index into an empty dimension is refused before any kernel, on MPS too
    empty = torch.empty(10, 0, device=DEV)
    raises_exactly(IndexError, "index is out of bounds for dimension with size 0",
                   lambda: empty[:, [0, 1]])
    weight = torch.randn(4, 2, device=DEV)
    raises_exactly(torch.AcceleratorError, "Index 2 is out of bounds: 6, range 0 to 4",
                   lambda: torch.nn.functional.embedding_bag(
                       torch.tensor([0, 1, 6], device=DEV), weight,
                       torch.tensor([0, 3], device=DEV)))
    out = torch.nn.functional.embedding_bag(torch.tensor([0, 1, 3], device=DEV), weight,
                                            torch.tensor([0, 2], device=DEV))
    torch.testing.assert_close(out.cpu(), torch.nn.functional.embedding_bag(
        torch.tensor([0, 1, 3]), weight.cpu(), torch.tensor([0, 2])))


def test_out_of_range_indices_keep_cpus_errors_in_default_mode():
    x = torch.rand(10, 1, 10, device=DEV)
    with pytest.raises(IndexError, match="index 1 is out of bounds for dimension 0 with size 1"):
        x[:, [1]]


def test_narrow_copy_checks_as_its_composite_does(mps_mode):
    t = torch.randn(10, 5, 20, device=DEV)
    raises_exactly(IndexError, "Dimension out of range (expected to be in range of [-3, 2], "
                   "but got 3)", lambda: torch.narrow_copy(t, 3, 0, 0))
    with pytest.raises(RuntimeError, match="narrow\\(\\): length must be non-negative"):
        torch.narrow_copy(torch.randn(10, device=DEV), 0, 0, -1)
    got = torch.narrow_copy(t, 1, 1, 3)
    assert got.is_contiguous() and torch.equal(got.cpu(), torch.narrow_copy(t.cpu(), 1, 1, 3))


def test_nll_loss_backward_accepts_a_float32_total_weight_as_mps_does(mps_mode):
    for dtype in (torch.float16, torch.bfloat16):
        inp = torch.rand(5, 5, device=DEV, dtype=dtype)
        label = torch.tensor([-100, -100, 3, -100, 1], device=DEV)
        grad_out = torch.tensor(1.0, device=DEV, dtype=dtype)
        total = torch.tensor(2.0, device=DEV)
        got = torch.ops.aten.nll_loss_backward(grad_out, inp, label, None, 1, -100, total)
        want = torch.ops.aten.nll_loss_backward(grad_out.cpu(), inp.cpu(), label.cpu(), None, 1,
                                                -100, total.cpu().to(dtype))
        assert got.dtype == dtype and torch.equal(got.cpu(), want)


def test_jit_trace_check_compares_in_float32_as_on_mps(mps_mode):
    # torch.jit.trace's output check converts to float64, to float32 for MPS
    # tensors (torch/jit/_trace.py): a branch line of mps_overrides.txt.
    t = torch.randn(3, 3, device=DEV)
    traced = torch.jit.trace(lambda x: torch.nonzero(x), t)
    assert torch.equal(traced(t).cpu(), torch.nonzero(t.cpu()))


def test_max_pool2d_refuses_bool_where_mps_kernel_does(mps_mode):
    # MPS's own max_pool2d kernel (for ATen's composite) refuses bool; the
    # operator the composite reaches, max_pool2d_with_indices, runs it.
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    refused = ("The operator 'aten::max_pool2d' has no MPS kernel for dtype Bool "
               "(torch.testing._internal.common_mps: "
               "UNIMPLEMENTED_XFAILLIST['nn.functional.max_pool2d'])")
    raises_exactly(RuntimeError, refused, lambda: F.max_pool2d(x.to(DEV), 2))
    with torch.inference_mode():  # below autograd too
        raises_exactly(RuntimeError, refused, lambda: torch.max_pool2d(x.to(DEV), 2))
    # (CPU has no bool kernel: computed in float32, as MPS computes it)
    values, indices = F.max_pool2d(x.to(DEV), 2, return_indices=True)
    want_v, want_i = F.max_pool2d(x.float(), 2, return_indices=True)
    assert values.dtype == torch.bool and torch.equal(values.cpu(), want_v.bool())
    assert torch.equal(indices.cpu(), want_i)
    # float pooling and its gradient, through the composite, as before
    f = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    fd = f.to(DEV).requires_grad_()
    F.max_pool2d(fd, 2).sum().backward()
    fc = f.clone().requires_grad_()
    F.max_pool2d(fc, 2).sum().backward()
    assert torch.equal(fd.grad.cpu(), fc.grad)


def test_empty_batch_batch_norm_runs_in_mps_mode(mps_mode):
    # ATen's batch_norm of an empty batch makes its (unused) statistics in
    # toAccumulateType(dtype, device): float32 on MPS, float64 here.
    x = torch.randn(0, 3, 4, device=DEV, requires_grad=True)
    w = torch.ones(3, device=DEV, requires_grad=True)
    b = torch.zeros(3, device=DEV, requires_grad=True)
    for training in (True, False):
        out = F.batch_norm(x, torch.zeros(3, device=DEV), torch.ones(3, device=DEV), w, b,
                           training=training)
        assert out.shape == (0, 3, 4) and out.dtype == torch.float32
        gw, gb = torch.autograd.grad(out.sum(), (w, b))
        assert gw.cpu().tolist() == gb.cpu().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="doesn't support float64"):  # still refused after
        torch.zeros(3, dtype=torch.float64, device=DEV)


# 40 writes into 3 elements: the last of each index is 38, 37, 39; the first 0, 6, 4.
DUPLICATES = [0, 0, 0, 0, 2, 2, 1, 0, 2, 1, 0, 1, 2, 1, 0, 2, 2, 2, 2, 2,
              0, 0, 2, 1, 2, 1, 0, 0, 2, 0, 2, 1, 1, 2, 2, 0, 2, 1, 0, 2]


def scripted_index_put(x: torch.Tensor, i: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x.index_put_((i,), v)  # TorchScript passes the indices as a generic list


def put_duplicates():
    t = torch.zeros(3, dtype=torch.long, device=DEV)
    t.index_put_((torch.tensor(DUPLICATES),), torch.arange(40, device=DEV))
    return t.cpu().tolist()


def test_index_put_with_duplicates_does_not_keep_the_last_write_in_mps_mode():
    # MPS writes in parallel: which duplicate write survives is undefined (a
    # Mac keeps another than the last); deterministic mode keeps the last.
    assert put_duplicates() == [38, 37, 39]  # default mode: CPU's order
    with mps_mode_on():
        assert put_duplicates() == [0, 6, 4]
        torch.use_deterministic_algorithms(True)
        try:
            assert put_duplicates() == [38, 37, 39]
        finally:
            torch.use_deterministic_algorithms(False)
        got = torch.jit.script(scripted_index_put)(torch.zeros(3, device=DEV), torch.tensor(DUPLICATES, device=DEV),
                       torch.arange(40.0, device=DEV))
        assert got.cpu().tolist() == [0.0, 6.0, 4.0]
        # several index tensors apart (the result's index dimensions first),
        # values broadcast: each element gets the first of its writes
        x = torch.zeros(2, 3, 4, device=DEV)
        i0, i2 = torch.tensor([[1, 1], [0, 1]]), torch.tensor([3, 3])
        x[i0, :, i2] = torch.arange(3.0, device=DEV) + 10
        x[torch.tensor([0, 0]), torch.tensor([2, 2])] = torch.tensor([[1.0], [2.0]], device=DEV)
        want = torch.zeros(2, 3, 4)
        want[1, :, 3] = want[0, :, 3] = torch.arange(3.0) + 10
        want[0, 2] = 1.0
        assert torch.equal(x.cpu(), want)
        one = torch.zeros(3, device=DEV)  # one value for every write, a CPU scalar too
        one[torch.tensor(DUPLICATES, device=DEV)] = torch.tensor(7.0)
        one[torch.tensor([2, 2], device=DEV)] = 5.0
        assert one.cpu().tolist() == [7.0, 7.0, 5.0]
        mask = torch.zeros(3, device=DEV)  # a mask writes each element once
        mask[torch.tensor([True, False, True], device=DEV)] = torch.tensor([1.0, 2.0], device=DEV)
        assert mask.cpu().tolist() == [1.0, 0.0, 2.0]


@pytest.mark.parametrize("p", [float("inf"), 2.0, 1.0])
def test_half_cdist_backward_matches_float32_in_mps_mode(mps_mode, p):
    # CPU has no half cdist: mps mode computes it in float32 as MPS does, and
    # the backward needs the float32 forward (p=inf: the elements whose
    # distance equals it), not the one rounded to half.
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 5, 3, generator=g).half(), torch.randn(4, 6, 3, generator=g).half()
    grad = torch.rand(4, 5, 6, generator=g).half()
    a, b = x1.float().requires_grad_(), x2.float().requires_grad_()
    want = torch.autograd.grad(torch.cdist(a, b, p=p), (a, b), grad.float())
    a, b = x1.to(DEV).requires_grad_(), x2.to(DEV).requires_grad_()
    got = torch.autograd.grad(torch.cdist(a, b, p=p), (a, b), grad.to(DEV))
    for g_, w in zip(got, want):
        assert g_.dtype == torch.float16
        assert torch.equal(g_.cpu(), w.half())


TIES = [3.0, 1.0, 3.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8, torch.float32])
def test_unstable_sort_orders_ties_otherwise_than_cpu_in_mps_mode(dtype):
    # MPS's sort is stable only when asked: equal elements come out in an
    # order of its own (common_mps: argsort/sort fail "undefined behaviour").
    # mps mode gives them in reverse input order; stable=True keeps CPU's.
    x = torch.tensor(TIES, dtype=dtype)
    d = x.to(DEV)
    assert torch.sort(d).indices.cpu().tolist() == [1, 3, 4, 0, 2, 5]  # default: CPU's order
    with mps_mode_on():
        values, indices = torch.sort(d)
        assert torch.equal(values.cpu(), torch.sort(x).values)
        assert indices.cpu().tolist() == [3, 1, 4, 5, 2, 0]
        assert torch.argsort(d, descending=True).cpu().tolist() == [5, 2, 0, 4, 3, 1]
        assert torch.sort(d, stable=True).indices.cpu().tolist() == [1, 3, 4, 0, 2, 5]
        assert torch.argsort(d, stable=True).cpu().tolist() == [1, 3, 4, 0, 2, 5]
        # along another dimension, and into out= tensors
        m = d.reshape(3, 2).t()  # [[3, 3, 2], [1, 1, 3]]
        assert torch.sort(m, dim=1).indices.cpu().tolist() == [[2, 1, 0], [1, 0, 2]]
        out = (torch.empty(0, dtype=dtype, device=DEV), torch.empty(0, dtype=torch.long, device=DEV))
        got = torch.sort(d, out=out)
        assert got.indices is out[1] and out[1].cpu().tolist() == [3, 1, 4, 5, 2, 0]
        assert torch.equal(out[0].cpu(), torch.sort(x).values)
        assert torch.sort(torch.tensor(5, dtype=dtype, device=DEV)).indices.item() == 0


def test_sort_backward_follows_the_ties_order_in_mps_mode(mps_mode):
    # The gradient goes back through the indices the sort gave.
    g = torch.tensor([1.0, 2.0, 1.0], device=DEV, requires_grad=True)
    (torch.sort(g).values * torch.tensor([1.0, 10.0, 100.0], device=DEV)).sum().backward()
    assert g.grad.cpu().tolist() == [10.0, 100.0, 1.0]


def test_arange_refuses_start_and_step_the_dtype_cannot_hold_in_mps_mode():
    # MPS's arange/range hand start and step to the device as scalars of the
    # result's dtype (common_mps: arange uint8 fails on a Mac); CPU wraps.
    want = torch.arange(-8.001, -4.0, dtype=torch.uint8)
    assert torch.equal(torch.arange(-8.001, -4.0, dtype=torch.uint8, device=DEV).cpu(), want)
    with mps_mode_on():
        raises_exactly(RuntimeError, "value cannot be converted to type uint8_t without overflow",
                       lambda: torch.arange(-8.001, -4.0, dtype=torch.uint8, device=DEV))
        raises_exactly(RuntimeError, "value cannot be converted to type int8_t without overflow",
                       lambda: torch.arange(0, 300, 150, dtype=torch.int8, device=DEV))
        kept = torch.full((4,), 7, dtype=torch.uint8, device=DEV)
        raises_exactly(RuntimeError, "value cannot be converted to type uint8_t without overflow",
                       lambda: torch.arange(-8.5, -4.5, out=kept))
        assert kept.cpu().tolist() == [7, 7, 7, 7]  # the refused call left the out tensor alone
        with pytest.warns(UserWarning):
            raises_exactly(RuntimeError, "value cannot be converted to type uint8_t without overflow",
                           lambda: torch.range(-8.5, -4.5, dtype=torch.uint8, device=DEV))
        # what the dtype holds runs (integer starts wrap in an unsigned dtype, as
        # Scalar's conversion allows), an empty range converts nothing, and
        # CPU's own checks come first
        assert torch.equal(torch.arange(-8, -4, dtype=torch.uint8, device=DEV).cpu(),
                           torch.arange(-8, -4, dtype=torch.uint8))
        assert torch.arange(-8.001, -8.001, dtype=torch.uint8, device=DEV).numel() == 0
        assert torch.arange(0.0, 1.0, 0.25, device=DEV).cpu().tolist() == [0.0, 0.25, 0.5, 0.75]
        with pytest.raises(RuntimeError, match="upper bound and lower bound inconsistent with step sign"):
            torch.arange(-4.5, -8.5, dtype=torch.uint8, device=DEV)
