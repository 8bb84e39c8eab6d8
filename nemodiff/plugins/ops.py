"""`KernelLibrary`: the fused operations the model calls, on one launcher; `load_kernels` picks it.

checkpoint ──builder──▶ engine dir/kernels/<sm>/ ──[runtime: load_kernels → KernelLibrary]──▶ Triton

The same host wrappers run on every launcher: the interpreter (CPU, CI), Triton's JIT (GPU
development and benchmarks) and the ahead-of-time cubins of an engine (serving, no compiler).
Every method has a PyTorch reference in its kernel module; the runtime keeps that reference
path for CPUs and for engines without kernels for this GPU.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nemodiff.device import capturing, is_cuda, multiprocessor_count
from nemodiff.engine_format import BuildSettings

from .launch import InterpretLauncher, JitLauncher, Launcher
from .scratch import Counters

if TYPE_CHECKING:
    from .attention import AttentionMeta, Rope

log = logging.getLogger(__name__)
MODES = ("auto", "aot", "aot-check", "jit", "interpret", "off")
PLAN_BYTES = 256 << 20  # call plans: preallocated outputs and workspaces kept, least recently used out first
# an owner fits the plans to this many steps of its largest token budget (`fit_plans`): one step's layer
# outputs per token (Model.plan_bytes_per_token) and the kernels' workspaces, twice over
PLAN_STEPS = 4


class KernelLibrary:
    """The kernel modules (and with them Triton) are imported here, not when nemodiff is: the
    interpreter must be chosen before Triton's first import (see `launch.use_interpreter`)."""

    def __init__(self, launcher: Launcher, sm_count: int | None = None):
        from . import activation, attention, fp8_gemm, norm

        self.launcher = launcher
        self._activation, self._attention, self._fp8_gemm, self._norm = activation, attention, fp8_gemm, norm
        # split arrivals, zero between launches: one buffer per launch site and stream (see scratch.py)
        self.counters = Counters()
        self.sm_count = sm_count  # the SM count split plans are sized for (None: the device's own)
        # call plans (`_planned`): off unless the owner keeps no output of a call past the next call of the
        # same shape (the model's forward sets it); a call then returns the same output tensor every time
        self.reuse_outputs = False
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self.plan_bytes = PLAN_BYTES  # the most memory the plans' outputs and workspaces hold
        self._plan_bytes = 0

    def fit_plans(self, nbytes: int) -> None:
        """Let the plans hold at least `nbytes` (the outputs of the largest step the owner will run, say): a
        budget below one step's outputs would evict and re-record plans within every forward."""
        self.plan_bytes = max(self.plan_bytes, nbytes)

    def num_sms(self, device: torch.device) -> int:
        return self.sm_count or multiprocessor_count(device, cpu_stand_in=1)

    @property
    def name(self) -> str:
        return self.launcher.name

    def _planned(self, key: tuple, inputs: tuple, call):
        """call(launcher) through its plan: the first call of a key runs the wrapper (checks, variant, grid,
        outputs and workspaces allocated) and records its launches; later calls of the key launch the
        recorded variants on the recorded grids with this call's inputs in their places and the same
        outputs and workspaces (preallocated per shape): no wrapper work at all. Off (the wrapper every
        time) unless `reuse_outputs`, and while a CUDA graph is being captured (its memory is the graph's)."""
        if not self.reuse_outputs or capturing():
            return call(self.launcher)
        plans = self._plans
        plan = plans.get(key)
        if plan is not None:
            plans.move_to_end(key)
            if plan.bound is not None:  # the launcher's own bound launches: only the inputs' addresses written
                for go in plan.bound:
                    go(*inputs)
                return plan.out
            launch = self.launcher.launch
            for variant, grid, arguments in plan.launches:
                launch(variant, grid, arguments(*inputs))
            return plan.out
        recorder = _Recorder(self.launcher)
        out = call(recorder)
        plan = plans[key] = _Plan(recorder.calls, inputs, out, self.launcher)
        self._plan_bytes += plan.nbytes
        while self._plan_bytes > self.plan_bytes and len(plans) > 1:  # least recently used out first
            self._plan_bytes -= plans.popitem(last=False)[1].nbytes
        return out

    def add_rmsnorm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """residual += delta (in place; delta may be None); returns weight * rmsnorm(residual)."""
        return self._planned(("add_rmsnorm", residual.shape, residual.dtype, residual.is_contiguous(), delta is None,
                              eps), (residual, weight) if delta is None else (residual, delta, weight),
                             lambda launcher: self._norm.add_rmsnorm(launcher, residual, delta, weight, eps))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.add_rmsnorm(x, None, weight, eps)

    def segment_attention(self, qkv: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor, rope: Rope,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float,
                          num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """Paged attention of a ragged batch of segments from the fused qkv projection, with RoPE, the query
        scale and the KV-cache write at write_slots >= 0, in one launch (see nemodiff/plugins/attention.py) -> [T, Hq, D]."""
        key = ("segment_attention", qkv.shape, qkv.dtype, k_cache.shape, meta.tile_seg.numel(), meta.num_splits,
               meta.block_m, meta.block_tables.shape, meta.masks.shape, meta.page_size, scale, num_heads, num_kv_heads,
               head_dim, rope.attention_factor, rope.beta, rope.original_max)
        inputs = (qkv, positions, write_slots, rope.inv_freq, k_cache, v_cache, meta.workspace, meta.seg_start,
                  meta.prefix_len, meta.table_row, meta.block_tables, meta.pattern, meta.mask_offset, meta.masks,
                  meta.tile_seg, meta.tile_start)
        return self._planned(key, inputs, lambda launcher: self._attention.segment_attention(
            launcher, qkv, positions, write_slots, rope, k_cache, v_cache, meta, scale, num_heads, num_kv_heads,
            head_dim, counters=self.counters.site("attention")))

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._planned(("silu_mul", gate_up.shape, gate_up.dtype, gate_up.stride()), (gate_up,),
                             lambda launcher: self._activation.silu_mul(launcher, gate_up))

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x @ (weight.float() * scale[:, None]).T in x's dtype; weight float8_e4m3fn [N, K], scale float32 [N]."""
        return self._planned(("fp8_linear", x.shape, x.dtype, x.stride(), weight.shape, weight.dtype, x.device),
                             (x, weight, scale), lambda launcher: self._fp8_gemm.fp8_linear(
                                 launcher, x, weight, scale, num_sms=self.num_sms(x.device),
                                 counters=self.counters.site("gemm")))


    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T in x's dtype (bf16/fp16 weights of x's dtype), on the fp8 product's tiles and K chunks."""
        return self._planned(("dense_linear", x.shape, x.dtype, x.stride(), weight.shape, weight.dtype, x.device),
                             (x, weight), lambda launcher: self._fp8_gemm.dense_linear(
                                 launcher, x, weight, num_sms=self.num_sms(x.device),
                                 counters=self.counters.site("gemm")))


