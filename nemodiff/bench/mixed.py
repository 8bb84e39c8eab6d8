"""Mixed-step host cost: a prefill chunk beside decodes, on the eager kernel path, per kind of decode.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: host ms of a mixed step at a named shape]

A step that carries a prefill chunk beside decodes replays no CUDA graph (graphs are steady decode
shapes): every layer calls its kernels eagerly, through their call plans (nemodiff/plugins/ops.py) and,
on the ahead-of-time path, bound launches. `nemodiff bench --shape S --mixed-step` measures what the host
pays for such a step: `decodes` requests of one step kind (ar, draft-32, verify-32, quad-k8) at `context`
cached tokens and one `chunk`-token prefill chunk, on the ahead-of-time launch path (on the CPU under
aot-check with its checks off and the driver call left out: nothing runs). A random model of the shape
is built with `MEASURED_LAYERS` layers (and a small vocabulary, `MEASURED_VOCAB`) and the host work of its forward is taken apart with clocks around
the kernel library's calls:
- outside: the forward's wall time less `Model._run` (batch packing, uploads, attention metadata);
- first layer: from the start of its first kernel call to the end of its last (every call's wrapper
  and launch, and the Python between them);
- per layer: the same for each later layer, averaged (on the CPU the first layer runs on caches the
  embedding gather's copy just swept, so it is kept apart: conservative, a GPU host makes no such copy);
- tail: the final norm's and the head's calls.
host ms = outside + first layer + (the shape's layers - 1) x per layer + tail. Left out: the dispatch of the forward's four
torch ops outside the kernels (the embedding gather, the logit rows' gather and residual add, the float32
logits), a few microseconds each on a GPU; on the CPU they are real copies of megabytes, which a GPU only
enqueues, so the forward's own wall time would not say what the host pays there.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from nemodiff.device import is_cuda, synchronize
from nemodiff.plugins.ops import PLAN_STEPS
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.segments import Pattern, Segment

from .launches import _Skip, _Timed
from .steps import STEP_KINDS, _segments, hold_requests

MIXED_KINDS = ("ar", "draft-32", "verify-32", "quad-k8")
MEASURED_LAYERS = 3
MEASURED_VOCAB = 2048  # the head's calls do not depend on it; the CPU's copy of float32 logits does
TAIL_CALLS = 2  # the final norm and the head


def _cache(model, decodes: int, chunk: int, context: int, page_size: int) -> PagedKVCache:
    cfg = model.config
    longest = max(context + 128, chunk) + 8
    pages = -(-longest // page_size)
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, page_size, (decodes + 1) * pages + 1,
                         model.dtype, model.platform, max_pages_per_request=pages, max_requests=decodes + 2)
    hold_requests(cache, [context] * decodes + [0], longest)
    return cache


def _one_forward(model, clocked, segments, cache, layers: int) -> tuple[float, float, float, float]:
    """(outside, first layer, each later layer, tail) seconds of one forward."""
    run, inside = model._run, [0.0]

    def timed_run(*args):
        start = time.perf_counter()
        try:
            return run(*args)
        finally:
            inside[0] = time.perf_counter() - start
    model._run = timed_run
    clocked.calls.clear()
    try:
        start = time.perf_counter()
        logits = model.forward(segments, cache)
        wall = time.perf_counter() - start
        del logits  # freed outside the clock
    finally:
        del model._run  # the class's method again
    calls = clocked.calls
    per = (len(calls) - TAIL_CALLS) // layers
    spans = [calls[(i + 1) * per - 1][1] - calls[i * per][0] for i in range(layers)]
    tail = sum(end - begin for begin, end in calls[-TAIL_CALLS:])
    return wall - inside[0], spans[0], sum(spans[1:]) / (layers - 1), tail


def mixed_step_host(shape: str, dtype: str, platform, mode: str, kernel_dir=None, decodes: int = 32, chunk: int = 512,
                    context: int = 2048, iters: int = 9, page_size: int = 16, on_result=None) -> list[dict]:
    """Per kind of decode: the step's host ms for the shape's layers and its parts (see the module docstring)."""
    from .kernels import shape_kernels
    from .shapes import random_model, shape_config

    base = shape_config(shape)
    gpu = is_cuda(platform.device)
    config = dataclasses.replace(base, num_hidden_layers=MEASURED_LAYERS, vocab_size=MEASURED_VOCAB)
    rows = []
    with torch.inference_mode():  # as the engine steps
        model = random_model(config, dtype, platform)[0]
        model.kernels, _ = shape_kernels(config, dtype, platform, mode, kernel_dir)
        launcher = model.kernels.launcher
        if not gpu:  # host work alone: no checks, no interpreted kernels
            launcher.checker = None
            launcher.driver = _Skip(launcher.driver)
        tokens = max(decodes * STEP_KINDS[kind][0] for kind in MIXED_KINDS) + chunk
        model.kernels.fit_plans(PLAN_STEPS * tokens * model.plan_bytes_per_token())  # as LLM fits them to its budget
        clocked = model.kernels = _Timed(model.kernels, calls=[])  # every call's (start, end)
        for kind in MIXED_KINDS:
            cache = _cache(model, decodes, chunk, context, page_size)
            segments = _segments(kind, decodes, context) + [
                Segment(decodes, [5] * chunk, list(range(chunk)), 0, Pattern.CAUSAL, True, [chunk - 1])]
            model.forward(segments, cache)  # plans recorded, buffers grown
            before = launcher.launches
            parts = []
            for _ in range(iters):
                parts.append(_one_forward(model, clocked, segments, cache, MEASURED_LAYERS))
                synchronize(model.device)
            outside, first, per_layer, tail = (1e3 * statistics.median(p) for p in zip(*parts))
            launches = (launcher.launches - before) / iters
            row = {"kind": kind, "decodes": decodes, "chunk": chunk, "context": context,
                   "tokens": sum(len(s.token_ids) for s in segments), "layers": base.num_hidden_layers,
                   "outside_ms": outside, "first_layer_ms": first, "per_layer_ms": per_layer, "tail_ms": tail,
                   "host_ms": outside + first + (base.num_hidden_layers - 1) * per_layer + tail,
                   "launches_per_layer": (launches - TAIL_CALLS) / MEASURED_LAYERS,
                   "us_per_layer_launch": 1e3 * per_layer / max((launches - TAIL_CALLS) / MEASURED_LAYERS, 1),
                   "driver_call": "included (cuLaunchKernel)" if gpu else "left out (aot-check on the CPU)"}
            rows.append(row)
            if on_result is not None:
                on_result(row)
            del cache
    return rows


def bench_mixed(shape: str | None, dtype: str, device: str | None, kernels: str, sm: str, sm_count: int | None,
                kernel_dir, on_result=None) -> dict:
    """`nemodiff bench --mixed-step`: the report, dated (ValueError when the options cannot run it)."""
    from nemodiff.device import resolve_device

    from .kernels import kernel_platform, resolve_mode

    dev = resolve_device(device)
    mode = resolve_mode(kernels, dev)
    if shape is None or mode not in ("aot", "aot-check"):
        raise ValueError("--mixed-step needs --shape and --kernels aot (a GPU) or aot-check (the CPU)")
    platform = kernel_platform(dev, mode, sm, sm_count)
    report = {"date": time.strftime("%Y-%m-%d"), "shape": shape, "dtype": dtype, "kernels": mode, "sm": sm}
    report["mixed_step"] = mixed_step_host(shape, dtype, platform, mode, kernel_dir, on_result=on_result)
    return report


def format_mixed(rows: list[dict]) -> str:
    lines = [f"{'decodes':10s} {'tokens':>6s} {'outside ms':>10s} {'first layer ms':>14s} {'per layer ms':>12s} "
             f"{'tail ms':>8s} {'host ms':>8s} {'us/launch':>9s}"]
    for r in rows:
        lines.append(f"{r['kind']:10s} {r['tokens']:6d} {r['outside_ms']:10.3f} {r['first_layer_ms']:14.4f} "
                     f"{r['per_layer_ms']:12.4f} {r['tail_ms']:8.3f} {r['host_ms']:8.2f} "
                     f"{r['us_per_layer_launch']:9.2f}")
    if rows:
        r = rows[0]
        lines.append(f"{r['decodes']} decodes of each kind beside one {r['chunk']}-token chunk at {r['context']} cached "
                     f"tokens, host ms for {r['layers']} layer{'s' if r['layers'] != 1 else ''} "
                     f"({r['launches_per_layer']:.0f} launches per layer; "
                     f"measured at {MEASURED_LAYERS}); driver call {r['driver_call']}")
    return "\n".join(lines)
