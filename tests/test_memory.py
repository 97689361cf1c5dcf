"""The caching allocator through torch.mps_ext's and torch.accelerator's memory API."""

import gc

import pytest
import torch

from conftest import run_python

MiB = 1 << 20


def test_set_per_process_memory_fraction_checks(fresh_memory):
    with pytest.raises(TypeError) as info:
        torch.mps_ext.set_per_process_memory_fraction(1)
    assert str(info.value) == "Invalid type for fraction argument, must be `float`"
    with pytest.raises(TypeError):
        torch.mps_ext.set_per_process_memory_fraction("0.5")
    for bad in (-0.1, 2.5):
        with pytest.raises(ValueError) as info:
            torch.mps_ext.set_per_process_memory_fraction(bad)
        assert str(info.value) == f"Invalid fraction value: {bad}. Allowed range: 0~2"
    torch.mps_ext.set_per_process_memory_fraction(0.25)
    assert torch.mps_ext.get_per_process_memory_fraction() == 0.25


def test_default_fraction_is_the_high_watermark_ratio():
    out = run_python("""
        import torch, torch_mps_ext
        print(torch.mps_ext.get_per_process_memory_fraction())
    """, env={"PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO": "0.5"}).stdout
    assert float(out) == 0.5
    out = run_python("""
        import torch, torch_mps_ext
        print(torch.mps_ext.get_per_process_memory_fraction())
    """, env={"PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO": None}).stdout
    assert float(out) == 1.7  # MPS's default on unified memory


def test_allocated_returns_to_zero_and_memory_is_reused(fresh_memory):
    assert torch.mps_ext.current_allocated_memory() == 0
    x = torch.empty(3 * MiB, dtype=torch.uint8, device="mps_ext")
    assert torch.mps_ext.current_allocated_memory() == 3 * MiB
    assert torch.mps_ext.memory_allocated() == 3 * MiB
    reserved = torch.mps_ext.driver_allocated_memory()
    assert reserved >= 3 * MiB
    stats = torch.mps_ext.memory_stats()
    device_allocs = stats["num_device_alloc"]
    ptr = x.data_ptr()
    del x
    assert torch.mps_ext.current_allocated_memory() == 0
    # The freed block is cached, and the next request of that size reuses it
    # without asking the system.
    assert torch.mps_ext.driver_allocated_memory() == reserved
    y = torch.empty(3 * MiB, dtype=torch.uint8, device="mps_ext")
    assert y.data_ptr() == ptr
    stats = torch.mps_ext.memory_stats()
    assert stats["num_device_alloc"] == device_allocs
    assert stats["allocation.all.allocated"] == 2
    del y
    torch.mps_ext.empty_cache()
    assert torch.mps_ext.driver_allocated_memory() == 0
    assert torch.mps_ext.memory_stats()["num_device_free"] >= 1


def test_sizes_round_to_512_bytes_and_pools(fresh_memory):
    a = torch.empty(10, dtype=torch.uint8, device="mps_ext")
    assert torch.mps_ext.current_allocated_memory() == 512
    b = torch.empty(2 * MiB + 1, dtype=torch.uint8, device="mps_ext")
    s = torch.mps_ext.memory_stats()
    assert s["allocated_bytes.small_pool.current"] == 512
    assert s["allocated_bytes.large_pool.current"] == 2 * MiB + 512
    assert s["requested_bytes.all.current"] == 10 + 2 * MiB + 1
    assert s["segment.small_pool.current"] == 1
    assert s["reserved_bytes.small_pool.current"] == MiB  # small-pool segments are 1 MiB
    # A large request below 8 MiB gets a segment rounded up to 1 MiB; the rest
    # is split off.
    assert s["reserved_bytes.large_pool.current"] == 3 * MiB
    assert s["inactive_split.large_pool.current"] == 1
    del a, b


