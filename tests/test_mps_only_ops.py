"""What Apple's MPS backend computes and CPU does not (issue 23, items 3-4;
csrc/aten/MpsOnlyOps.cpp, docs/fidelity.md): MPS's int4 weight packing and
matmul with MPS's layout, Dirichlet sampling in float16/bfloat16, mish's
float16 backward computed as CPU's kernel computes it, and MPS's attention
operator _scaled_dot_product_attention_math_for_mps (csrc/aten/Attention.cpp). Each is checked
against a float32/float64 reference computed here, in both modes."""

import pytest
import torch
import torch.nn.functional as F

import torch_mps_ext  # noqa: F401

DEV = "mps_ext"


@pytest.fixture(params=["off", "mps"])
def mode(request):
    torch.mps_ext.set_fidelity(request.param)
    try:
        yield request.param
    finally:
        torch.mps_ext.set_fidelity("off")


# ------------------------------------------------------------- int4 weights

def quantize(N, K, group, dtype, seed=0):
    """q (int, 0..15) [N, K], its MPS-layout uint8 packing [N, K/2] (high
    nibble first, as torch's _group_quantize_tensor builds it off CPU), and
    qScaleAndZeros [K/group, N, 2] in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    scales = (torch.rand(K // group, N, generator=g) * 0.1 + 0.01).to(dtype)
    zeros = (torch.randn(K // group, N, generator=g) * 0.1).to(dtype)
    return q, packed, torch.stack([scales, zeros], dim=2).contiguous()


def reference(a, q, sz, group):
    """float64: A @ W.T with W[n, k] = scale * q + (zero - 8 * scale), the
    zero term rounded in A's dtype as MPS computes it."""
    scale = sz[..., 0]
    offset = (sz[..., 1] - sz[..., 0] * torch.tensor(8, dtype=sz.dtype)).double()
    k_group = torch.arange(q.shape[1]) // group
    w = scale.double()[k_group].T * q.double() + offset[k_group].T
    return a.double() @ w.T


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_int4_packing_has_mps_shape_and_layout(mode, inner_k_tiles):
    N, K = 16, 256
    q, packed, _ = quantize(N, K, 32, torch.float32)
    out = torch._convert_weight_to_int4pack(packed.to(DEV), inner_k_tiles)
    assert out.device.type == DEV and out.dtype == torch.int32
    assert out.shape == (N // 8, K // (16 * inner_k_tiles), 32, inner_k_tiles // 2)
    raw = out.cpu().contiguous().view(torch.uint8).view(N, K // 2)
    # each byte: q[n][2j] in the low nibble, q[n][2j+1] in the high one
    assert torch.equal((raw & 0xF).to(torch.int32), q[:, ::2])
    assert torch.equal((raw >> 4).to(torch.int32), q[:, 1::2])


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-2),
                                        (torch.bfloat16, 2e-1)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_matmul_matches_a_float64_reference(mode, dtype, atol, group):
    M, N, K = 3, 32, 512
    q, packed, sz = quantize(N, K, group, dtype, seed=group)
    a = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    b = torch._convert_weight_to_int4pack(packed.to(DEV), 2)
    out = torch._weight_int4pack_mm(a.to(DEV), b, group, sz.to(DEV))
    assert out.dtype == dtype and out.shape == (M, N) and out.device.type == DEV
    ref = reference(a, q, sz, group)
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=1e-2 if dtype != torch.float32 else 1e-5)


def test_int4_matmul_as_torchs_quantizer_builds_it():
    # The path torch's own MPS tests take: _group_quantize_tensor off CPU,
    # then pack and multiply; against the float32 matmul of the weight.
    from torch.testing._internal.common_quantization import _group_quantize_tensor

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))  # [K, N]
    a = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    q, sz = _group_quantize_tensor(w.to(DEV), n_bit=4, q_group_size=32)
    b = torch._convert_weight_to_int4pack(q, 2)
    out = torch._weight_int4pack_mm(a.to(DEV), b, 32, sz)
    # the weight as the quantizer means it: high nibble first, (q - 8) * scale + zero
    qc = q.cpu().to(torch.int32)
    levels = torch.stack([qc >> 4, qc & 0xF], dim=2).reshape(128, 64)  # [N, K]
    scale = sz.cpu()[..., 0].repeat_interleave(32, 0).T  # [N, K]
    zero = sz.cpu()[..., 1].repeat_interleave(32, 0).T
    w_deq = (levels - 8) * scale + zero
    assert ((w_deq - w.T).abs() <= scale / 2 + 1e-6).all()  # within half a step of w
    torch.testing.assert_close(out.cpu().double(), a.double() @ w_deq.double().T,
                               atol=1e-4, rtol=1e-5)


