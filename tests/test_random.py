"""Random numbers on mps_ext: the Philox generator, its Python API, and every
random operator (reproducibility, state, errors, statistics, dtypes).

Statistical thresholds are derived from the sampling distribution of each
statistic at a tail probability of about 1e-6 (normal z = 5; KS via the
Kolmogorov distribution; chi-square via the Wilson-Hilferty quantile), with
fixed seeds, so a correct generator fails none of them by chance in practice
and a wrong distribution (bias of a few sigma of these sample sizes) fails.
"""

import math
import struct

import pytest
import torch
from conftest import run_python

import torch_mps_ext  # noqa: F401

DEV = "mps_ext"
Z = 5.0  # two-sided normal quantile used for moment checks (p ~ 6e-7)


# --------------------------------------------------------------- references

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox_ref(seed, block):
    """Philox 4x32-10 written from the paper: key = seed, counter = block."""
    c = [block & MASK, (block >> 32) & MASK, 0, 0]
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for _ in range(10):
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK,
             p0 & MASK]
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c


def words_ref(seed, offset, n):
    out = []
    block = offset
    while len(out) < n:
        out.extend(philox_ref(seed, block))
        block += 1
    return out[:n]


def state_of(device=DEV):
    seed, offset = struct.unpack("<QQ", bytes(torch.mps_ext.get_rng_state(device).tolist()))
    return seed, offset