class _Recorder:
    """A launcher stand-in that launches through the real one and records every launch (a call's plan)."""

    def __init__(self, launcher: Launcher):
        self.inner, self.name, self.calls = launcher, launcher.name, []

    def launch(self, variant, grid: tuple[int, ...], args: tuple) -> None:
        self.calls.append((variant, grid, args))
        self.inner.launch(variant, grid, args)


class _Plan:
    """A call's recorded launches: (variant, grid, arguments), where arguments(*inputs) builds the launch's
    argument tuple (a function generated once: the call's inputs in their places, everything else, the
    outputs, workspaces and scalars, as recorded); and where the launcher binds launches (the ahead-of-time
    launcher on a GPU, nemodiff/plugins/aot_launch.py `bind`), `bound`: one function of the inputs per launch."""

    __slots__ = ("launches", "bound", "out", "nbytes")

    def __init__(self, calls: list, inputs: tuple, out, launcher: Launcher):
        self.out = out
        self.launches = [(variant, grid, _arguments(args, inputs)) for variant, grid, args in calls]
        bind = getattr(launcher, "bind", None)
        bound = [bind(variant, grid, args, inputs) for variant, grid, args in calls] if bind is not None else [None]
        self.bound = bound if all(go is not None for go in bound) else None
        held = {id(a): a for _, _, args in calls for a in args if isinstance(a, torch.Tensor)
                and not any(a is t for t in inputs)}
        self.nbytes = sum(a.numel() * a.element_size() for a in held.values())


def _arguments(args: tuple, inputs: tuple):
    names = [f"i{i}" for i in range(len(inputs))]
    scope, parts = {}, []
    for j, arg in enumerate(args):
        place = next((i for i, t in enumerate(inputs) if t is arg), None) if isinstance(arg, torch.Tensor) else None
        if place is None:
            scope[f"k{j}"] = arg
            parts.append(f"k{j}")
        else:
            parts.append(names[place])
    source = f"def arguments({', '.join(names)}):\n    return ({', '.join(parts)}{',' if len(parts) == 1 else ''})"
    exec(compile(source, "<kernel call plan>", "exec"), scope)  # noqa: S102 (generated from the recorded launch)
    return scope["arguments"]