def int4_mm(a, b, group, sz, a_dtype=torch.float32, sz_dtype=torch.float32):
    """A _weight_int4pack_mm call on zero tensors of these shapes (for its argument checks)."""
    return lambda: torch._weight_int4pack_mm(
        torch.zeros(a, dtype=a_dtype, device=DEV), torch.zeros(b, dtype=torch.int32, device=DEV),
        group, torch.zeros(sz, dtype=sz_dtype, device=DEV))


@pytest.mark.parametrize("make,kind,text", [
    (lambda: torch._convert_weight_to_int4pack(torch.zeros(8, 64, dtype=torch.int32, device=DEV), 2),
     RuntimeError, "_convert_weight_to_int4pack_mps : expect weight to be kByte."),
    (lambda: torch._convert_weight_to_int4pack(torch.zeros(8, 64, 2, dtype=torch.uint8, device=DEV), 2),
     RuntimeError, "_convert_weight_to_int4pack_mps : expect weight to be 2D tensor."),
    (lambda: torch._convert_weight_to_int4pack(torch.zeros(8, 64, dtype=torch.uint8, device=DEV), 3),
     RuntimeError, "_convert_weight_to_int4pack_mps : innerKTiles need to be 2, 4, or 8, got 3"),
    (lambda: torch._convert_weight_to_int4pack(torch.zeros(6, 64, dtype=torch.uint8, device=DEV), 2),
     RuntimeError, "_convert_weight_to_int4pack_mps : expect N (weight.size(0)) to be a multiple of 8"),
    (int4_mm((2, 64), (1, 2, 32, 1), 32, (2, 8, 2), a_dtype=torch.int32),
     RuntimeError, "_weight_int4pack_mm_mps : expect A to be either 32-bit or 16-bit float tensor."),
    (int4_mm((2, 64), (1, 2, 32, 1), 16, (2, 8, 2)),
     RuntimeError, "_weight_int4pack_mm_mps: expect qGroupSize to be 32, 64, 128 or 256, got 16"),
    (int4_mm((2, 64), (1, 2, 32, 1), 32, (2, 4, 2)),
     RuntimeError, "_weight_int4pack_mm_mps: expect qScaleAndZeros to be 3d tensor with sizes [:, 8, 2]"),
    (int4_mm((2, 128), (1, 2, 32, 1), 32, (4, 8, 2)),
     RuntimeError, "_weight_int4pack_mm_mps : expect B to pack A.size(1) = 128 4-bit values"),
    (int4_mm((2, 64), (1, 1, 32, 2), 32, (2, 8, 2), sz_dtype=torch.float16),
     RuntimeError, "_weight_int4pack_mm_mps : expect qScaleAndZeros to have A's dtype Float, got Half"),
])
def test_int4_bad_input_is_refused_with_mps_text(make, kind, text):
    with pytest.raises(kind) as info:
        make()
    assert str(info.value).startswith(text), str(info.value)


# ------------------------------------------------------------- mish

def test_mish_half_backward_is_cpus_kernel(mode):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=g) * 3).half()
    grad = torch.randn(4096, generator=g).half()
    cpu = torch.ops.aten.mish_backward(grad, x)
    dev = torch.ops.aten.mish_backward(grad.to(DEV), x.to(DEV)).cpu()
    assert torch.equal(dev, cpu)  # bit-equal: CPU computes in float32 (opmath)
    # through autograd, as a model does
    xd = x.to(DEV).requires_grad_()
    F.mish(xd).backward(grad.to(DEV))
    xc = x.clone().requires_grad_()
    F.mish(xc).backward(grad)
    assert torch.equal(xd.grad.cpu(), xc.grad)
    # and closer to the float64 derivative than a float16 evaluation
    exact = torch.ops.aten.mish_backward(grad.double(), x.double())
    assert (xd.grad.cpu().double() - exact).abs().max() <= 2 * (cpu.double() - exact).abs().max()


