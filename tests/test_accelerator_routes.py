"""Operators that torch routes every accelerator to, with no CPU kernel for
the fallback to run (the audit behind issue 13: composites that branch on the
device type). Each must work on mps_ext as its CPU counterpart does:
LSTM/GRU cells (tests/test_recurrent.py), nn.SyncBatchNorm's per-rank kernels
(here, and across two processes in tests/distributed_worker.py), and
composites that call CPU's kernel function directly."""

import pytest
import torch

DEV = "mps_ext"


def _x(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(6, 3, 4, 5, dtype=dtype) * 2 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_batch_norm_stats_match_the_batch(dtype):
    x = _x(dtype)
    mean, invstd = torch.batch_norm_stats(x.to(DEV), 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and invstd.dtype == acc  # CUDA's accumulate type
    ref = x.to(acc)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float16 else {}
    torch.testing.assert_close(mean.cpu(), ref.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(invstd.cpu(), (ref.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(),
                               **tol)


def test_single_rank_sync_batch_norm_equals_batch_norm():
    # The five kernels chained as SyncBatchNorm's autograd function chains
    # them, with one rank: BatchNorm's training forward and backward.
    x = _x(torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    d = lambda t: t.to(DEV)  # noqa: E731
    mean, invstd = torch.batch_norm_stats(d(x), 1e-5)
    drm, drv = d(rm), d(rv)
    count = torch.tensor([x.numel() // 3], dtype=torch.float64, device=DEV)
    gmean, ginvstd = torch.batch_norm_gather_stats_with_counts(
        d(x), mean[None], invstd[None], drm, drv, 0.1, 1e-5, count)
    out = torch.batch_norm_elemt(d(x), d(w), d(b), gmean, ginvstd, 1e-5)
    sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(
        d(dy), d(x), gmean, ginvstd, d(w), True, True, True)
    gx = torch.batch_norm_backward_elemt(d(dy), d(x), gmean, ginvstd, d(w), sum_dy, sum_dy_xmu,
                                         count.int())
    xr = x.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = torch.nn.functional.batch_norm(xr, rm, rv, wr, br, training=True, momentum=0.1)
    ref.backward(dy)
    torch.testing.assert_close(out.cpu(), ref.detach())
    torch.testing.assert_close(gx.cpu(), xr.grad)
    torch.testing.assert_close(gw.cpu(), wr.grad)
    torch.testing.assert_close(gb.cpu(), br.grad)
    torch.testing.assert_close(drm.cpu(), rm)
    torch.testing.assert_close(drv.cpu(), rv)


def test_batch_norm_no_update_runs_cpus_kernel():
    x, w, b = _x(), torch.rand(3), torch.rand(3)
    rm, rv = torch.rand(3), torch.rand(3) + 0.5
    want = torch.ops.aten._batch_norm_no_update(x, w, b, rm, rv, 0.1, 1e-5)
    got = torch.ops.aten._batch_norm_no_update(*(t.to(DEV) for t in (x, w, b, rm, rv)), 0.1, 1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r)


def test_gather_stats_refuses_mismatched_shapes():
    m = torch.zeros(2, 3, device=DEV)
    with pytest.raises(RuntimeError, match="expected mean/invstd of size \\(world, C\\)"):
        torch.batch_norm_gather_stats_with_counts(m, m, m[:, :2], None, None, 0.1, 1e-5,
                                                  torch.ones(2, device=DEV))
