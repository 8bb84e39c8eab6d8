"""One place knows the device (docs/design.md §13), and its GPU branch runs here.

`nemodiff/device.py` is the only module that asks what kind of device it runs on; everything else
asks a `Platform`. The listing test below fails on a new branch elsewhere. The other tests run
the GPU branch of staging on the CPU (the emulated GPU path) and check what the ahead-of-time
kernels need of it: every staged part starts 16-byte aligned, whatever the sizes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nemodiff.cuda_driver import CudaVersions, DriverTooOld, driver_problem
from nemodiff.device import DeviceError, Platform, resolve_device
from nemodiff.plugins.ops import _gpu_library
from nemodiff.runtime.model.batch import BatchBuilder
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.segments import Mask, Pattern, Segment, cycle_layout, first_cycle_mask

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("nemodiff",)
DEVICE_BRANCH = re.compile(r"device\.type\s*[!=]=|\.is_cuda\b|torch\.cuda\.|pin_memory")


def test_only_the_device_module_branches_on_the_device():
    found = []
    for folder in PACKAGE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in (ROOT / "nemodiff" / "device.py", ROOT / "nemodiff" / "cuda_driver.py"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if DEVICE_BRANCH.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "device branches outside nemodiff/device.py:\n" + "\n".join(found)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_staged_parts_start_16_byte_aligned(dtype):
    staging = Platform("cpu", gpu_path=True).staging(dtype)
    for sizes in ([1, 3, 5], [7, 0, 2, 9], [33, 1], [0, 0, 4]):
        parts = [np.arange(n) + 100 * i for i, n in enumerate(sizes)]
        tensors = staging.upload(parts)
        assert [t.data_ptr() % 16 for t in tensors if t.numel()] == [0] * sum(1 for n in sizes if n)
        assert [t.tolist() for t in tensors] == [p.tolist() for p in parts]
        assert staging.flat().tolist() == np.concatenate(parts).tolist()  # what tensor-parallel ranks get
        assert tensors[0].data_ptr() != parts[0].ctypes.data  # one upload into the device buffer, not a view


def test_the_reference_path_hands_arrays_over_without_copies():
    staging = Platform("cpu").staging(torch.int64)
    part = np.arange(5, dtype=np.int64)
    (tensor,) = staging.upload([part])
    assert tensor.data_ptr() == part.ctypes.data


def test_every_kernel_metadata_slice_of_a_mixed_batch_is_aligned():
    """Odd token counts and every segment kind in one batch, built on the emulated GPU path."""
    platform = Platform("cpu", gpu_path=True)
    cache = PagedKVCache(1, 1, 8, 4, 64, torch.float32, platform, max_pages_per_request=16)
    for rid in range(5):
        cache.add_request(rid)
        cache.reserve(rid, 40)
    cache.sync_tables()
    mask, offsets, writes, rows = cycle_layout(3)
    segments = [
        Segment(0, [5, 6, 7], [0, 1, 2], 0, Pattern.CAUSAL, write_kv=True),
        Segment(1, [9], [7], 7, Pattern.CAUSAL, write_kv=True, logit_rows=[0]),
        Segment(2, [100] * 5, list(range(3, 8)), 3, Pattern.FULL, write_kv=False, logit_rows=[1, 2, 3, 4]),
        Segment(3, [50, 51, 52] + [100] * 9, offsets + 4, 4, Pattern.MASK, writes, rows, mask),
        Segment(4, [1, 2, 100, 100], [0, 1, 2, 3], 0, Pattern.MASK, [True, True, False, False], [1, 3],
                mask=Mask(first_cycle_mask(2, 2))),
    ]
    batch = BatchBuilder(platform).build(segments, cache)
    assert batch.num_tokens % 2 == 1  # an odd count: positions used to start at an 8-byte offset
    for name in ("ids", "positions", "token_slots", "write_rows", "write_slots", "logit_rows", "seg_start",
                 "seg_prefix", "seg_table_row", "seg_pattern", "mask_offset", "mask_bits"):
        tensor = getattr(batch, name)
        assert tensor.data_ptr() % 16 == 0, name
    assert batch.positions.tolist()[:3] == [0, 1, 2] and batch.seg_prefix.tolist() == [0, 7, 3, 4, 0]
    assert torch.equal(cache.block_tables[1:6], torch.from_numpy(cache.tables_host[1:6]))  # synced, not shared
    assert cache.block_tables.data_ptr() != cache.tables_host.ctypes.data


def test_device_errors_say_what_to_do():
    if not torch.backends.cuda.is_built():
        with pytest.raises(DeviceError, match="CPU-only build; install a CUDA build of torch, or use --device cpu"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="not a torch device"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_driver_too_old_for_the_bindings_is_one_line_and_auto_runs_the_jit(tmp_path, caplog):
    """cuda-bindings 13 needs a driver for CUDA 13 (580+): against a CUDA 12.2 driver the GPU library is
    refused in one line naming both versions (--kernels aot), or replaced by Triton's JIT (auto)."""
    old = CudaVersions(driver=12020, bindings="13.0.1", torch_cuda="12.8")
    problem = driver_problem(old)
    assert problem.count("\n") == 0 and "CUDA 12.2" in problem and "cuda-bindings 13.0.1" in problem
    assert "580" in problem and "nemodiff[gpu-cu12]" in problem and "CUDA 12.8" in problem
    assert driver_problem(CudaVersions(13000, "13.0.1", "13.0")) is None
    assert driver_problem(CudaVersions(12020, "12.9.0", "12.8")) is None  # 12.x bindings run on any CUDA 12 driver
    with pytest.raises(DriverTooOld, match="CUDA 12.2, but cuda-bindings 13.0.1"):
        _gpu_library(tmp_path, torch.device("cuda", 1), "aot", versions=old)
    with caplog.at_level(logging.WARNING):
        library = _gpu_library(tmp_path, torch.device("cuda", 1), "auto", versions=old)
    assert library.name == "jit"
    assert any("cuda-bindings 13.0.1" in r.message and "Triton's JIT" in r.message for r in caplog.records)