# ------------------------------------------------------------- Dirichlet

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dirichlet_samples_in_half_precision(mode, dtype):
    torch.manual_seed(0)
    torch.mps_ext.manual_seed(0)
    alpha = torch.tensor([1.0, 2.0, 5.0], dtype=dtype, device=DEV)
    d = torch.distributions.Dirichlet(alpha)
    s = d.sample((4000,))
    assert s.dtype == dtype and s.device.type == DEV and s.shape == (4000, 3)
    s = s.cpu().float()
    assert (s >= 0).all() and (s <= 1).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(4000), atol=1e-2, rtol=0)
    # mean alpha / sum(alpha), variance from the float64 formula
    a = alpha.cpu().double()
    mean = a / a.sum()
    var = mean * (1 - mean) / (a.sum() + 1)
    torch.testing.assert_close(s.double().mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(s.double().var(0), var, atol=0.01, rtol=0.2)
    # the generator is the device's: seeded twice, the same draw
    torch.mps_ext.manual_seed(7)
    first = torch._sample_dirichlet(alpha.expand(5, 3).contiguous())
    torch.mps_ext.manual_seed(7)
    assert torch.equal(torch._sample_dirichlet(alpha.expand(5, 3).contiguous()).cpu(), first.cpu())

    # float32 keeps CPU's kernel, with the same generator
    torch.mps_ext.manual_seed(7)
    f32 = torch._sample_dirichlet(alpha.float().expand(5, 3).contiguous())
    assert f32.dtype == torch.float32
    torch.mps_ext.manual_seed(7)
    assert torch.equal(torch._sample_dirichlet(alpha.float().expand(5, 3).contiguous()).cpu(),
                       f32.cpu())


# ------------------------------------------------------------- integer normal_

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8, torch.int64])
def test_integer_normal_is_refused_as_cpu_or_mps_refuses_it(dtype):
    # CPU (and CUDA) have no integer normal_; MPS's random kernels draw in
    # float32/float16/bfloat16 only and raise a TypeError for other dtypes
    with pytest.raises(NotImplementedError, match="not implemented for"):
        torch.empty(3, dtype=dtype, device=DEV).normal_()
    torch.mps_ext.set_fidelity("mps")
    try:
        name = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                torch.uint8: "Byte", torch.int64: "Long"}[dtype]
        with pytest.raises(TypeError, match=f"Unsupported type {name} for operation normal"):
            torch.empty(3, dtype=dtype, device=DEV).normal_()
        with pytest.raises(TypeError, match="for operation normal"):
            torch.normal(10.0, 11.0, (4, 4), device=DEV, dtype=dtype)
    finally:
        torch.mps_ext.set_fidelity("off")


def test_complex32_normal_splits_the_variance_like_cpu(mode):
    torch.mps_ext.manual_seed(0)
    z = torch.empty(20000, dtype=torch.complex32, device=DEV).normal_(0.0, 2.0)
    r = torch.view_as_real(z.cpu()).float()
    # each part gets half the variance: std 2 / sqrt(2)
    torch.testing.assert_close(r.std(0), torch.full((2,), 2.0 / 2 ** 0.5), atol=0.05, rtol=0)


# ------------------------------------------------- _scaled_dot_product_attention_math_for_mps

