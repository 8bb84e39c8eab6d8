"""Launch-overhead benchmark: host time per ahead-of-time kernel launch, and launches per forward.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: kernel launches, on the CPU]

On a GPU (`device` a CUDA device, the default where there is one) the engine's cubins run as in serving (`kernels="aot"`) and every
timed launch includes the driver call, `cuLaunchKernel` (the device is synchronised between
forwards, outside the timing, so a full launch queue never blocks it). On the CPU, with an engine
built for a GPU arch, the runtime takes its GPU branch (`kernels="aot-check"` without the checks)
and every launch goes through the ahead-of-time launcher up to the driver call, which is left out
(the kernels do not run: host work only). `driver_call` in the report says which. Each step
shape's forward is run `iters` times; per shape it reports the launches per forward, and overall:
- `us_per_launch`: host microseconds per launch in the ahead-of-time launcher, from its `launch`
  call through the driver call (on the CPU: to the left-out driver call);
- `us_per_kernel_call`: the same from the kernel library call, the host wrapper included (choosing
  the variant, allocating outputs, the grid);
- `launches_per_layer`: kernels a transformer layer launches in the AR step at batch 1, counting
  the dense GEMMs (a product left to torch, i.e. one cuBLAS launch on a GPU: fp32 linears; bf16,
  fp16 and fp8 engines run every linear and the head on the project's GEMM, so they count 0).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.layers import KERNEL_DTYPES, DenseLinear

from .steps import STEP_KINDS, _segments, hold_requests

SHAPES = ("ar", "verify-32", "draft-32", "quad-k8")


def _runs_torch(linear: DenseLinear, kernels) -> int:
    """1 when this dense linear's product is torch's (cuBLAS on a GPU), 0 when it runs a Triton kernel."""
    return int(kernels is None or linear.weight.dtype not in KERNEL_DTYPES)


class _Skip:
    """A driver that loads nothing and launches nothing: the driver call left out."""

    def __init__(self, driver):
        self.driver = driver

    def load(self, kernel_dir, entry, variant):
        return None

    def launch(self, prepared, grid, args) -> None:
        return None

    packed = True

    def launch_packed(self, prepared, grid, params_address) -> None:
        return None

    def scratch(self, nbytes: int) -> torch.Tensor:
        return self.driver.scratch(nbytes)


class _Timed:
    """Wraps a KernelLibrary so that the time spent in its methods is summed; with `calls` a list, each
    call's (start, end) is also appended to it, in order."""

    def __init__(self, library, calls: list | None = None):
        self.kernels, self.seconds, self.calls = library, 0.0, calls
        for name in dir(library):
            method = getattr(library, name)
            if callable(method) and not name.startswith("_"):
                setattr(self, name, self._timed(method))

    def _timed(self, method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds += end - start
                if self.calls is not None:
                    self.calls.append((start, end))
        return call

    def __getattr__(self, name):
        return getattr(self.kernels, name)


def launch_overhead(engine_dir: Path, iters: int = 20, context: int = 64, device: str | None = None,
                    sm_count: int | None = None) -> dict:
    from nemodiff import LLM
    from nemodiff.device import is_cuda, resolve_device, synchronize

    gpu = is_cuda(resolve_device(device))
    llm = LLM(engine_dir, device=device, kernels="aot" if gpu else "aot-check", cuda_graphs=False, max_batch_size=1,
              sm_count=sm_count)
    model = llm.model
    model.platform.bind_thread()  # the benchmark's thread launches on the engine's device and stream
    launcher = model.kernels.launcher
    if not gpu:
        launcher.checker = None  # serving runs no checks
        launcher.driver = _Skip(launcher.driver)
    timed = _Timed(model.kernels)
    model.kernels = timed
    launch, in_launcher = launcher.launch, [0.0]

    def timed_launch(variant, grid, args):
        start = time.perf_counter()
        launch(variant, grid, args)
        in_launcher[0] += time.perf_counter() - start
    launcher.launch = timed_launch
    bind = launcher.bind

    def timed_bind(variant, grid, args, inputs):  # a call plan's launches: the bound launch timed as a launch
        go = bind(variant, grid, args, inputs)
        if go is None:
            return None

        def timed_go(*tensors):
            start = time.perf_counter()
            go(*tensors)
            in_launcher[0] += time.perf_counter() - start
        return timed_go
    launcher.bind = timed_bind
    dense_calls = [0]
    call = DenseLinear.__call__

    def counted(self, x, kernels=None):
        dense_calls[0] += _runs_torch(self, kernels)
        return call(self, x, kernels)

    cfg = model.config
    shapes = SHAPES
    rows, total_launches, total_seconds, total_launching = [], 0, 0.0, 0.0
    DenseLinear.__call__ = counted
    try:
        for kind in shapes:
            n = STEP_KINDS[kind][0]
            pages = -(-(context + n + 8) // llm.config.build.kv_page_size)
            cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim,
                                 llm.config.build.kv_page_size, pages + 1, model.dtype, model.platform,
                                 max_pages_per_request=pages)
            hold_requests(cache, [context], context + n + 8)
            segments = _segments(kind, 1, context)
            model.forward(segments, cache)  # warm: variants prepared, buffers grown
            synchronize(model.device)
            launches, dense_calls[0] = launcher.launches, 0
            seconds, launching = timed.seconds, in_launcher[0]
            for _ in range(iters):
                model.forward(segments, cache)
                synchronize(model.device)  # outside the timed calls: the launch queue stays empty
            per_forward = (launcher.launches - launches) / iters
            dense = dense_calls[0] / iters  # products left to torch (cuBLAS on a GPU), the head included
            total_launches += launcher.launches - launches
            total_seconds += timed.seconds - seconds
            total_launching += in_launcher[0] - launching
            rows.append({"shape": kind, "tokens": n, "triton_launches": per_forward,
                         "dense_gemms": max(dense, 0.0), "launches": per_forward + max(dense, 0.0)})
    finally:
        DenseLinear.__call__ = call
    ar = next(r for r in rows if r["shape"] == "ar")
    outside = 2  # the launches outside the layers: the final norm and the head (a kernel or a dense GEMM)
    per_layer = (ar["triton_launches"] + ar["dense_gemms"] - outside) / cfg.num_hidden_layers
    return {"engine": str(engine_dir), "dtype": llm.config.build.dtype, "sm": llm.config.build.sm,
            "device": str(model.device),
            "driver_call": "included (cuLaunchKernel)" if gpu else "left out (aot-check on the CPU)",
            "layers": cfg.num_hidden_layers, "us_per_launch": 1e6 * total_launching / max(total_launches, 1),
            "us_per_kernel_call": 1e6 * total_seconds / max(total_launches, 1),
            "launches_per_layer": per_layer,
            "launches_per_forward": {r["shape"]: r["launches"] for r in rows}, "shapes": rows}


def format_report(report: dict) -> str:
    lines = [f"{'shape':12s} {'tokens':>6s} {'triton':>7s} {'gemms':>6s} {'launches':>9s}"]
    for r in report["shapes"]:
        lines.append(f"{r['shape']:12s} {r['tokens']:6d} {r['triton_launches']:7.1f} {r['dense_gemms']:6.1f} "
                     f"{r['launches']:9.1f}")
    lines.append(f"host time per launch: {report['us_per_launch']:.2f} us in the launcher, "
                 f"{report['us_per_kernel_call']:.2f} us from the kernel call (driver call {report['driver_call']}); "
                 f"launches per layer, AR batch 1: {report['launches_per_layer']:.1f}")
    return "\n".join(lines)


def forward_host_cost(model, page_size: int, context: int, iters: int = 10, kind: str = "ar") -> dict:
    """Host time of one eager forward of `kind` at batch 1 on the model's real kernel path (on a GPU: the
    ahead-of-time launcher and the CUDA driver calls, graphs left aside), and its launches.

    The host clock stops when `forward` returns, before the device has finished (launches are
    asynchronous), so it measures what the host pays per step when no graph is replayed: batch packing,
    metadata, every kernel launch. Reports launches per forward and per layer (dense GEMMs counted as one
    cuBLAS launch each, as `launch_overhead` counts them), host ms per forward and host µs per launch, and
    the device time of the same forward."""
    from nemodiff.cuda_driver import Timer
    from nemodiff.device import synchronize

    kernels = model.kernels
    if kernels is None:
        return {}
    launcher, cfg = kernels.launcher, model.config
    dense_calls = [0]
    call = DenseLinear.__call__

    def dense(self, x, kernels=None):
        dense_calls[0] += _runs_torch(self, kernels)
        return call(self, x, kernels)

    n = STEP_KINDS[kind][0]
    pages = -(-(context + n + 8) // page_size)
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, page_size, pages + 1, model.dtype,
                         model.platform, max_pages_per_request=pages)
    hold_requests(cache, [context], context + n + 8)
    segments = _segments(kind, 1, context)
    graphs, model.graphs = model.graphs, None
    DenseLinear.__call__ = dense
    try:
        model.forward(segments, cache)  # warm: buffers grown, variants prepared
        synchronize(model.device)
        dense_calls[0] = 0
        before = launcher.launches  # every launcher counts its launches (bound ones included)
        host = device = 0.0
        for _ in range(iters):
            with Timer(model.device) as timer:
                start = time.perf_counter()
                model.forward(segments, cache)
                host += time.perf_counter() - start
            device += timer.ms
        counted = launcher.launches - before
    finally:
        DenseLinear.__call__ = call
        model.graphs = graphs
    launches = counted / iters
    gemms = dense_calls[0] / iters  # products left to torch (cuBLAS on a GPU), the head included
    return {"kind": kind, "context": context, "launcher": launcher.name, "triton_launches_per_forward": launches,
            "dense_gemms_per_forward": gemms, "launches_per_forward": launches + gemms,
            "launches_per_layer": (launches + gemms - 2) / cfg.num_hidden_layers,  # less the final norm and head
            "host_ms_per_forward": 1e3 * host / iters, "host_us_per_launch": 1e6 * host / iters / max(launches + gemms, 1),
            "device_ms_per_forward": device / iters}
