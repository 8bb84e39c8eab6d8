"""`KernelLibrary`: the fused operations the model calls, on one launcher; `load_kernels` picks it.

checkpoint ──builder──▶ engine dir/kernels/<sm>/ ──[runtime: load_kernels → KernelLibrary]──▶ Triton

The same host wrappers run on every launcher: the interpreter (CPU, CI), Triton's JIT (GPU
development and benchmarks) and the ahead-of-time cubins of an engine (serving, no compiler).
Every method has a PyTorch reference in its kernel module; the runtime keeps that reference
path for CPUs and for engines without kernels for this GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nemodiff.engine_format import BuildSettings

from .launch import InterpretLauncher, JitLauncher, Launcher, sm_count
from .scratch import Counters

if TYPE_CHECKING:
    from .attention import AttentionMeta, Rope

log = logging.getLogger(__name__)
MODES = ("auto", "aot", "jit", "interpret", "off")


def gpu_sm(device: torch.device) -> str:
    """The engine-format name of a GPU's architecture: sm_80, sm_89, sm_90a, sm_100a..."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


class KernelLibrary:
    """The kernel modules (and with them Triton) are imported here, not when nemodiff is: the
    interpreter must be chosen before Triton's first import (see `launch.use_interpreter`)."""

    def __init__(self, launcher: Launcher):
        from . import activation, attention, fp8_gemm, norm

        self.launcher = launcher
        self._activation, self._attention, self._fp8_gemm, self._norm = activation, attention, fp8_gemm, norm
        self.counters = Counters()  # split arrivals of attention and fp8 GEMMs; zero between launches

    @property
    def name(self) -> str:
        return self.launcher.name

    def add_rmsnorm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """residual += delta (in place; delta may be None); returns weight * rmsnorm(residual)."""
        return self._norm.add_rmsnorm(self.launcher, residual, delta, weight, eps)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm.rms_norm(self.launcher, x, weight, eps)

    def segment_attention(self, qkv: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor, rope: Rope,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float,
                          num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """Paged attention of a ragged batch of segments from the fused qkv projection, with RoPE, the query
        scale and the KV-cache write at write_slots >= 0, in one launch (see plugins/attention.py) -> [T, Hq, D]."""
        return self._attention.segment_attention(self.launcher, qkv, positions, write_slots, rope, k_cache, v_cache,
                                                 meta, scale, num_heads, num_kv_heads, head_dim,
                                                 counters=self.counters)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._activation.silu_mul(self.launcher, gate_up)

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x @ (weight.float() * scale[:, None]).T in x's dtype; weight float8_e4m3fn [N, K], scale float32 [N]."""
        return self._fp8_gemm.fp8_linear(self.launcher, x, weight, scale, num_sms=sm_count(x.device, cpu_stand_in=1),
                                         counters=self.counters)


def _aot_library(engine_dir: Path | None, build: BuildSettings | None, device: torch.device,
                 strict: bool) -> KernelLibrary | None:
    """The engine's compiled kernels on this GPU, or the reason they cannot run here (raised when strict,
    else logged as one warning line, with None returned)."""
    reason = None
    if device.type != "cuda":
        if not strict:
            return None  # CPU: the reference path is the plan, not a fallback
        reason = f"ahead-of-time kernels need a CUDA device, not {device}"
    elif engine_dir is None or build is None or not build.sm or not build.kernels:
        reason = "the engine carries no compiled kernels (built for cpu or with --no-kernels)"
    elif gpu_sm(device) != build.sm:
        reason = f"engine kernels are for {build.sm} but this GPU is {gpu_sm(device)}"
    else:
        from .aot import AotLauncher, KernelLaunchError, cuda_driver

        try:
            cuda_driver()
            return KernelLibrary(AotLauncher(Path(engine_dir) / "kernels" / build.sm))
        except ImportError:
            reason = "cuda-python is not installed (pip install 'nemodiff[gpu]')"
        except KernelLaunchError as exc:
            reason = str(exc)
    if strict:
        raise RuntimeError(reason)
    log.warning("nemodiff: %s; using the PyTorch reference path", reason)
    return None


def load_kernels(engine_dir: Path | None, build: BuildSettings | None, device: torch.device | str,
                 mode: str = "auto") -> KernelLibrary | None:
    """The kernels to run an engine with, or None for the PyTorch reference path.

    mode "off": None. "interpret": Triton's interpreter (CPU tensors; needs no compiled files).
    "jit": Triton's JIT on a CUDA device (development, benchmarks). "aot": the engine's cubins, or an
    error saying why not. "auto": the engine's cubins on a CUDA device of the engine's sm; on any
    mismatch (other sm, no kernels, no cuda-python) one warning line and None; on CPU None, silently.
    """
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if mode == "interpret":
        return KernelLibrary(InterpretLauncher())
    if mode == "jit":
        if device.type != "cuda":
            raise RuntimeError(f"the JIT launcher needs a CUDA device, not {device}")
        return KernelLibrary(JitLauncher())
    return _aot_library(engine_dir, build, device, strict=mode == "aot")