MATH_FOR_MPS = torch.ops.aten._scaled_dot_product_attention_math_for_mps
CAUSAL_WITH_MASK = ("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                    "is_causal=True")


def attention_reference(q, k, v, mask=None, causal=False, scale=None):
    """float64 attention as MPS defines it: the group size from the head
    counts, a bool mask selects, a float mask adds, causal keeps keys j <= i,
    rows whose every score is -inf give 0. Returns (out, weights)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scale = 1 / q.shape[-1] ** 0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    w = torch.softmax(s, -1).masked_fill((s == float("-inf")).all(-1, keepdim=True), 0)
    return w @ v, w


def qkv(shape_q, shape_kv, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_kv, generator=g).to(dtype)
    v_shape = shape_kv if dv is None else (*shape_kv[:-1], dv)
    v = torch.randn(v_shape, generator=g).to(dtype)
    return q, k, v


# Each: query shape, key/value shape, mask maker (L, S) -> mask or None, causal.
SDPA_CASES = {
    "plain": ((2, 4, 16, 64), (2, 4, 32, 64), None, False),
    "3d": ((4, 7, 32), (4, 9, 32), None, False),
    "5d": ((2, 3, 2, 5, 16), (2, 3, 2, 6, 16), None, False),
    "gqa": ((1, 8, 4, 64), (1, 2, 40, 64), None, False),
    "bool_mask_2d": ((2, 2, 6, 32), (2, 2, 10, 32),
                     lambda L, S: torch.rand(L, S, generator=torch.Generator().manual_seed(1)) > 0.3,
                     False),
    "float_mask": ((2, 2, 12, 32), (2, 2, 12, 32),
                   lambda L, S: torch.randn(2, 1, L, S, generator=torch.Generator().manual_seed(2)),
                   False),
    "causal_wide": ((1, 2, 5, 16), (1, 2, 9, 16), None, True),
    "causal_tall": ((1, 2, 9, 16), (1, 2, 5, 16), None, True),
    # is_causal with a mask where MPS runs its prefill kernel (L > 8, head dim 64)
    "causal_and_mask": ((2, 2, 16, 64), (2, 2, 32, 64),
                        lambda L, S: torch.rand(L, S, generator=torch.Generator().manual_seed(3)) > 0.2,
                        True),
}


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 1e-3),
                                        (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_math_for_mps_matches_a_float64_reference(mode, case, dtype, atol):
    shape_q, shape_kv, make_mask, causal = SDPA_CASES[case]
    q, k, v = qkv(shape_q, shape_kv, dtype)
    mask = make_mask(shape_q[-2], shape_kv[-2]) if make_mask else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    out, attn = MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV),
                             None if mask is None else mask.to(DEV), 0.0, causal)
    ref_out, ref_w = attention_reference(q, k, v, mask, causal)
    assert out.device.type == DEV and out.dtype == dtype and out.shape == ref_out.shape
    assert attn.device.type == DEV and attn.dtype == dtype and attn.shape == ref_w.shape
    assert out.is_contiguous() and attn.is_contiguous()
    # float16/bfloat16 computed in float32 and rounded once: within about one
    # rounding of the exact result (half-precision arithmetic is not).
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(attn.cpu().double(), ref_w, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_math_for_mps_half_precision_is_computed_in_float32(mode, dtype):
    # As MPS's kernels (and CPU's flash kernel) compute it: scores, softmax
    # and sums in float32, e = exp(s - rowmax) rounded to the dtype for the
    # product with V, divided by the row sum, the result rounded once; not
    # half-precision arithmetic.
    q, k, v = qkv((1, 2, 32, 80), (1, 2, 512, 80), dtype, seed=4)
    out, _ = MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV))
    s = q.double() @ k.double().transpose(-2, -1) * 80 ** -0.5
    e = (s - s.amax(-1, keepdim=True)).exp()
    flash = ((e.to(dtype).double() @ v.double()) / e.sum(-1, keepdim=True)).to(dtype)
    in_half = torch.softmax((q @ k.transpose(-2, -1)) * 80 ** -0.5, -1) @ v
    # (e rounds differently from the float64 reference's at a few ties)
    assert (out.cpu() == flash).float().mean() > 0.95
    assert (in_half == flash).float().mean() < 0.5


def test_sdpa_math_for_mps_masked_rows_give_zero_and_nan_propagates(mode):
    q, k, v = qkv((1, 2, 4, 16), (1, 2, 6, 16), torch.float32, seed=5)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False  # row 1 sees no key
    fmask = torch.zeros(4, 6)
    fmask[2] = float("-inf")  # row 2 neither
    out, attn = MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV), mask.to(DEV))
    assert torch.equal(out.cpu()[:, :, 1], torch.zeros(1, 2, 16))
    assert torch.equal(attn.cpu()[:, :, 1], torch.zeros(1, 2, 6))
    out, _ = MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV), fmask.to(DEV))
    assert torch.equal(out.cpu()[:, :, 2], torch.zeros(1, 2, 16))
    assert not out.isnan().any()
    q[0, 0, 3, 0] = float("nan")
    out, _ = MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV))
    assert out.cpu()[0, 0, 3].isnan().all() and not out.cpu()[0, 0, :3].isnan().any()


@pytest.mark.parametrize("shape_q,shape_kv,mask_dtype,dtype", [
    ((1, 2, 8, 64), (1, 2, 16, 64), torch.bool, torch.float32),       # L <= 8: MPS's vector/graph paths
    ((1, 2, 16, 48), (1, 2, 16, 48), torch.bool, torch.float32),      # head dim without a prefill kernel
    ((1, 2, 16, 64), (1, 2, 16, 64), torch.float32, torch.float16),   # mask dtype other than the query's
])
def test_sdpa_math_for_mps_refuses_causal_with_mask_where_mps_does(mode, shape_q, shape_kv,
                                                                    mask_dtype, dtype):
    q, k, v = qkv(shape_q, shape_kv, dtype)
    mask = torch.ones(shape_q[-2], shape_kv[-2], dtype=mask_dtype)
    with pytest.raises(RuntimeError) as info:
        MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV), mask.to(DEV), 0.0, True)
    assert str(info.value) == CAUSAL_WITH_MASK


@pytest.mark.parametrize("call,kind,text", [
    (lambda q: MATH_FOR_MPS(q, q, q, None, 0.1), NotImplementedError,
     "scaled_dot_product_attention for MPS does not support dropout."),
    (lambda q: MATH_FOR_MPS(q.int(), q.int(), q.int()), NotImplementedError,
     "scaled_dot_product_attention for MPS does not support dtype Int"),
    (lambda q: MATH_FOR_MPS(q[:, :3], q[:, :2], q[:, :2]), RuntimeError,
     "For GQA, the query tensor's head dimension (3) must be divisible by the key tensor's "
     "head dimension (2)."),
    (lambda q: MATH_FOR_MPS(q[0, 0], q[0, 0], q[0, 0]), RuntimeError,
     "_scaled_dot_product_attention_math_for_mps: expected query, key and value with the same "
     "number of dimensions, at least 3 (..., heads, sequence, head dim), got 2, 2 and 2"),
    (lambda q: MATH_FOR_MPS(q, q.half(), q), RuntimeError,
     "_scaled_dot_product_attention_math_for_mps: expected query, key and value of one dtype, "
     "got Float, Half and Float"),
])
def test_sdpa_math_for_mps_bad_input_is_refused(call, kind, text):
    q = torch.randn(1, 4, 5, 8, device=DEV)
    with pytest.raises(kind) as info:
        call(q)
    assert str(info.value).split("\n")[0] == text


@pytest.mark.parametrize("shape_q,shape_kv", [((3, 5, 8), (3, 7, 8)), ((2, 3, 5, 8), (2, 3, 7, 8)),
                                              ((2, 2, 3, 5, 8), (2, 2, 3, 7, 8))])
def test_sdpa_math_for_mps_agrees_with_torchs_meta_kernel(shape_q, shape_kv):
    q, k, v = qkv(shape_q, shape_kv, torch.float32, dv=6)
    out, attn = MATH_FOR_MPS(q.to(DEV), k.to(DEV), v.to(DEV))
    meta_out, meta_attn = MATH_FOR_MPS(q.to("meta"), k.to("meta"), v.to("meta"))
    assert (out.shape, out.stride(), out.dtype) == (meta_out.shape, meta_out.stride(), meta_out.dtype)
    assert (attn.shape, attn.dtype) == (meta_attn.shape, meta_attn.dtype)


def test_sdpa_math_for_mps_runs_from_an_exported_program():
    # torch.export with a dynamic sequence length traces through torch's meta
    # kernel; the exported program then runs mps_ext's kernel.
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.randn(1, 4, 16, 32))
            self.register_buffer("v", torch.randn(1, 4, 16, 32))

        def forward(self, q, mask):
            return MATH_FOR_MPS(q, self.k, self.v, mask, 0.0, False, None)[0]

    model = M().to(DEV)
    seq = torch.export.Dim("seq", min=2, max=16)
    q = torch.randn(1, 4, 4, 32, device=DEV)
    mask = torch.rand(4, 16, device=DEV) > 0.5
    ep = torch.export.export(model, (q, mask), dynamic_shapes={"q": {2: seq}, "mask": {0: seq}})
    q2 = torch.randn(1, 4, 7, 32)
    mask2 = torch.rand(7, 16) > 0.5
    out = ep.module()(q2.to(DEV), mask2.to(DEV))
    want, _ = attention_reference(q2, model.k.cpu(), model.v.cpu(), mask2)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5)