def ks_threshold(n, alpha=1e-6):
    """Critical value of the one-sample KS statistic D_n (asymptotic)."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def ks_stat(samples, cdf):
    x, _ = torch.sort(samples.double().flatten().cpu())
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


def chi2_threshold(df, z=4.753):
    """Wilson-Hilferty upper quantile of chi-square(df) at normal z (z=4.753: 1e-6)."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(observed, expected):
    observed = torch.as_tensor(observed, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return (((observed - expected) ** 2) / expected).sum().item()


def normal_cdf(x):
    return torch.special.ndtr(x)


# ------------------------------------------------------------- the engine

def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10, counter 0, key 0.
    assert torch_mps_ext._C._testing.philox_words(0, 0, 1, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                          0x9B00DBD8]


@pytest.mark.parametrize("variant", [0, 1])
def test_philox_matches_reference(variant):
    for seed, block in [(1, 0), (0xDEADBEEFCAFEF00D, 123456789), (42, 2**32 - 3)]:
        got = torch_mps_ext._C._testing.philox_words(seed, block, 70, variant)
        if got is None:
            pytest.skip("no AVX2 on this CPU")
        assert got == words_ref(seed, block, 280)


def test_isa_variants_agree_bitwise():
    if torch_mps_ext._C._testing.philox_words(0, 0, 1, 1) is None:
        pytest.skip("no AVX2 on this CPU")
    words = torch_mps_ext._C._testing.philox_words(7, 0, 1000, 0)
    a = torch_mps_ext._C._testing.normal_float_kernel(words, 0)
    b = torch_mps_ext._C._testing.normal_float_kernel(words, 1)
    assert a == b  # same bits: no FMA, same operations


def test_rand_is_philox_stream():
    torch.mps_ext.manual_seed(1234)
    x = torch.rand(37, device=DEV)
    words = words_ref(1234, 0, 37)
    expected = torch.tensor([(w >> 8) * 2.0**-24 for w in words], dtype=torch.float32)
    assert torch.equal(x.cpu(), expected)
    # double: 53 bits from a word pair
    y = torch.rand(5, device=DEV, dtype=torch.float64)
    off = math.ceil(37 / 4)
    w = words_ref(1234, off, 10)
    expected = [((w[2 * i] | (w[2 * i + 1] << 32)) >> 11) * 2.0**-53 for i in range(5)]
    assert y.cpu().tolist() == expected


def test_randn_is_box_muller_on_philox():
    torch.mps_ext.manual_seed(99)
    x = torch.randn(64, device=DEV).cpu()
    w = words_ref(99, 0, 64)
    ref = []
    for p in range(32):
        u1 = ((w[2 * p] >> 1) + 0.5) * 2.0**-31
        u2 = (w[2 * p + 1] >> 8) * 2.0**-24
        r = math.sqrt(-2 * math.log(u1))
        ref += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    assert torch.allclose(x, torch.tensor(ref, dtype=torch.float32), rtol=2e-6, atol=2e-6)


# --------------------------------------------------------- generator & API

def test_generator_objects():
    g = torch.Generator(device=DEV)
    assert g.device == torch.device(DEV, 0)
    g.manual_seed(5)
    a = torch.rand(10, device=DEV, generator=g)
    g.manual_seed(5)
    b = torch.rand(10, device=DEV, generator=g)
    assert torch.equal(a, b)
    assert g.initial_seed() == 5
    # a private generator leaves the default one alone
    before = torch.mps_ext.get_rng_state()
    torch.randn(100, device=DEV, generator=g)
    assert torch.equal(before, torch.mps_ext.get_rng_state())
    gens = torch.mps_ext.default_generators
    assert len(gens) == torch.mps_ext.device_count()
    assert gens[0].device == torch.device(DEV, 0)


def test_default_generator_under_torch_mps_name():
    g = torch.mps_ext._get_default_mps_generator()
    assert g is torch.mps_ext.default_generators[torch.mps_ext.current_device()]
    g.manual_seed(42)
    assert torch.mps_ext.initial_seed() == 42
    a = torch.randn(5, device=DEV)
    torch.mps_ext.manual_seed(42)
    assert torch.equal(torch.randn(5, device=DEV), a)
    torch.mps_ext.seed()
    assert torch.equal(g.get_state(), torch.mps_ext.get_rng_state())


def test_cpu_generator_rejected():
    g = torch.Generator()
    with pytest.raises(RuntimeError, match="Expected a 'mps_ext' device type for generator "
                                           "but found 'cpu'"):
        torch.rand(3, device=DEV, generator=g)
    with pytest.raises(RuntimeError, match="Expected a 'mps_ext' device type"):
        torch.empty(3, device=DEV).normal_(generator=g)
    with pytest.raises(RuntimeError, match="Expected a 'mps_ext' device type"):
        torch.randperm(5, device=DEV, generator=g)


def test_manual_seed_and_torch_manual_seed():
    torch.manual_seed(7)
    a = torch.randn(1000, device=DEV)
    torch.mps_ext.manual_seed(7)
    b = torch.randn(1000, device=DEV)
    assert torch.equal(a, b)
    assert torch.mps_ext.initial_seed() == 7
    torch.mps_ext.manual_seed_all(8)
    assert state_of() == (8, 0)
    torch.mps_ext.manual_seed(2**64 - 1)
    assert state_of() == (2**64 - 1, 0)


def test_seed_is_nondeterministic():
    torch.mps_ext.seed()
    s1 = torch.mps_ext.initial_seed()
    torch.mps_ext.seed_all()
    s2 = torch.mps_ext.initial_seed()
    assert s1 != s2
    assert state_of()[1] == 0


def test_state_layout_and_offsets():
    torch.mps_ext.manual_seed(0x0102030405060708)
    st = torch.mps_ext.get_rng_state()
    assert st.dtype == torch.uint8 and st.device.type == "cpu" and st.numel() == 16
    assert st[:8].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
    # documented offset increments (blocks of 4 words)
    cases = [
        (lambda: torch.rand(10, device=DEV), 3),  # 1 word/elem: ceil(10/4)
        (lambda: torch.randn(9, device=DEV), 3),  # pairs: 10 words
        (lambda: torch.rand(3, device=DEV, dtype=torch.float64), 2),  # 2 words/elem
        (lambda: torch.randn(3, device=DEV, dtype=torch.float64), 2),  # 2 pairs x 4 words
        (lambda: torch.randint(0, 5, (7,), device=DEV), 4),  # 2 words/elem
        (lambda: torch.bernoulli(torch.full((9,), 0.5, device=DEV)), 3),
        (lambda: torch.randperm(6, device=DEV), 3),  # 2 words per swap, n-1 swaps
        (lambda: torch.empty(0, device=DEV).uniform_(), 0),
        (lambda: torch.multinomial(torch.ones(2, 3, device=DEV), 2), 4),  # rows x ceil(6/4)
        (lambda: torch.multinomial(torch.ones(3, device=DEV), 5, True), 3),  # ceil(10/4)
    ]
    for fn, blocks in cases:
        before = state_of()[1]
        fn()
        assert state_of()[1] - before == blocks


def test_get_set_state_replays():
    torch.mps_ext.manual_seed(3)
    torch.rand(11, device=DEV)
    st = torch.mps_ext.get_rng_state()

    def ops():
        return [torch.rand(100, device=DEV), torch.randn(33, device=DEV, dtype=torch.float64),
                torch.randint(-5, 5, (17,), device=DEV), torch.randperm(50, device=DEV),
                torch.bernoulli(torch.full((20,), 0.3, device=DEV)),
                torch.multinomial(torch.rand(4, 6, device=DEV), 3),
                torch.nn.functional.dropout(torch.ones(40, device=DEV), 0.5),
                torch.empty(25, device=DEV).exponential_(2.0)]
    first = ops()
    torch.mps_ext.set_rng_state(st)
    second = ops()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.mps_ext.get_rng_state_all()[0].equal(torch.mps_ext.get_rng_state())
    torch.mps_ext.set_rng_state_all([st])
    assert torch.equal(torch.mps_ext.get_rng_state(), st)


def test_set_state_errors():
    with pytest.raises(TypeError) as e:
        torch.mps_ext.set_rng_state(torch.zeros(16, dtype=torch.int32))
    assert str(e.value) == "RNG state must be a torch.ByteTensor"
    with pytest.raises(TypeError) as e:
        torch.mps_ext.set_rng_state([0] * 16)
    assert str(e.value) == "RNG state must be a torch.ByteTensor"
    with pytest.raises(TypeError) as e:
        torch.mps_ext.set_rng_state(torch.zeros(16, dtype=torch.uint8, device=DEV))
    assert str(e.value) == "RNG state must be a torch.ByteTensor"
    with pytest.raises(RuntimeError) as e:
        torch.mps_ext.set_rng_state(torch.zeros(15, dtype=torch.uint8))
    assert str(e.value) == "RNG state is wrong size"
    # also through torch.Generator.set_state
    with pytest.raises(RuntimeError, match="RNG state is wrong size"):
        torch.Generator(device=DEV).set_state(torch.zeros(17, dtype=torch.uint8))


def test_clone_state_graphsafe_and_fork_rng():
    g = torch.Generator(device=DEV).manual_seed(11)
    torch.rand(5, device=DEV, generator=g)
    c = g.clone_state()
    assert c.device == g.device
    a = torch.rand(20, device=DEV, generator=g)
    b = torch.rand(20, device=DEV, generator=c)
    assert torch.equal(a, b)
    snap = g.graphsafe_get_state()
    x = torch.randn(20, device=DEV, generator=g)
    g.graphsafe_set_state(snap)
    y = torch.randn(20, device=DEV, generator=g)
    assert torch.equal(x, y)

    torch.manual_seed(0)
    before = torch.mps_ext.get_rng_state()
    with torch.random.fork_rng(device_type=DEV):
        torch.mps_ext.manual_seed(123)
        torch.rand(100, device=DEV)
    assert torch.equal(before, torch.mps_ext.get_rng_state())


def test_thread_count_does_not_change_results():
    n = 1_000_003  # many chunks, odd size
    results = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.mps_ext.manual_seed(2024)
            results[threads] = [
                torch.rand(n, device=DEV), torch.randn(n, device=DEV),
                torch.randn(n // 3, device=DEV, dtype=torch.float64),
                torch.randint(0, 1000, (n,), device=DEV),
                torch.rand(n, device=DEV, dtype=torch.bfloat16),
                torch.bernoulli(torch.full((n,), 0.25, device=DEV)),
                torch.empty(n, device=DEV).exponential_(),
                torch.multinomial(torch.rand(300, 50, device=DEV), 10),
            ]
    finally:
        torch.set_num_threads(old)
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)


DIGEST_CODE = """
import hashlib
import torch
import torch_mps_ext


def digest(dev):
    torch.mps_ext.manual_seed_all(77)
    with torch.mps_ext.device(dev):
        outs = [torch.rand(100003, device=dev), torch.randn(100003, device=dev),
                torch.rand(1001, device=dev, dtype=torch.half),
                torch.randn(1001, device=dev, dtype=torch.bfloat16),
                torch.empty(999, device=dev).log_normal_(),
                torch.randint(0, 7, (5000,), device=dev), torch.randperm(999, device=dev),
                torch.multinomial(torch.rand(20, 30, device=dev), 5, True),
                torch.nn.functional.dropout(torch.ones(3000, device=dev), 0.4)]
    return hashlib.sha256(b"".join(
        (o.view(torch.int16) if o.dtype in (torch.half, torch.bfloat16) else o)
        .cpu().numpy().tobytes() for o in outs)).hexdigest()
"""


def test_devices_threads_and_isa_builds_agree():
    """One seed, same tensors: here (current thread count, the kernels this
    CPU picks, device 0) and in a process with 2 devices, 1 thread and the
    baseline kernels forced, on both of its devices."""
    code = DIGEST_CODE + """
assert torch.mps_ext.device_count() == 2
g = torch.Generator(device="mps_ext:1")
assert g.device == torch.device("mps_ext:1")
# per-device default generators are independent
torch.mps_ext.manual_seed_all(1)
torch.rand(10, device="mps_ext:0")
assert torch.mps_ext.get_rng_state(1)[8:].sum() == 0
assert torch.mps_ext.get_rng_state("mps_ext:0")[8:].sum() > 0
assert len(torch.mps_ext.get_rng_state_all()) == 2
print(digest("mps_ext:0"), digest("mps_ext:1"), torch.get_num_threads(),
      torch_mps_ext._C._rng_kernels_isa())
"""
    d0, d1, threads, isa = run_python(code, env={"TORCH_MPS_EXT_DEVICE_COUNT": "2",
                                                 "OMP_NUM_THREADS": "1",
                                                 "TORCH_MPS_EXT_RNG_BASELINE": "1"}
                                      ).stdout.split()
    assert (threads, isa) == ("1", "baseline")
    scope = {}
    exec(DIGEST_CODE, scope)
    assert d0 == d1 == scope["digest"]("mps_ext:0")
    if torch_mps_ext._C._testing.philox_words(0, 0, 1, 1) is not None:
        assert torch_mps_ext._C._rng_kernels_isa() == "avx2"


def test_noncontiguous_output_uses_logical_order():
    torch.manual_seed(0)
    a = torch.empty(6, 4, device=DEV).uniform_()
    torch.manual_seed(0)
    b = torch.empty(4, 6, device=DEV).t().uniform_()
    assert not b.is_contiguous()
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        torch.zeros(1, device=DEV).expand(3).uniform_()


# ------------------------------------------------------- errors as on CPU

ERROR_CASES = {
    "uniform_bounds": lambda d: torch.empty(3, device=d).uniform_(2, 1),
    "uniform_half_range": lambda d: torch.empty(3, device=d, dtype=torch.half).uniform_(-7e4, 1),
    "uniform_int": lambda d: torch.empty(3, device=d, dtype=torch.int32).uniform_(),
    "normal_std": lambda d: torch.empty(3, device=d).normal_(0, -1),
    "normal_tensor_std": lambda d: torch.normal(torch.zeros(3, device=d),
                                                torch.tensor([1., -1., 1.], device=d)),
    "normal_float_std": lambda d: torch.normal(torch.zeros(3, device=d), -1.),
    "normal_complex_std": lambda d: torch.normal(0., torch.tensor([1., 1j], device=d)),
    "normal_broadcast": lambda d: torch.normal(torch.zeros(3, device=d), torch.ones(2, device=d)),
    "log_normal_std": lambda d: torch.empty(3, device=d).log_normal_(0, 0),
    "exponential_lambda": lambda d: torch.empty(3, device=d).exponential_(0),
    "exponential_int": lambda d: torch.empty(3, device=d, dtype=torch.int32).exponential_(),
    "geometric_p": lambda d: torch.empty(3, device=d).geometric_(1.5),
    "cauchy_sigma": lambda d: torch.empty(3, device=d).cauchy_(0, 0),
    "cauchy_int": lambda d: torch.empty(3, device=d, dtype=torch.int32).cauchy_(),
    "random_from_to": lambda d: torch.empty(3, device=d).random_(5, 5),
    "random_bounds": lambda d: torch.empty(3, device=d, dtype=torch.uint8).random_(-1, 5),
    "random_full_int32": lambda d: torch.empty(3, device=d, dtype=torch.int32).random_(-2**63, None),
    "bernoulli_p": lambda d: torch.empty(3, device=d).bernoulli_(1.5),
    "bernoulli_tensor_p": lambda d: torch.empty(3, device=d).bernoulli_(
        torch.tensor([0.5, 1.5, 0.2], device=d)),
    "randperm_half": lambda d: torch.randperm(3000, device=d, dtype=torch.half),
    "multinomial_int": lambda d: torch.multinomial(torch.tensor([1, 2], device=d), 1),
    "multinomial_dim": lambda d: torch.multinomial(torch.ones(2, 2, 2, device=d), 1),
    "multinomial_zero": lambda d: torch.multinomial(torch.ones(2, device=d), 0),
    "multinomial_too_many": lambda d: torch.multinomial(torch.ones(2, device=d), 3),
    "multinomial_negative": lambda d: torch.multinomial(torch.tensor([1., -1.], device=d), 2, True),
    "multinomial_inf": lambda d: torch.multinomial(torch.tensor([1., math.inf], device=d), 2, True),
    "multinomial_sum0": lambda d: torch.multinomial(torch.tensor([0., 0.], device=d), 2, True),
    "multinomial_race_neg": lambda d: torch.multinomial(torch.tensor([1., -1.], device=d), 1),
    "multinomial_race_sum0": lambda d: torch.multinomial(torch.tensor([0., 0.], device=d), 1),
    "multinomial_out_dtype": lambda d: torch.multinomial(torch.ones(2, device=d), 2,
                                                         out=torch.empty(2, device=d)),
    "dropout_p": lambda d: torch.native_dropout(torch.ones(3, device=d), 1.5, True),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_errors_match_cpu(name):
    fn = ERROR_CASES[name]
    with pytest.raises(Exception) as cpu_err:
        fn("cpu")
    with pytest.raises(Exception) as dev_err:
        fn(DEV)
    assert type(dev_err.value) is type(cpu_err.value)
    # kernel names in CPU's messages carry a "_cpu" suffix; ours do not
    first = str(cpu_err.value).splitlines()[0].replace("_cpu ", " ")
    if "not implemented for" in first:
        assert "not implemented for" in str(dev_err.value)
    else:
        assert str(dev_err.value).splitlines()[0] == first


# ----------------------------------------------------------- statistics

N = 1 << 20


def test_uniform_ks_and_bounds():
    g = torch.Generator(device=DEV).manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        x = torch.empty(N, device=DEV, dtype=dtype).uniform_(-2, 3, generator=g).cpu()
        assert x.min() >= -2 and x.max() < 3
        d = ks_stat(x, lambda t: (t + 2) / 5)
        assert d < ks_threshold(N), (dtype, d)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(N, device=DEV, dtype=dtype).uniform_(0.25, 0.3, generator=g).cpu()
        assert x.min() >= 0.25 and x.max() < 0.3  # [from, to) after rounding, too
        mean = x.double().mean().item()
        # mean of the rounded values: within rounding (half ulp) plus 5 sigma
        ulp = 2.0**-10 * 0.25 if dtype == torch.float16 else 2.0**-7 * 0.25
        assert abs(mean - 0.275) < Z * 0.05 / math.sqrt(12 * N) + ulp


def test_normal_ks_moments_and_tails():
    g = torch.Generator(device=DEV).manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(N, device=DEV, dtype=dtype, generator=g).cpu().double()
        assert torch.isfinite(x).all()
        assert abs(x.mean().item()) < Z / math.sqrt(N)
        assert abs(x.var().item() - 1) < Z * math.sqrt(2 / N)
        assert ks_stat(x, normal_cdf) < ks_threshold(N), dtype
        # tail mass beyond 3 sigma: binomial count
        p3 = 2 * (1 - normal_cdf(torch.tensor(3.0, dtype=torch.float64)).item())
        k = (x.abs() > 3).sum().item()
        assert abs(k - N * p3) < Z * math.sqrt(N * p3 * (1 - p3))
    y = torch.empty(N, device=DEV).normal_(5, 0.5, generator=g).cpu().double()
    assert ks_stat(y, lambda t: normal_cdf((t - 5) / 0.5)) < ks_threshold(N)
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.randn(N, device=DEV, dtype=dtype, generator=g).cpu().double()
        assert abs(h.mean().item()) < Z / math.sqrt(N) + 2e-3
        assert abs(h.std().item() - 1) < 0.01


def test_complex_random():
    g = torch.Generator(device=DEV).manual_seed(3)
    z = torch.randn(N // 2, device=DEV, dtype=torch.complex64, generator=g).cpu()
    n = z.numel()
    # each part has variance 1/2
    for part in (z.real.double(), z.imag.double()):
        assert abs(part.var().item() - 0.5) < Z * 0.5 * math.sqrt(2 / n)
    u = torch.rand(1000, device=DEV, dtype=torch.complex128, generator=g).cpu()
    assert (u.real >= 0).all() and (u.real < 1).all() and (u.imag >= 0).all()


def test_exponential_ks():
    g = torch.Generator(device=DEV).manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        x = torch.empty(N, device=DEV, dtype=dtype).exponential_(2.5, generator=g).cpu().double()
        assert x.min() > 0
        assert ks_stat(x, lambda t: 1 - torch.exp(-2.5 * t)) < ks_threshold(N)
    h = torch.empty(N, device=DEV, dtype=torch.half).exponential_(1e4, generator=g).cpu()
    assert h.min() > 0  # no zeros even where the dtype underflows


def test_geometric_chi_square():
    g = torch.Generator(device=DEV).manual_seed(5)
    p = 0.3
    for dtype in (torch.float32, torch.int64, torch.int16):
        x = torch.empty(N, device=DEV, dtype=dtype).geometric_(p, generator=g).cpu().long()
        assert x.min() >= 1
        kmax = 20
        counts = torch.bincount(x.clamp(max=kmax), minlength=kmax + 1)[1:].double()
        probs = [(1 - p) ** (k - 1) * p for k in range(1, kmax)]
        probs.append((1 - p) ** (kmax - 1))  # tail lumped into kmax
        assert chi2(counts, [N * q for q in probs]) < chi2_threshold(kmax - 1), dtype


def test_log_normal_and_cauchy_ks():
    g = torch.Generator(device=DEV).manual_seed(6)
    x = torch.empty(N, device=DEV, dtype=torch.float64).log_normal_(1.0, 0.5, generator=g).cpu()
    assert x.min() > 0
    assert ks_stat(torch.log(x), lambda t: normal_cdf((t - 1.0) / 0.5)) < ks_threshold(N)
    for dtype in (torch.float32, torch.float64):
        c = torch.empty(N, device=DEV, dtype=dtype).cauchy_(1.0, 2.0, generator=g).cpu().double()
        assert torch.isfinite(c).all()
        cdf = lambda t: 0.5 + torch.atan((t - 1.0) / 2.0) / math.pi  # noqa: E731
        assert ks_stat(c, cdf) < ks_threshold(N), dtype


def test_random_ranges_and_frequencies():
    g = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randint(-3, 7, (N,), device=DEV, generator=g).cpu()
    assert x.dtype == torch.int64 and x.min() == -3 and x.max() == 6
    counts = torch.bincount(x + 3, minlength=10)
    assert chi2(counts, [N / 10] * 10) < chi2_threshold(9)
    # random_() without bounds: [0, max] for integers, [0, 2^digits] for floats
    for dtype, hi in [(torch.int8, 127), (torch.uint8, 255), (torch.int16, 2**15 - 1),
                      (torch.int32, 2**31 - 1), (torch.float16, 2**11), (torch.bfloat16, 2**8)]:
        y = torch.empty(N, device=DEV, dtype=dtype).random_(generator=g).cpu().double()
        assert y.min() >= 0 and y.max() <= hi
        assert abs(y.mean().item() - hi / 2) < Z * hi / math.sqrt(12 * N) + 0.5, dtype
        assert (y == torch.round(y)).all()
    b = torch.empty(N, device=DEV, dtype=torch.bool).random_(generator=g).cpu()
    k = b.sum().item()
    assert abs(k - N / 2) < Z * math.sqrt(N / 4)
    # full 64-bit range: sign bit is a fair coin, values span both halves
    full = torch.empty(N, device=DEV, dtype=torch.int64).random_(-2**63, None, generator=g).cpu()
    assert abs((full < 0).sum().item() - N / 2) < Z * math.sqrt(N / 4)
    # unsigned and large ranges
    u = torch.empty(1000, device=DEV, dtype=torch.uint32).random_(0, 2**32 - 1, generator=g).cpu()
    assert u.long().max() > 2**31
    big = torch.randint(0, 2**62, (N,), device=DEV, generator=g).cpu().double()
    assert abs(big.mean().item() / 2**62 - 0.5) < Z / math.sqrt(12 * N)


def test_bernoulli_scalar_and_tensor_p():
    g = torch.Generator(device=DEV).manual_seed(8)
    for dtype in (torch.float32, torch.bool, torch.int64, torch.float16):
        x = torch.empty(N, device=DEV, dtype=dtype).bernoulli_(0.3, generator=g).cpu()
        assert set(x.double().unique().tolist()) <= {0.0, 1.0}
        k = x.double().sum().item()
        assert abs(k - 0.3 * N) < Z * math.sqrt(N * 0.3 * 0.7), dtype
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], device=DEV).repeat(N // 5)
    y = torch.bernoulli(p, generator=g).cpu().view(-1, 5)
    assert (y[:, 0] == 0).all() and (y[:, 4] == 1).all()
    rows = y.shape[0]
    for j, q in [(1, 0.1), (2, 0.5), (3, 0.9)]:
        assert abs(y[:, j].sum().item() - rows * q) < Z * math.sqrt(rows * q * (1 - q))
    # broadcast p into self; p of another floating dtype
    z = torch.empty(4, 3, device=DEV).bernoulli_(torch.tensor([0.0, 1.0, 0.0], device=DEV,
                                                               dtype=torch.float64))
    assert z.cpu().tolist() == [[0.0, 1.0, 0.0]] * 4


def test_randperm():
    g = torch.Generator(device=DEV).manual_seed(9)
    for n in (0, 1, 2, 1000, 100003):
        p = torch.randperm(n, device=DEV, generator=g)
        assert p.dtype == torch.int64 and p.device.type == DEV
        assert torch.equal(torch.sort(p.cpu()).values, torch.arange(n))
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.float32, torch.float16,
                  torch.bfloat16, torch.float64):
        p = torch.randperm(200, device=DEV, dtype=dtype, generator=g).cpu()
        assert torch.equal(torch.sort(p.double()).values, torch.arange(200, dtype=torch.float64))
    # all 6 permutations of 3 equally likely
    trials = 6000
    counts = {}
    for _ in range(trials):
        key = tuple(torch.randperm(3, device=DEV, generator=g).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    assert chi2(list(counts.values()), [trials / 6] * 6) < chi2_threshold(5)
    out = torch.empty(0, device=DEV, dtype=torch.int64)
    torch.randperm(10, out=out, generator=g)
    assert sorted(out.cpu().tolist()) == list(range(10))


def test_multinomial_with_replacement():
    g = torch.Generator(device=DEV).manual_seed(10)
    probs = torch.tensor([0.1, 0.0, 0.3, 0.6], device=DEV)
    x = torch.multinomial(probs * 7, N, replacement=True, generator=g).cpu()  # unnormalized
    counts = torch.bincount(x, minlength=4)
    assert counts[1] == 0
    keep = [0, 2, 3]
    assert chi2(counts[keep], [N * 0.1, N * 0.3, N * 0.6]) < chi2_threshold(2)
    rows = torch.multinomial(torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEV), 5, True)
    assert rows.cpu().tolist() == [[0] * 5, [1] * 5]


def test_multinomial_without_replacement():
    g = torch.Generator(device=DEV).manual_seed(11)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    rows = 60000
    x = torch.multinomial(p.to(DEV).expand(rows, 3).contiguous(), 2, generator=g).cpu()
    assert (x[:, 0] != x[:, 1]).all()
    # ordered pairs (i, j): probability p_i p_j / (1 - p_i)
    observed, expected = [], []
    for i in range(3):
        for j in range(3):
            if i != j:
                observed.append(((x[:, 0] == i) & (x[:, 1] == j)).sum().item())
                expected.append(rows * (p[i] * p[j] / (1 - p[i])).item())
    assert chi2(observed, expected) < chi2_threshold(5)
    full = torch.multinomial(torch.rand(5, 10, device=DEV), 10, generator=g).cpu()
    for row in full:
        assert sorted(row.tolist()) == list(range(10))
    # zero-probability categories come last
    z = torch.multinomial(torch.tensor([0.0, 1.0, 0.0, 2.0], device=DEV), 2, generator=g)
    assert sorted(z.cpu().tolist()) == [1, 3]
    h = torch.multinomial(torch.ones(4, device=DEV, dtype=torch.half), 2, generator=g)
    assert h.dtype == torch.int64 and h.shape == (2,)
    out = torch.empty(0, device=DEV, dtype=torch.int64)
    torch.multinomial(torch.ones(3, 4, device=DEV), 2, out=out)
    assert out.shape == (3, 2)


def test_dropout():
    torch.mps_ext.manual_seed(12)
    p = 0.3
    x = torch.randn(N, device=DEV)
    out, mask = torch.native_dropout(x, p, True)
    assert mask.dtype == torch.bool
    k = (~mask).sum().item()
    assert abs(k - p * N) < Z * math.sqrt(N * p * (1 - p))
    xc, oc, mc = x.cpu(), out.cpu(), mask.cpu()
    assert torch.equal(oc, xc * mc / (1 - p)) or torch.allclose(oc, xc * mc / (1 - p), rtol=1e-6)
    assert torch.equal(oc[~mc], torch.zeros_like(oc[~mc]))
    e_out, e_mask = torch.native_dropout(x, p, False)
    assert torch.equal(e_out, x) and e_mask.all()
    # nn.functional.dropout / nn.Dropout and autograd
    w = torch.ones(1000, device=DEV, requires_grad=True)
    y = torch.nn.functional.dropout(w, 0.5, training=True)
    y.sum().backward()
    assert torch.equal(w.grad.cpu(), y.detach().cpu())
    assert set(y.detach().cpu().unique().tolist()) <= {0.0, 2.0}
    torch.mps_ext.manual_seed(1)
    a = torch.nn.Dropout(0.5)(torch.ones(100, device=DEV))
    torch.mps_ext.manual_seed(1)
    b = torch.nn.Dropout(0.5)(torch.ones(100, device=DEV))
    assert torch.equal(a, b)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        o, m = torch.native_dropout(torch.ones(100, device=DEV, dtype=dtype), 0.5, True)
        assert o.dtype == dtype and set(o.cpu().double().unique().tolist()) <= {0.0, 2.0}
    o, m = torch.native_dropout(torch.ones(10, device=DEV), 1.0, True)
    assert (o.cpu() == 0).all() and not m.any()


def test_normal_overloads():
    g = torch.Generator(device=DEV).manual_seed(13)
    rows = 200000
    mean = torch.tensor([0.0, 10.0, -3.0], device=DEV)
    std = torch.tensor([1.0, 0.1, 2.0], device=DEV)
    x = torch.normal(mean.expand(rows, 3), std, generator=g).cpu().double()
    for j in range(3):
        m, s = mean[j].item(), std[j].item()
        assert abs(x[:, j].mean().item() - m) < Z * s / math.sqrt(rows)
        assert abs(x[:, j].var().item() / s**2 - 1) < Z * math.sqrt(2 / rows)
    y = torch.normal(mean, 2.0, generator=g)
    assert y.shape == (3,) and y.device.type == DEV
    z = torch.normal(1.0, std, generator=g)
    assert z.shape == (3,)
    w = torch.normal(2.0, 3.0, size=(rows,), device=DEV, generator=g).cpu().double()
    assert abs(w.mean().item() - 2.0) < Z * 3.0 / math.sqrt(rows)
    out = torch.empty(3, device=DEV)
    torch.normal(mean, std, out=out)
    assert out.shape == (3,)


def test_like_and_factory_variants():
    torch.mps_ext.manual_seed(14)
    base = torch.empty(5, 7, device=DEV, dtype=torch.float64)
    for fn in (torch.rand_like, torch.randn_like):
        r = fn(base)
        assert r.shape == base.shape and r.dtype == base.dtype and r.device == base.device
    r = torch.randint_like(base, 3, 9)
    assert r.min() >= 3 and r.max() < 9
    r = torch.randint(10, (100,), device=DEV, dtype=torch.int8)
    assert r.dtype == torch.int8 and r.min() >= 0 and r.max() < 10
    r = torch.randint(0, 2, (100,), device=DEV, dtype=torch.bool)
    assert r.dtype == torch.bool


# Every dtype CPU accepts for an op works on mps_ext; CPU's refusals are ours.
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
          torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
          torch.uint16, torch.uint32, torch.uint64]
