"""Mixed-step host cost: a prefill chunk beside decodes, on the eager kernel path, per kind of decode.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: host ms of a mixed step at a named shape]

A step that carries a prefill chunk beside decodes replays no CUDA graph (graphs are steady decode
shapes): every layer calls its kernels eagerly, through their call plans (nemodiff/plugins/ops.py) and,
on the ahead-of-time path, bound launches. `nemodiff bench --shape S --mixed-step` measures what the host
pays for such a step: `decodes` requests of one step kind (ar, draft-32, verify-32, quad-k8) at `context`
cached tokens and one `chunk`-token prefill chunk, on the ahead-of-time launch path. On a GPU the
kernels run; on the CPU (aot-check, its checks off) the driver call is left out and nothing runs: the
forward's wall time is its host work. A random model of the shape is built at 2 and at 4 layers; the
difference is the per-layer cost, extrapolated to the shape's layers: host ms = outside + layers x per
layer (outside: batch packing, attention metadata and uploads, the embedding gather, the head). On the
CPU the embedding gather and the uploads are real memory copies that a GPU would only enqueue: the
report gives the gather's own time (`embed_ms`) to read the figure with or without it.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from nemodiff.device import is_cuda, synchronize
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.segments import Pattern, Segment

from .steps import _segments

MIXED_KINDS = ("ar", "draft-32", "verify-32", "quad-k8")
LAYER_COUNTS = (2, 4)


def _best_ms(fn, device: torch.device, iters: int) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        synchronize(device)  # outside the clock: a full launch queue never blocks the host
    return 1e3 * best


def _cache(model, decodes: int, chunk: int, context: int, page_size: int) -> PagedKVCache:
    cfg = model.config
    longest = max(context + 128, chunk) + 8
    pages = -(-longest // page_size)
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, page_size, (decodes + 1) * pages + 1,
                         model.dtype, model.platform, max_pages_per_request=pages, max_requests=decodes + 2)
    for rid in range(decodes + 1):
        cache.add_request(rid)
        cache.reserve(rid, longest)
        cache.set_length(rid, context if rid < decodes else 0)
    return cache


def mixed_step_host(shape: str, dtype: str, platform, mode: str, kernel_dir=None, decodes: int = 32, chunk: int = 512,
                    context: int = 2048, iters: int = 9, page_size: int = 16, on_result=None) -> list[dict]:
    """Per kind: host ms of the mixed step at 2 and 4 layers, per layer, outside the layers, extrapolated to
    the shape's layers, the embedding gather's own ms and the launches per forward."""
    from .kernels import shape_kernels
    from .launches import _Skip
    from .shapes import random_model, shape_config

    base = shape_config(shape)
    gpu = is_cuda(platform.device)
    measured: dict[str, dict] = {kind: {} for kind in MIXED_KINDS}
    for layers in LAYER_COUNTS:
        config = dataclasses.replace(base, num_hidden_layers=layers)
        model = random_model(config, dtype, platform)[0]
        model.kernels, _ = shape_kernels(config, dtype, platform, mode, kernel_dir)
        launcher = model.kernels.launcher
        if not gpu:  # host work alone: no checks, no interpreted kernels
            launcher.checker = None
            launcher.driver = _Skip(launcher.driver)
        for kind in MIXED_KINDS:
            cache = _cache(model, decodes, chunk, context, page_size)
            segments = _segments(kind, decodes, context) + [
                Segment(decodes, [5] * chunk, list(range(chunk)), 0, Pattern.CAUSAL, True, [chunk - 1])]
            before = launcher.launches
            ms = _best_ms(lambda: model.forward(segments, cache), model.device, iters)
            launches = (launcher.launches - before) / (iters + 1)
            ids = model.build_batch(segments, cache).ids
            embed_ms = _best_ms(lambda: model.embed[ids], model.device, iters)
            measured[kind][layers] = {"ms": ms, "launches": launches, "embed_ms": embed_ms,
                                      "tokens": sum(len(s.token_ids) for s in segments)}
            del cache
        del model
    rows = []
    low, high = LAYER_COUNTS
    for kind in MIXED_KINDS:
        at = measured[kind]
        per_layer = (at[high]["ms"] - at[low]["ms"]) / (high - low)
        outside = at[low]["ms"] - low * per_layer
        host = outside + base.num_hidden_layers * per_layer
        row = {"kind": kind, "decodes": decodes, "chunk": chunk, "context": context, "tokens": at[low]["tokens"],
               "layers": base.num_hidden_layers, "ms_at_layers": {str(n): at[n]["ms"] for n in LAYER_COUNTS},
               "per_layer_ms": per_layer, "outside_ms": outside, "host_ms": host,
               "embed_ms": min(at[n]["embed_ms"] for n in LAYER_COUNTS),
               "launches_per_layer": (at[high]["launches"] - at[low]["launches"]) / (high - low),
               "driver_call": "included (cuLaunchKernel)" if gpu else "left out (aot-check on the CPU)"}
        row["host_ms_without_embed"] = host - row["embed_ms"]
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


def format_mixed(rows: list[dict]) -> str:
    lines = [f"{'decodes':10s} {'tokens':>6s} {'per layer ms':>12s} {'outside ms':>10s} {'embed ms':>8s} "
             f"{'host ms':>8s} {'w/o embed':>9s} {'launches/layer':>14s}"]
    for r in rows:
        lines.append(f"{r['kind']:10s} {r['tokens']:6d} {r['per_layer_ms']:12.3f} {r['outside_ms']:10.3f} "
                     f"{r['embed_ms']:8.3f} {r['host_ms']:8.2f} {r['host_ms_without_embed']:9.2f} "
                     f"{r['launches_per_layer']:14.1f}")
    if rows:
        r = rows[0]
        lines.append(f"{r['decodes']} decodes of each kind beside one {r['chunk']}-token chunk at {r['context']} cached "
                     f"tokens, {r['layers']} layers (measured at {' and '.join(map(str, LAYER_COUNTS))}); driver call "
                     f"{r['driver_call']}")
    return "\n".join(lines)
