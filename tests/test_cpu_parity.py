"""Behaviours where CPU and CUDA agree and mps_ext must too (found by running
PyTorch's own device-generic test files against mps_ext): memory-overlap
refusals, deterministic fill of uninitialised memory, out= on the wrong
device, Python scalars, factories reaching DispatchStubs, random ops at their
edges, storage sharing, legacy storage classes and mixed-device indexing."""

import pytest
import torch

DEV = "mps_ext"
OVERLAP = ("unsupported operation: some elements of the input tensor and the written-to "
           "tensor refer to a single memory location. Please clone() the tensor before "
           "performing the operation.")
INTERNAL = ("unsupported operation: more than one element of the written-to tensor refers "
            "to a single memory location. Please clone() the tensor before performing the "
            "operation.")


def _idx(device):
    return torch.tensor([0, 1], device=device)


PARTIAL_OVERLAP_CASES = {
    "copy_": lambda x: x[1:].copy_(x[:-1]),
    "index_add_": lambda x: x.index_add_(0, _idx(x.device), x[1:3]),
    "index_copy_": lambda x: x.index_copy_(0, _idx(x.device), x[1:3]),
    "index_put_": lambda x: x.index_put_((_idx(x.device),), x[1:3]),
    "put_": lambda x: x.put_(_idx(x.device), x[1:3]),
    "pow_": lambda x: x[1:].pow_(x[:-1]),
    "pow.Scalar_out": lambda x: torch.pow(2.0, x[:-1], out=x[1:]),
    "add.out": lambda x: torch.add(x[:-1], 1, out=x[1:]),
    "lshift_": lambda x: x[1:].__ilshift__(x[:-1]),
}


@pytest.mark.parametrize("name", list(PARTIAL_OVERLAP_CASES))
def test_partial_overlap_is_refused_before_writing(name):
    fn = PARTIAL_OVERLAP_CASES[name]
    dtype = torch.int64 if name == "lshift_" else torch.float32
    with pytest.raises(RuntimeError) as cpu_err:
        fn(torch.arange(10, dtype=dtype))
    x = torch.arange(10, dtype=dtype, device=DEV)
    with pytest.raises(RuntimeError) as dev_err:
        fn(x)
    assert str(dev_err.value) == str(cpu_err.value)
    assert str(dev_err.value) == OVERLAP
    assert x.cpu().tolist() == list(range(10))  # nothing was written


def test_internal_overlap_is_refused():
    x = torch.arange(3.0, device=DEV)
    with pytest.raises(RuntimeError) as err:
        x.expand(3, 3).add_(1)
    assert str(err.value) == INTERNAL
    assert x.cpu().tolist() == [0.0, 1.0, 2.0]


def test_full_overlap_is_allowed_as_on_cpu():
    x = torch.arange(4.0, device=DEV)
    x.copy_(x)
    torch.add(x, 1, out=x)
    assert x.cpu().tolist() == [1.0, 2.0, 3.0, 4.0]


# ------------------------------------------------ deterministic fill

@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
          torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uninitialised_memory_is_filled_in_deterministic_mode(deterministic, dtype):
    makers = {
        "empty": lambda d: torch.empty(5, dtype=dtype, device=d),
        "empty_strided": lambda d: torch.empty_strided((2, 3), (1, 2), dtype=dtype, device=d),
        "empty_like": lambda d: torch.empty_like(torch.zeros(4, dtype=dtype, device=d)),
        "new_empty": lambda d: torch.zeros(1, dtype=dtype, device=d).new_empty(3),
    }
    for name, make in makers.items():
        ref = make("cpu")
        got = make(DEV).cpu()
        assert torch.equal(got, ref) or (got.isnan().all() and ref.isnan().all()), name
    for device in ("cpu", DEV):
        t = torch.zeros(2, dtype=dtype, device=device)
        t.resize_(6)
        if device == "cpu":
            ref = t
    got = t.cpu()
    assert torch.equal(got[:2], ref[:2])
    assert torch.equal(got[2:], ref[2:]) or (got[2:].isnan().all() and ref[2:].isnan().all())


def test_no_fill_outside_deterministic_mode_or_when_disabled(deterministic):
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        t = torch.empty(4, device=DEV)  # whatever the allocator held: just no error
        assert t.shape == (4,)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = True


# ------------------------------------------------ out= on the wrong device

@pytest.mark.parametrize("call", [
    lambda x, o: torch.nonzero(x, out=o),
    lambda x, o: torch.sin(x, out=o),
    lambda x, o: torch.add(x, x, out=o),
    lambda x, o: torch.sort(x, out=(torch.empty(0, device=DEV), o)),
], ids=["nonzero", "sin", "add", "sort"])
@pytest.mark.parametrize("out", [lambda: torch.tensor(7), lambda: torch.arange(3)], ids=["0d", "1d"])
def test_out_tensor_on_cpu_is_refused_and_left_alone(call, out):
    x = torch.tensor([0.0, 1.0, 2.0], device=DEV)
    o = out()
    before = o.clone()
    storage_bytes = o.untyped_storage().nbytes()
    with pytest.raises(RuntimeError, match=r"^Expected out tensor to have device mps_ext:0, but got cpu instead$"):
        call(x, o)
    assert torch.equal(o, before) and o.untyped_storage().nbytes() == storage_bytes


# ------------------------------------------------ Python scalars