DTYPE_OPS = {
    "uniform_": lambda t: t.uniform_(),
    "normal_": lambda t: t.normal_(),
    "log_normal_": lambda t: t.log_normal_(),
    "exponential_": lambda t: t.exponential_(),
    "geometric_": lambda t: t.geometric_(0.5),
    "cauchy_": lambda t: t.cauchy_(),
    "random_": lambda t: t.random_(),
    "random_to": lambda t: t.random_(0, 2),
    "bernoulli_": lambda t: t.bernoulli_(0.5),
    "bernoulli_tensor": lambda t: t.bernoulli_(torch.full(t.shape, 0.5, device=t.device)),
    "randperm": lambda t: torch.randperm(8, dtype=t.dtype, device=t.device),
}


@pytest.mark.parametrize("op", sorted(DTYPE_OPS))
def test_dtype_support_matches_cpu(op):
    fn = DTYPE_OPS[op]
    for dtype in DTYPES:
        try:
            fn(torch.zeros(8, dtype=dtype))
            cpu_ok = True
        except Exception:
            cpu_ok = False
        t = torch.zeros(8, dtype=dtype, device=DEV)
        if cpu_ok:
            r = fn(t)
            assert r.dtype == dtype and r.device.type == DEV, (op, dtype)
        else:
            with pytest.raises(Exception):
                fn(t)


