"""Ahead-of-time compilation of the CUDA kernels with nvcc, one shared library per target SM.

checkpoint ──[builder: compiles these]──▶ engine dir/kernels/<sm>/ ──runtime (loads them)──▶ Triton
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("attention.cu", "decode.cu")
LIBRARY_NAME = "libnemodiff_kernels.so"
KERNELS = ("segment_attention", "row_argmax_prob", "denoise_select", "spec_accept", "add_rmsnorm")
GENCODE = {
    "sm_80": "arch=compute_80,code=sm_80",
    "sm_89": "arch=compute_89,code=sm_89",
    "sm_90a": "arch=compute_90a,code=sm_90a",
    "sm_100a": "arch=compute_100a,code=sm_100a",
}


class KernelBuildError(Exception):
    """nvcc is missing or failed; the message says which and how to fix it."""


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    wheel = glob.glob(str(Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "**" / "bin" / "nvcc"), recursive=True)
    return wheel[0] if wheel else None


def compile_kernels(sm: str, out_dir: Path, nvcc: str | None = None) -> Path:
    """Compile every kernel for `sm` into out_dir/libnemodiff_kernels.so; returns its path."""
    if sm not in GENCODE:
        raise KernelBuildError(f"no kernel target for {sm!r}; known: {', '.join(GENCODE)}")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: install the CUDA toolkit (or `pip install nvidia-cuda-nvcc`) "
                               "or build with --no-kernels")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / LIBRARY_NAME
    command = [nvcc, "-O3", "-std=c++17", f"-gencode={GENCODE[sm]}", "-Xcompiler", "-fPIC", "-shared",
               "-I", str(SOURCE_DIR), *[str(SOURCE_DIR / s) for s in SOURCES], "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KernelBuildError(f"nvcc failed for {sm} (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    return library