@pytest.mark.parametrize("dtype,expr", [
    (torch.uint8, lambda x: x + 1000), (torch.uint8, lambda x: x * 300),
    (torch.int8, lambda x: x + 200), (torch.int8, lambda x: x - 300),
    (torch.int16, lambda x: x * 70000), (torch.uint8, lambda x: x.add_(1000)),
    (torch.int8, lambda x: x.mul_(300)),
])
def test_out_of_range_python_integers_wrap_as_on_cpu(dtype, expr):
    base = torch.tensor([1, 2, 100], dtype=dtype)
    assert expr(base.to(DEV)).cpu().tolist() == expr(base.clone()).tolist()


# ------------------------------------------------ factories and stubs

@pytest.mark.parametrize("call", [
    lambda d: torch.kaiser_window(8, device=d),
    lambda d: torch.kaiser_window(9, periodic=False, beta=5.0, device=d, dtype=torch.float64),
    lambda d: torch.hann_window(8, device=d),
    lambda d: torch.blackman_window(7, device=d),
    lambda d: torch.triu_indices(4, 5, 1, device=d),
    lambda d: torch.tril_indices(3, 3, device=d),
], ids=["kaiser", "kaiser_beta", "hann", "blackman", "triu_indices", "tril_indices"])
def test_factories_match_cpu(call):
    got = call(DEV)
    assert got.device.type == DEV
    torch.testing.assert_close(got.cpu(), call("cpu"), atol=0, rtol=0)


# ------------------------------------------------ random edges

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_exponential_with_infinite_rate_is_zero(dtype):
    t = torch.empty(16, dtype=dtype, device=DEV).exponential_(float("inf"))
    assert (t.cpu() == 0).all()


def test_random_ops_at_their_edges():
    assert (torch.empty(8, device=DEV).bernoulli_(0.0).cpu() == 0).all()
    assert (torch.empty(8, device=DEV).bernoulli_(1.0).cpu() == 1).all()
    assert torch.empty(0, device=DEV).exponential_().shape == (0,)
    assert torch.empty(0, device=DEV).normal_().shape == (0,)
    assert torch.rand(0, 3, device=DEV).shape == (0, 3)
    with pytest.raises(RuntimeError) as cpu_err:
        torch.empty(2).exponential_(0.0)
    with pytest.raises(RuntimeError) as dev_err:
        torch.empty(2, device=DEV).exponential_(0.0)
    assert str(dev_err.value) == str(cpu_err.value)


# ------------------------------------------------ storage sharing

def test_set_shares_the_storage():
    t1 = torch.randn(4, device=DEV)
    t3 = torch.empty(0, device=DEV)
    t3.set_(t1)
    assert t1.is_set_to(t3) and t3.is_set_to(t1)
    assert t3.untyped_storage().data_ptr() == t1.untyped_storage().data_ptr()
    t3.set_(t1.untyped_storage(), 1, (2,), (1,))
    assert not t1.is_set_to(t3)
    assert t3.cpu().tolist() == t1.cpu()[1:3].tolist()


def test_resize_grows_the_storage_every_view_sees():
    x = torch.zeros(2, device=DEV)
    view = x.view(2)
    x.resize_(64)
    assert x.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
    x.fill_(3.0)
    assert view.cpu().tolist() == [3.0, 3.0]


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_type_and_legacy_storage_classes():
    t = torch.zeros(3, device=DEV)
    assert t.storage_type() is torch.mps_ext.FloatStorage
    assert t.long().storage_type() is torch.mps_ext.LongStorage
    assert isinstance(t.storage(), torch.mps_ext.FloatStorage)
    assert not isinstance(t.storage(), torch.FloatStorage)
    s = torch.mps_ext.HalfStorage(4)
    assert s.device.type == DEV and s.dtype == torch.half and len(s) == 4
    with pytest.raises(RuntimeError, match="from_buffer: Not available for mps_ext storage"):
        torch.mps_ext.FloatStorage.from_buffer(b"\0" * 8)


def test_device_indices_into_a_cpu_tensor():
    # aten raises a RuntimeError (TORCH_CHECK), not an IndexError, also when
    # CPU and device indices are mixed.
    text = r"^indices should be either on cpu or on the same device as the indexed tensor \(cpu\)$"
    x = torch.arange(60).reshape(3, 4, 5)
    i_dev = torch.tensor([1, 2], device=DEV)
    for index in (lambda: x[i_dev], lambda: x[:, torch.tensor([0, 3]), i_dev]):
        with pytest.raises(RuntimeError, match=text) as err:
            index()
        assert type(err.value) is RuntimeError
    # CPU indices into a device tensor are fine, as on CUDA.
    assert torch.arange(5, device=DEV)[torch.tensor([1, 2])].cpu().tolist() == [1, 2]


@pytest.mark.parametrize("train", [True, False])
def test_dropout_keeps_the_input_layout(train):
    # ATen sends nn.Dropout on accelerators to native_dropout (on CPU it
    # decomposes); its outputs keep the input's layout, as CPU's do.
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    want = [t.stride() for t in torch.native_dropout(x, 0.5, train)]
    got = torch.native_dropout(x.to(DEV), 0.5, train)
    assert [t.stride() for t in got] == want
    out, mask = (t.cpu() for t in got)
    if train:
        torch.testing.assert_close(out, x * mask * 2.0)
    else:
        assert torch.equal(out, x) and mask.all()