def test_cpu_derived_ops_follow_device_generator():
    """poisson, binomial, gamma, dirichlet, rrelu: reproducible under the
    device seed, accept mps_ext generators, leave the CPU generator alone."""
    def ops(g=None):
        rate = torch.full((N // 8,), 4.0, device=DEV)
        return [torch.poisson(rate, generator=g),
                torch.binomial(torch.full((1000,), 10.0, device=DEV),
                               torch.full((1000,), 0.3, device=DEV), generator=g),
                torch._standard_gamma(torch.full((1000,), 2.0, device=DEV), generator=g),
                torch._sample_dirichlet(torch.ones(10, 3, device=DEV), generator=g),
                torch.ops.aten.rrelu_with_noise(torch.full((100,), -1.0, device=DEV),
                                                torch.empty(100, device=DEV), training=True,
                                                generator=g)]
    torch.manual_seed(15)  # seeds CPU and mps_ext
    cpu_state = torch.get_rng_state()
    a = ops()
    assert torch.equal(torch.get_rng_state(), cpu_state)
    torch.mps_ext.manual_seed(15)
    b = ops()
    for x, y in zip(a, b):
        assert x.device.type == DEV and torch.equal(x, y)
    g = torch.Generator(device=DEV).manual_seed(1)
    c = ops(g)
    assert not torch.equal(c[0], a[0])
    pois = a[0].cpu().double()
    n = pois.numel()
    assert abs(pois.mean().item() - 4.0) < Z * math.sqrt(4.0 / n)
    assert torch.allclose(a[3].sum(-1).cpu(), torch.ones(10))
    r = a[4].cpu()
    assert (r <= -0.125 + 1e-6).all() and (r >= -1 / 3 - 1e-6).all()
    with pytest.raises(RuntimeError, match="Expected a 'mps_ext' device type"):
        torch.poisson(torch.ones(3, device=DEV), generator=torch.Generator())


def test_torch_seed_and_checkpoint_integration():
    s = torch.seed()  # torch reseeds custom devices through manual_seed_all
    assert torch.mps_ext.initial_seed() == s
    g = torch.Generator("mps_ext")
    assert g.device.type == DEV
    # what activation checkpointing does to replay dropout: save and restore
    # the device RNG state of the inputs' devices (full checkpoint() also
    # needs the autocast module functions, tested with autocast)
    from torch.utils.checkpoint import get_device_states, set_device_states
    x = torch.randn(8, 16, device=DEV)
    devices, states = get_device_states(x)
    assert devices == [0] and len(states) == 1
    ref = torch.nn.functional.dropout(x, 0.5, training=True)
    set_device_states(devices, states, device_type=DEV)
    again = torch.nn.functional.dropout(x, 0.5, training=True)
    assert torch.equal(ref, again)


def test_every_generator_op_has_a_device_kernel():
    """No aten op that takes a Generator reaches CPU's kernel through the
    fallback (it would draw from CPU's mt19937 generator): each one with a CPU
    kernel has an mps_ext kernel from the Random*.cpp files; the others
    decompose (composite) into ops that do."""
    missing = []
    for s in torch._C._jit_get_all_schemas():
        if not s.name.startswith("aten::"):
            continue
        if not any("Generator" in str(a.type) for a in s.arguments):
            continue
        full = s.name + ("." + s.overload_name if s.overload_name else "")
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(full, "CPU"):
                continue
        except RuntimeError:  # a TorchScript builtin, not a dispatcher op
            continue
        dump = [line for line in torch._C._dispatch_dump(full).splitlines()
                if line.startswith("PrivateUse1:")]
        if not dump or "csrc/aten/Random" not in dump[0]:
            missing.append(full)
    assert missing == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_uniform_draws_that_round_up_to_the_bound_stay_below_it(dtype):
    # float32 draws in [1 - 2**-12, 1) round to 1.0 in float16: they take the
    # largest value below 1, not `from` (Dirichlet(torch.rand(n)) must not see
    # a zero concentration 1 time in 4096, which MPS's kernel never gives)
    torch.mps_ext.manual_seed(0)
    x = torch.rand(1_000_000, dtype=dtype, device=DEV).cpu().float()
    top = 1.0 - torch.finfo(dtype).eps / 2
    assert x.max().item() == top and (x < 1).all()
    assert (x == 0).sum().item() <= 2
    assert (x == top).sum().item() > 100  # the rounded-up draws land here
    torch.distributions.Dirichlet(torch.rand(10_000, dtype=dtype, device=DEV))  # validates > 0
    y = torch.empty(100_000, dtype=dtype, device=DEV).uniform_(-2.0, -1.0).cpu().float()
    assert y.min().item() >= -2.0 and y.max().item() < -1.0
