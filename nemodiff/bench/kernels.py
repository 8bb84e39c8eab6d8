"""Kernels for a random model at a named shape: compiled ahead of time as an engine build does, or Triton's JIT.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: the kernels `--shape` runs with]

`nemodiff bench --shape` has no engine directory, so it makes the part of one that the kernels need:
every variant an engine of the shape and dtype may launch (`registry.engine_variants`, exactly what
`nemodiff-build --arch` compiles) is compiled for one sm into `<dir>/kernels/<sm>/` with its
`kernels.json`, and the runtime's own loader (`plugins.ops.load_kernels`) opens that folder as it opens
an engine's. Modes (`--kernels`):

- `aot`: cubins for the visible GPU's sm, launched through the CUDA driver (`AotLauncher` over
  `CudaLaunch`): what serving runs. `auto` means this on a GPU when cuda-python is installed.
- `aot-check`: on the CPU, cubins for a GPU arch (`--sm`, default sm_90a), every launch checked against
  its cubin and then interpreted (nemodiff/plugins/aot_check.py): the same path with the driver call left out.
- `jit`: Triton's JIT on a GPU (development); `interpret`: Triton's interpreter on the CPU; `off`: the
  PyTorch reference path (`auto` on a CPU).

A folder given with `--kernel-dir` is reused when its index already holds every variant (the GPU
device script compiles once and benchmarks bf16 and fp8 from the same folder).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from nemodiff.device import Platform, gpu_sm, is_cuda
from nemodiff.engine_format import ARCH_TO_SM, BuildSettings, ModelConfig

log = logging.getLogger(__name__)
MODES = ("auto", "aot", "aot-check", "jit", "interpret", "off")
DEFAULT_CHECK_SM = "sm_90a"  # what aot-check compiles for on the CPU unless told otherwise


def resolve_mode(mode: str, device: torch.device) -> str:
    """The concrete mode of `mode` on `device` ("auto": aot on a GPU with cuda-python, else jit; off on a CPU)."""
    if mode != "auto":
        return mode
    if not is_cuda(device):
        return "off"
    from nemodiff.cuda_driver import cuda_versions, driver_problem

    try:
        problem = driver_problem(cuda_versions())
    except ImportError:
        problem = "cuda-python is not installed (pip install 'nemodiff[gpu]')"
    if problem:
        log.warning("nemodiff bench: %s; the ahead-of-time kernels cannot be launched: timing Triton's JIT "
                    "instead", problem)
        return "jit"
    return "aot"


def kernel_platform(device: torch.device, mode: str, sm: str | None = None, sm_count: int | None = None) -> Platform:
    """The platform a random model runs on: aot-check emulates the GPU path on the CPU."""
    if mode == "aot-check":
        if is_cuda(device):
            raise ValueError("--kernels aot-check runs the GPU launch path on the CPU; use --device cpu "
                             "(on a GPU use --kernels aot)")
        platform = Platform.for_kernels(device, mode, sm=sm or DEFAULT_CHECK_SM, sm_count=sm_count)
    else:
        platform = Platform(device, sm_count=sm_count)
    platform.bind_thread()  # the benchmark's thread works on this device and its stream
    return platform


def compile_for(variants: list, sm: str, root: Path) -> dict:
    """The variants compiled for `sm` into root/kernels/<sm>/ (as an engine build lays them out), or the
    folder reused as it is when its index already holds every one of them.

    Returns {"sm", "variants", "compiled" (how many were compiled now), "compile_s", "dir", "entries"}."""
    from nemodiff.plugins.aot import compile_variants
    from nemodiff.plugins.aot_launch import INDEX_FILE, read_index

    kernel_dir = Path(root) / "kernels" / sm
    known = read_index(kernel_dir)["kernels"] if (kernel_dir / INDEX_FILE).is_file() else {}
    start = time.perf_counter()
    if all(v.key in known and (kernel_dir / known[v.key]["file"]).is_file() for v in variants):
        entries, compiled = [known[v.key] for v in variants], 0
    else:  # the index is rewritten for these variants (Triton's cache keeps recompiling cheap)
        entries, compiled = compile_variants(variants, sm, kernel_dir), len(variants)
    return {"sm": sm, "variants": len(variants), "compiled": compiled, "compile_s": time.perf_counter() - start,
            "dir": str(kernel_dir), "entries": entries}


def shape_kernels(config: ModelConfig, dtype: str, platform: Platform, mode: str,
                  kernel_dir: Path | None = None) -> tuple[object | None, dict]:
    """(KernelLibrary or None, what was loaded) for a random model of `config` in `dtype` on `platform`.

    `mode` is already resolved (see `resolve_mode`). For aot and aot-check the cubins are compiled into
    `kernel_dir` (a new temporary folder when None) and loaded by `load_kernels`, as an engine's are."""
    from nemodiff.plugins.launch import use_interpreter
    from nemodiff.plugins.ops import load_kernels

    if mode == "aot-check":  # before the kernel modules import Triton: its launches are interpreted
        use_interpreter()
    from nemodiff.plugins.registry import engine_variants

    device = platform.device
    info: dict = {"mode": mode}
    if mode in ("off", "interpret", "jit"):
        return load_kernels(None, None, device, mode=mode), info
    if mode not in ("aot", "aot-check"):
        raise ValueError(f"kernels mode {mode!r}: choose one of {', '.join(MODES)}")
    sm = platform.sm if mode == "aot-check" else gpu_sm(device)
    root = Path(kernel_dir) if kernel_dir is not None else Path(tempfile.mkdtemp(prefix="nemodiff-kernels-"))
    compiled = compile_for(engine_variants(config, dtype), sm, root)
    arch = next((a for a, s in ARCH_TO_SM.items() if s == sm), "h100")
    build = BuildSettings(dtype=dtype, arch=arch, block_length=config.block_size, max_seq_len=0, max_batch_size=0,
                          kv_page_size=0, sm=sm, kernels=[{"kernel": e["kernel"], "key": e["key"],
                                                           "file": f"kernels/{sm}/{e['file']}"}
                                                          for e in compiled.pop("entries")])
    library = load_kernels(root, build, device, mode=mode, platform=platform)
    return library, info | compiled