def _gpu_library(kernel_dir: Path, device: torch.device, mode: str, versions=None,
                 sm_count: int | None = None) -> KernelLibrary:
    """The cubins of kernel_dir on this GPU; a driver too old for the installed cuda-bindings raises its
    one line ("aot"), or under "auto" is one warning line and Triton's JIT instead (it needs no bindings).
    `versions`: the seam tests use (nemodiff.cuda_driver.CudaVersions)."""
    from nemodiff.cuda_driver import CudaDriver, DriverTooOld

    from .aot_launch import AotLauncher, CudaLaunch

    try:
        return KernelLibrary(AotLauncher(kernel_dir, CudaLaunch(CudaDriver(device, versions))), sm_count)
    except DriverTooOld as exc:
        if mode != "auto":
            raise
        log.warning("nemodiff: %s; --kernels auto runs Triton's JIT instead of the engine's cubins", exc)
        return KernelLibrary(JitLauncher(), sm_count)


def _aot_library(engine_dir: Path | None, build: BuildSettings | None, device: torch.device,
                 mode: str, platform=None, sm_count: int | None = None) -> KernelLibrary | None:
    """The engine's compiled kernels: launched on this GPU ("auto", "aot"), or checked and interpreted on
    the CPU ("aot-check"). When they cannot run, the reason is raised ("aot", "aot-check") or logged as
    one warning line with None returned ("auto": the reference path; the JIT for a too-old driver)."""
    from nemodiff.device import KernelLaunchError, gpu_sm

    from .aot_launch import AotLauncher

    reason = None
    has_kernels = engine_dir is not None and build is not None and build.sm and build.kernels
    if mode == "aot-check":
        if is_cuda(device):
            reason = "aot-check runs the GPU launch path on the CPU; use --device cpu (on a GPU use --kernels aot)"
        elif not has_kernels:
            reason = ("aot-check needs an engine built for a GPU arch with its kernels (nemodiff-build --arch "
                      "h200, for example); this one carries none")
        else:
            from .aot_check import InterpretDriver, LaunchChecker

            return KernelLibrary(AotLauncher(Path(engine_dir) / "kernels" / build.sm, InterpretDriver(platform),
                                             LaunchChecker(device)), sm_count)
    elif not is_cuda(device):
        if mode == "auto":
            return None  # CPU: the reference path is the plan, not a fallback
        reason = (f"ahead-of-time kernels need a CUDA GPU, not {device}; on the CPU use --kernels aot-check to "
                  "check and interpret them, or --kernels off")
    elif not has_kernels:
        reason = "the engine carries no compiled kernels (built for cpu or with --no-kernels)"
    elif gpu_sm(device) != build.sm:
        reason = f"engine kernels are for {build.sm} but this GPU is {gpu_sm(device)}"
    else:
        try:
            return _gpu_library(Path(engine_dir) / "kernels" / build.sm, device, mode, sm_count=sm_count)
        except ImportError:
            reason = "cuda-python is not installed (pip install 'nemodiff[gpu]')"
        except KernelLaunchError as exc:
            reason = str(exc)
    if mode != "auto":
        raise KernelLaunchError(reason)
    log.warning("nemodiff: %s; using the PyTorch reference path", reason)
    return None


def load_kernels(engine_dir: Path | None, build: BuildSettings | None, device: torch.device | str,
                 mode: str = "auto", platform=None, sm_count: int | None = None) -> KernelLibrary | None:
    """The kernels to run an engine with, or None for the PyTorch reference path.

    mode "off": None. "interpret": Triton's interpreter (CPU tensors; needs no compiled files).
    "jit": Triton's JIT on a CUDA device (development, benchmarks). "aot": the engine's cubins, or an
    error saying why not. "aot-check": on the CPU, the engine's GPU launch path with every launch
    checked against its cubin, then interpreted (nemodiff/plugins/aot_check.py). "auto": the engine's cubins
    on a CUDA device of the engine's sm; on any mismatch (other sm, no kernels, no cuda-python) one
    warning line and None; a driver too old for cuda-bindings: one warning line and the JIT; on CPU None,
    silently. `platform`: the emulated GPU aot-check records its loads and launches for. sm_count: plan
    split grids for a GPU of that many SMs (aot-check at a real GPU's count); None: the device's own (1 on
    the CPU).
    """
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if mode == "interpret":
        return KernelLibrary(InterpretLauncher(), sm_count)
    if mode == "jit":
        if not is_cuda(device):
            raise RuntimeError(f"the JIT launcher needs a CUDA device, not {device}")
        return KernelLibrary(JitLauncher(), sm_count)
    return _aot_library(engine_dir, build, device, mode, platform, sm_count)