def test_split_blocks_coalesce(fresh_memory):
    a = torch.empty(10 * MiB + MiB // 2, dtype=torch.uint8, device="mps_ext")  # 12 MiB segment
    b = torch.empty(MiB + MiB // 4, dtype=torch.uint8, device="mps_ext")
    assert b.data_ptr() == a.data_ptr() + 10 * MiB + MiB // 2  # carved from a's segment
    del a, b
    s = torch.mps_ext.memory_stats()
    assert s["inactive_split.all.current"] == 0  # merged back into one block
    c = torch.empty(11 * MiB, dtype=torch.uint8, device="mps_ext")
    assert torch.mps_ext.memory_stats()["segment.all.current"] == 1
    del c


def test_free_block_at_a_segment_end_grows_in_place(fresh_memory):
    a = torch.empty(2 * MiB, dtype=torch.uint8, device="mps_ext")  # a 2 MiB segment
    del a
    keep = torch.full((MiB,), 7, dtype=torch.uint8, device="mps_ext")  # its first half
    assert torch.mps_ext.memory_reserved() == 2 * MiB
    # 2 MiB do not fit in the free 1 MiB tail: the segment grows by 1 MiB
    # instead of a new 2 MiB segment being reserved.
    big = torch.full((2 * MiB,), 3, dtype=torch.uint8, device="mps_ext")
    assert big.data_ptr() == keep.data_ptr() + MiB
    assert torch.mps_ext.memory_reserved() == 3 * MiB
    assert torch.mps_ext.memory_stats()["segment.all.current"] == 1
    assert int(big.sum()) == 3 * 2 * MiB and int(keep.sum()) == 7 * MiB  # both intact
    del big, keep
    torch.mps_ext.empty_cache()
    assert torch.mps_ext.memory_reserved() == 0


def test_memory_stats_keys_match_torch_cuda(fresh_memory):
    keys = set(torch.mps_ext.memory_stats())
    for metric in ("allocation", "segment", "active", "inactive_split", "allocated_bytes",
                   "reserved_bytes", "active_bytes", "inactive_split_bytes",
                   "requested_bytes"):
        for pool in ("all", "small_pool", "large_pool"):
            for kind in ("current", "peak", "allocated", "freed"):
                assert f"{metric}.{pool}.{kind}" in keys
    for k in ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc",
              "num_device_free", "max_split_size"):
        assert k in keys
    assert list(torch.mps_ext.memory_stats()) == sorted(keys)


def test_peaks_and_resets(fresh_memory):
    x = torch.empty(8 * MiB, dtype=torch.uint8, device="mps_ext")
    del x
    assert torch.mps_ext.max_memory_allocated() == 8 * MiB
    assert torch.mps_ext.max_memory_reserved() >= 8 * MiB
    assert torch.mps_ext.memory_reserved() >= 8 * MiB
    torch.mps_ext.reset_peak_memory_stats()
    assert torch.mps_ext.max_memory_allocated() == 0
    assert torch.mps_ext.memory_stats()["allocation.all.allocated"] >= 1
    torch.mps_ext.reset_accumulated_memory_stats()
    assert torch.mps_ext.memory_stats()["allocation.all.allocated"] == 0


def test_oom_names_the_numbers_and_leaves_tensors_alone(fresh_memory):
    total = torch.mps_ext.recommended_max_memory()
    torch.mps_ext.set_per_process_memory_fraction(64 * MiB / total)
    keep = torch.arange(1000.0, device="mps_ext")
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(100 * MiB, dtype=torch.uint8, device="mps_ext")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert msg.startswith("mps_ext out of memory on device mps_ext:0 (allocated: ")
    assert "Tried to allocate 100.00 MiB" in msg
    assert "max allowed: 64.00 MiB" in msg
    assert "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO" in msg
    assert "set_per_process_memory_fraction" in msg
    assert torch.mps_ext.memory_stats()["num_ooms"] == 1
    # Everything already allocated is intact; smaller work goes on.
    assert keep.sum().item() == sum(range(1000))
    y = torch.ones(1 * MiB, device="mps_ext") + 1
    assert y.sum().item() == 2 * MiB
    # Lifting the limit lets the same request through.
    torch.mps_ext.set_per_process_memory_fraction(0.0)
    z = torch.empty(100 * MiB, dtype=torch.uint8, device="mps_ext")
    assert z.numel() == 100 * MiB


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_oom_inside_an_operator_keeps_the_output_argument(fresh_memory):
    total = torch.mps_ext.recommended_max_memory()
    out = torch.full((16,), 7.0, device="mps_ext")
    a = torch.ones(4 * MiB, device="mps_ext")
    torch.mps_ext.set_per_process_memory_fraction(30 * MiB / total)
    with pytest.raises(torch.OutOfMemoryError):
        torch.add(a, a, out=out)  # needs a 16 MiB resize over the limit
    assert out.shape == (16,) and out.cpu().eq(7.0).all()


def test_mem_get_info_and_low_level_queries(fresh_memory):
    free, total = torch.mps_ext.mem_get_info()
    assert total == torch.mps_ext.recommended_max_memory()
    x = torch.empty(30 * MiB, dtype=torch.uint8, device="mps_ext")
    free2, _ = torch.mps_ext.mem_get_info()
    assert free - free2 == torch.mps_ext.driver_allocated_memory() - (total - free)
    del x


def test_accelerator_memory_functions(fresh_memory):
    x = torch.empty(2 * MiB, dtype=torch.uint8, device="mps_ext")
    assert torch.accelerator.memory_allocated() == torch.mps_ext.memory_allocated()
    assert torch.accelerator.memory_reserved() == torch.mps_ext.memory_reserved()
    assert torch.accelerator.max_memory_allocated() == torch.mps_ext.max_memory_allocated()
    assert torch.accelerator.memory_stats()["allocated_bytes.all.current"] == 2 * MiB
    assert torch.accelerator.get_memory_info() == torch.mps_ext.mem_get_info()
    torch.accelerator.reset_peak_memory_stats()
    del x
    torch.accelerator.empty_cache()
    assert torch.mps_ext.memory_reserved() == 0


def test_memory_summary_table(fresh_memory):
    x = torch.empty(3 * MiB, dtype=torch.uint8, device="mps_ext")
    text = torch.mps_ext.memory_summary()
    assert "mps_ext memory summary, device ID 0" in text
    lines = text.splitlines()
    row = next(l for l in lines if l.startswith("| Allocated memory"))
    assert row.split("|")[2].strip() == "3.00 MiB"
    assert len({len(l) for l in lines}) == 1  # a rectangular table
    short = torch.mps_ext.memory_summary(abbreviated=True)
    assert "from large pool" not in short and "from large pool" in text
    del x


def test_freed_block_is_not_lost_when_tensor_dies_in_gc(fresh_memory):
    class Holder:
        pass
    h = Holder()
    h.me = h
    h.t = torch.empty(MiB, dtype=torch.uint8, device="mps_ext")
    del h
    gc.collect()
    assert torch.mps_ext.current_allocated_memory() == 0


def test_host_alias_storage_shares_the_device_bytes_and_keeps_them_alive(fresh_memory):
    base = torch.mps_ext.current_allocated_memory()
    x = torch.zeros(256, device="mps_ext")[16:]
    torch.mps_ext.synchronize()
    host = torch.mps_ext._host_alias_storage(x.untyped_storage())
    assert host.device.type == "cpu" and host.nbytes() == 256 * 4
    h = torch.empty(0).set_(host, x.storage_offset(), x.shape, x.stride())
    h.copy_(torch.arange(240.0))  # host writes land in the device tensor
    assert torch.equal(x.cpu(), torch.arange(240.0))
    x.mul_(2)  # device writes are seen through the alias after a synchronize
    torch.mps_ext.synchronize()
    assert torch.equal(h, torch.arange(240.0) * 2)
    # the alias holds the device storage: freeing the tensor and emptying the
    # cache leave the bytes in place
    del x
    gc.collect()
    torch.mps_ext.empty_cache()
    assert torch.mps_ext.current_allocated_memory() > base
    assert torch.equal(h, torch.arange(240.0) * 2)
    del h, host
    gc.collect()
    assert torch.mps_ext.current_allocated_memory() == base
    with pytest.raises(ValueError, match=r"expects an MPS storage \(device mps_ext\), got a storage on cpu"):
        torch.mps_ext._host_alias_storage(torch.empty(4).untyped_storage())
    with pytest.raises(TypeError, match="expects a torch.UntypedStorage, got Tensor"):
        torch.mps_ext._host_alias_storage(torch.empty(4, device="mps_ext"))
