"""Registration, devices and their environment variables, through the public API."""

import pytest
import torch

from conftest import run_python


def test_backend_is_registered_as_mps_ext():
    assert torch._C._get_privateuse1_backend_name() == "mps_ext"
    assert torch.mps_ext is __import__("torch_mps_ext")
    assert torch.device("mps_ext").type == "mps_ext"
    assert torch.device("mps_ext:0").index == 0


def test_device_count_and_availability_default():
    assert torch.mps_ext.device_count() >= 1
    assert torch.mps_ext.is_available() is True
    out = run_python("""
        import torch, torch_mps_ext
        print(torch.mps_ext.device_count(), torch.mps_ext.is_available())
    """, env={"TORCH_MPS_EXT_DEVICE_COUNT": None}).stdout
    assert out.split() == ["1", "True"]


@pytest.mark.parametrize("value", ["0", "17", "1.5"])
def test_bad_device_count_is_a_clear_error(value):
    message = f"TORCH_MPS_EXT_DEVICE_COUNT must be an integer from 1 to 16, got '{value}'"
    proc = run_python("import torch_mps_ext", check=False, env={
        "TORCH_MPS_EXT_DEVICE_COUNT": value, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: " + message
    if value != "0":
        return
    # Through autoload, `import torch` still works (on the CPU) and warns.
    proc = run_python("import torch; print(torch.ones(1).item())", env={
        "TORCH_MPS_EXT_DEVICE_COUNT": value, "TORCH_DEVICE_BACKEND_AUTOLOAD": "1"})
    assert proc.stdout.strip() == "1.0"
    assert "RuntimeWarning: mps_ext device not loaded: " + message in proc.stderr


@pytest.mark.parametrize("name,value,message", [
    ("TORCH_MPS_EXT_MEMORY_BYTES", "lots",
     "TORCH_MPS_EXT_MEMORY_BYTES must be a positive integer number of bytes, got 'lots'"),
    ("TORCH_MPS_EXT_MEMORY_BYTES", "0",
     "TORCH_MPS_EXT_MEMORY_BYTES must be a positive integer number of bytes, got '0'"),
    ("PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO", "2.5",
     "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO must be a number in [0, 2], got '2.5'"),
    ("PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO", "abc",
     "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO must be a number in [0, 2], got 'abc'"),
    ("PYTORCH_MPS_EXT_LOW_WATERMARK_RATIO", "1.9",
     "PYTORCH_MPS_EXT_LOW_WATERMARK_RATIO must be a number in [0, 1.7], got '1.9'"),
    ("TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD", "yes",
     "TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD must be 0 or 1, got 'yes'"),
])
def test_bad_memory_settings_are_clear_errors(name, value, message):
    proc = run_python("import torch_mps_ext", check=False,
                      env={name: value, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: " + message


def test_memory_size_from_environment():
    out = run_python("""
        import torch, torch_mps_ext
        print(torch.mps_ext.recommended_max_memory())
        print(torch.mps_ext.mem_get_info()[1])
    """, env={"TORCH_MPS_EXT_MEMORY_BYTES": "123456789"}).stdout.split()
    assert out == ["123456789", "123456789"]


def test_default_memory_size_is_three_quarters_of_ram():
    import os
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert torch.mps_ext.recommended_max_memory() == ram // 4 * 3


def test_autoload_makes_plain_import_torch_enough():
    out = run_python("""
        import sys, torch
        assert "torch_mps_ext" in sys.modules, "autoload did not import the backend"
        x = torch.ones(3, device="mps_ext") * 2
        print(x.device, x.cpu().tolist())
    """, env={"TORCH_DEVICE_BACKEND_AUTOLOAD": "1"})
    assert out.stdout.strip() == "mps_ext:0 [2.0, 2.0, 2.0]"


def test_autoload_adds_little_to_import_time():
    # The backend's own import, measured inside one interpreter with
    # autoload off: what autoload would add to `import torch`.
    out = run_python("""
        import time, torch
        t0 = time.perf_counter()
        import torch_mps_ext
        print(time.perf_counter() - t0)
    """, env={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}).stdout
    assert float(out) < 0.3


def test_current_device_set_device_and_context_manager():
    assert torch.mps_ext.current_device() == 0
    torch.mps_ext.set_device(0)
    torch.mps_ext.set_device("mps_ext:0")
    torch.mps_ext.set_device(torch.device("mps_ext", 0))
    with torch.mps_ext.device(0):
        assert torch.mps_ext.current_device() == 0
    with torch.mps_ext.device(None):
        assert torch.mps_ext.current_device() == 0
    x = torch.zeros(1, device="mps_ext")
    with torch.mps_ext.device_of(x):
        assert torch.mps_ext.current_device() == 0


def test_bad_device_indices_raise():
    with pytest.raises(ValueError, match="Invalid mps_ext device index 5"):
        torch.mps_ext.set_device(5)
    with pytest.raises(ValueError, match="Expected a mps_ext device, but got: cpu"):
        torch.mps_ext.set_device("cpu")
    n = torch.mps_ext.device_count()
    with pytest.raises(IndexError) as info:
        torch.zeros(1, device=f"mps_ext:{n}")
    assert str(info.value) == (f"Invalid device index {n} for mps_ext: valid indices are "
                               f"0..{n - 1} (set TORCH_MPS_EXT_DEVICE_COUNT for more devices)")


def test_accelerator_api_sees_mps_ext():
    assert torch.accelerator.is_available()
    assert torch.accelerator.current_accelerator().type == "mps_ext"
    assert torch.accelerator.device_count() == torch.mps_ext.device_count()
    assert torch.accelerator.current_device_index() == 0
    torch.accelerator.set_device_index(0)
    torch.accelerator.synchronize()
    with torch.accelerator.device_index(0):
        assert torch.accelerator.current_device_index() == 0


def test_tensor_module_storage_methods():
    t = torch.arange(4.0)
    d = t.mps_ext()
    assert d.is_mps_ext and not t.is_mps_ext
    assert d.device == torch.device("mps_ext:0")
    m = torch.nn.Linear(2, 2).mps_ext()
    assert all(p.is_mps_ext for p in m.parameters())
    s = t.untyped_storage().mps_ext()
    assert s.device.type == "mps_ext" and s.is_mps_ext
    assert torch.equal(d.cpu(), t)


def test_synchronize_raises_reported_device_error():
    torch_mps_ext = __import__("torch_mps_ext")
    torch.mps_ext.synchronize()
    torch_mps_ext._C._report_error(0, "kernel 'k' reported: index 7 out of bounds")
    with pytest.raises(torch.AcceleratorError, match="index 7 out of bounds"):
        torch.mps_ext.synchronize()
    torch.mps_ext.synchronize()  # the error is reported once


def test_two_devices():
    out = run_python("""
        import torch, torch_mps_ext
        assert torch.mps_ext.device_count() == 2
        a = torch.arange(6.0, device="mps_ext:1").reshape(2, 3)
        assert a.device == torch.device("mps_ext:1")
        b = (a * 2 + 1).sum(0)
        assert b.device == torch.device("mps_ext:1"), b.device
        assert b.cpu().tolist() == [8.0, 12.0, 16.0]
        c = a.to("mps_ext:0")
        assert c.device.index == 0 and torch.equal(c.cpu(), a.cpu())
        with torch.mps_ext.device(1):
            assert torch.mps_ext.current_device() == 1
            z = torch.zeros(3, device="mps_ext")
            assert z.device.index == 1
        assert torch.mps_ext.current_device() == 0
        # Memory is accounted per device.
        torch.mps_ext.empty_cache()
        before0 = torch.mps_ext.memory_allocated(0)
        big = torch.empty(1 << 20, device="mps_ext:1")
        assert torch.mps_ext.memory_allocated(1) >= 4 << 20
        assert torch.mps_ext.memory_allocated(0) == before0
        # Ops mixing devices fail like CUDA's.
        try:
            a + c
        except RuntimeError as e:
            assert "Expected all tensors to be on the same device" in str(e), e
        else:
            raise AssertionError("cross-device add did not raise")
        # Training on device 1.
        m = torch.nn.Linear(3, 1).to("mps_ext:1")
        m(a).sum().backward()
        assert m.weight.grad.device.index == 1
        print("ok")
    """, env={"TORCH_MPS_EXT_DEVICE_COUNT": "2"})
    assert out.stdout.strip() == "ok"
