"""torch.save / torch.load with mps_ext tensors, modules and map_location."""

import io

import pytest
import torch

DEV = "mps_ext"


def _roundtrip(obj, **load_kw):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kw)


def test_tensor_roundtrip_stays_on_device():
    x = torch.arange(12.0).reshape(3, 4).to(DEV)[:, 1:]
    y = _roundtrip(x)
    assert y.device == torch.device("mps_ext:0")
    assert y.stride() == x.stride() and torch.equal(y.cpu(), x.cpu())


def test_shared_storage_is_preserved():
    x = torch.arange(6.0, device=DEV)
    a, b = _roundtrip([x[:3], x[2:]])
    a[2] = 100
    assert b[0].item() == 100


def test_map_location_to_and_from_mps_ext():
    x = torch.randn(5, device=DEV)
    for loc in ("cpu", torch.device("cpu"), {"mps_ext:0": "cpu"}, lambda s, _: s.cpu()):
        y = _roundtrip(x, map_location=loc)
        assert y.device.type == "cpu" and torch.equal(y, x.cpu())
    c = torch.randn(5)
    for loc in ("mps_ext", "mps_ext:0", torch.device(DEV), {"cpu": "mps_ext"}):
        y = _roundtrip(c, map_location=loc)
        assert y.device == torch.device("mps_ext:0") and torch.equal(y.cpu(), c)


def test_mps_ext_locations_are_not_taken_by_torch_mps():
    # torch's MPS handler claims every location starting with "mps".
    x = torch.ones(2)
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    y = torch.load(buf, map_location="mps_ext")
    assert y.is_mps_ext


def test_checkpoint_of_model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).to(DEV)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 4, device=DEV)).sum().backward()
    opt.step()
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert all(v.device.type == DEV for v in ckpt["model"].values())
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).to(DEV)
    fresh.load_state_dict(ckpt["model"])
    x = torch.randn(2, 4, device=DEV)
    assert torch.equal(fresh(x).cpu(), model(x).cpu())
    state = ckpt["opt"]["state"][0]["exp_avg"]
    assert state.device.type == DEV
    cpu_ckpt = _roundtrip(model.state_dict(), map_location="cpu")
    assert all(v.device.type == "cpu" for v in cpu_ckpt.values())


def test_loading_onto_a_missing_device_is_a_clear_error():
    x = torch.ones(2)
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    n = torch.mps_ext.device_count()
    with pytest.raises(ValueError, match=f"Invalid mps_ext device index {n}"):
        torch.load(buf, map_location=f"mps_ext:{n}")
