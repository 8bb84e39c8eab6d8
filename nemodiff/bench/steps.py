"""Benchmarks: forward latency per step shape, end-to-end decoding per mode, machine ceilings.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: step latencies, end to end, ceilings]

Numbers come from running things, never from assertions: `nemodiff bench` prints a table
and writes JSON (and PNG plots when matplotlib is available).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch

from nemodiff.cuda_driver import Timer
from nemodiff.device import is_cuda, synchronize
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.segments import Pattern, Segment
from nemodiff.runtime.model.transformer import Model


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(min(warmup, iters - 1)):  # a single timed run (a smoke test) goes unwarmed
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _device_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> list[float]:
    """Per-call device time (on a GPU from CUDA events: host launch overhead excluded)."""
    times = []
    for _ in range(iters):
        with Timer(device) as timer:
            fn()
        times.append(timer.ms / 1e3)
    return times


def machine_ceilings(device: torch.device) -> dict:
    """Measured copy bandwidth (bytes read + written) and bf16 (CPU: fp32) matmul rate.

    On a GPU the copy moves 2 GiB (1 GiB read + 1 GiB written, far past any cache), timed with
    CUDA events over 10 repetitions; the median is reported."""
    gpu = is_cuda(device)
    big = (1 << 30) if gpu else (1 << 24)
    src = torch.empty(big // 4, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = statistics.median(_device_seconds(lambda: dst.copy_(src), device, 10 if gpu else 5))
    n = 8192 if gpu else 1024
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm = median_seconds(lambda: a @ b, device, 5)
    return {"copy_bytes_per_s": 2 * big / t_copy, "copy_bytes": 2 * big, "matmul_flops_per_s": 2 * n ** 3 / t_mm,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def weight_bytes(model: Model) -> int:
    """Bytes a decode step reads: every weight except the embedding table (a step reads a few rows of it)."""
    tensors, linears = [model.final_norm], [model.head]
    for layer in model.layers:
        tensors += [layer.attn_norm, layer.mlp_norm]
        linears += [layer.qkv, layer.o, layer.gate_up, layer.down]
    tensors += [lin.weight for lin in linears] + [lin.scale for lin in linears if hasattr(lin, "scale")]
    return sum(t.numel() * t.element_size() for t in tensors)


STEP_KINDS = {
    # name: (tokens per segment, pattern, writes, steady shape) -- QuadraticSpec k gives k * (k + 1) tokens
    "ar": (1, Pattern.CAUSAL, True, ("ar",)),
    "verify-32": (32, Pattern.CAUSAL, True, ("verify", 32)),
    "draft-32": (32, Pattern.FULL, False, ("draft", 32, False)),
    "quad-k8": (72, Pattern.MASK, None, ("quad", 8)),
    "quad-k32": (1056, Pattern.MASK, None, ("quad", 32)),
}


PUBLISHED_TPF = {"ar": 1.0, "diffusion": 2.6, "linear-spec": 6.0, "quadratic-spec": 6.4}  # docs/design.md §1, NLD-8B
PROJECTION_BASIS = {
    "diffusion": "32-token blocks at 2.6 tokens per forward: 32 / 2.6 - 1 denoising forwards (the draft-32 shape: "
                 "32 full tokens, no KV write) and one commit forward (the verify-32 shape) per block",
    "linear-spec": "6.0 tokens per cycle of one draft-32 and one verify-32 forward (conservative: the cycle, not "
                   "each of its two forwards, counted as the published forward)",
    "quadratic-spec (k=8)": "6.4 tokens per QuadraticSpec k = 8 forward (72 tokens)",
}


def projected_tokens_per_s(step_ms: dict[str, float]) -> dict[str, float]:
    """Tokens/s of diffusion and the spec modes projected from the measured batch-1 step latencies at the
    published tokens per forward (random weights reject every draft, so measured spec-mode tokens/s say
    nothing about a trained model); PROJECTION_BASIS says how each is counted."""
    block = STEP_KINDS["draft-32"][0]
    denoise = block / PUBLISHED_TPF["diffusion"] - 1
    return {"diffusion": 1e3 * block / (denoise * step_ms["draft-32"] + step_ms["verify-32"]),
            "linear-spec": 1e3 * PUBLISHED_TPF["linear-spec"] / (step_ms["draft-32"] + step_ms["verify-32"]),
            "quadratic-spec (k=8)": 1e3 * min(PUBLISHED_TPF["quadratic-spec"], 8) / step_ms["quad-k8"]}


def hold_requests(cache: PagedKVCache, lengths: list[int], room: int) -> None:
    """Requests 0, 1, ... in the cache with lengths[i] committed tokens each and pages for `room` tokens."""
    for rid, length in enumerate(lengths):
        cache.add_request(rid)
        cache.reserve(rid, room)
        cache.set_length(rid, length)
        cache.reserve(rid, room)


def _segments(kind: str, batch: int, context: int) -> list[Segment]:
    """The segments of one step of `kind` for `batch` requests, as the strategies build them."""
    from nemodiff.runtime.model.segments import cycle_layout

    n, pattern, writes, shape = STEP_KINDS[kind]
    out = []
    for rid in range(batch):
        if pattern is Pattern.MASK:
            k = shape[1]
            mask, offsets, write_flags, rows = cycle_layout(k)
            out.append(Segment(rid, [100] * n, offsets + context, context, Pattern.MASK, write_flags, rows, mask,
                               shape_key=shape))
        else:
            rows = [0] if n == 1 else (list(range(n)) if writes else list(range(1, n)))
            out.append(Segment(rid, [5] * n, list(range(context, context + n)), context, pattern, writes, rows,
                               shape_key=shape))
    return out


def step_latencies(model: Model, kinds: list[str], batch_sizes: list[int], context: int, page_size: int,
                   iters: int, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Median forward time for each step kind and batch size at a `context`-token committed prefix.

    On the GPU kernel path the shapes are captured as CUDA graphs first, as the engine does, and on the
    CPU under aot-check the same static, padded path runs eagerly; a result is labelled "graph" only when
    its forwards really replayed one ("captured" says whether that was a CUDA graph)."""
    cfg, device = model.config, model.device
    results, engine_graphs = [], model.graphs
    for batch in batch_sizes:
        per_seq = -(-(context + 1100) // page_size)
        cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, page_size,
                             batch * per_seq + 1, model.dtype, device, max_pages_per_request=per_seq)
        runner = None
        # time what serving runs: graph replays (tensor-parallel steps run eagerly here: the workers capture
        # graphs only with an engine)
        if model.uses_kernels(cache) and model.platform.gpu_path and model.driver is None:
            from nemodiff.runtime.model.graphs import GraphRunner

            runner = model.graphs = GraphRunner(model, cache, context + 1100, buckets=(batch,))
            runner.capture_steady_shapes([STEP_KINDS[k][3] for k in kinds if k != "quad-k32" or batch == 1])
        cache.k.normal_()
        cache.v.normal_()
        hold_requests(cache, [context] * batch, context + 1100)
        for kind in kinds:
            if kind == "quad-k32" and batch > 1:
                continue
            segments = _segments(kind, batch, context)
            replays = runner.replays if runner is not None else 0
            seconds = median_seconds(lambda s=segments, c=cache: model.forward(s, c), device, iters)
            graph = runner is not None and runner.replays > replays
            row = {"kind": kind, "batch": batch, "tokens": sum(len(s) for s in segments), "ms": seconds * 1e3,
                   "graph": graph, "captured": graph and runner.capture}
            results.append(row)
            if on_result is not None:
                on_result(row)
        model.graphs = None
        del cache
    model.graphs = engine_graphs
    return results


def tensor_parallel_steps(shape: str, dtype: str, device: torch.device, tp: int, batch_sizes: list[int],
                          context: int, page_size: int, iters: int, single: list[dict], kernels: str = "off",
                          kernel_dir=None, sm: str | None = None) -> dict:
    """Step latencies of the random `shape` model split over `tp` ranks, and AR batch 1 against one rank.

    `kernels` is a resolved `bench.kernels` mode: rank 0 compiles the rank geometry's variants (aot,
    aot-check) into `kernel_dir` (a temporary folder when None) before the workers start, and every
    worker loads that folder."""
    import tempfile
    from pathlib import Path

    from nemodiff.builder.build import rank_config
    from nemodiff.device import rank_devices
    from nemodiff.runtime.parallel.driver import TensorParallelDriver

    from .kernels import kernel_platform, shape_kernels
    from .shapes import random_model, shape_config

    devices = rank_devices(device, tp)
    root = Path(kernel_dir) if kernel_dir is not None else Path(tempfile.mkdtemp(prefix="nemodiff-kernels-"))
    config = shape_config(shape)
    platform = kernel_platform(devices[0], kernels, sm)
    model = random_model(config, dtype, platform, tp_rank=0, tp_size=tp)[0]
    model.kernels = shape_kernels(rank_config(config, tp), dtype, platform, kernels, root)[0]
    driver = TensorParallelDriver.launch(devices, {"model_factory": "nemodiff.bench.shapes:worker_model",
                                                   "factory_args": {"name": shape, "dtype": dtype, "seed": 0,
                                                                    "kernels": kernels, "kernel_dir": str(root),
                                                                    "sm": platform.sm}})
    try:
        driver.connect(model)
        steps = step_latencies(model, ["ar", "verify-32", "draft-32"], batch_sizes, context, page_size, iters)
    finally:
        driver.close()
    batch = min(batch_sizes)
    one = next(r["ms"] for r in single if r["kind"] == "ar" and r["batch"] == batch)
    many = next(r["ms"] for r in steps if r["kind"] == "ar" and r["batch"] == batch)
    return {"size": tp, "devices": [str(d) for d in devices], "kernels": kernels, "steps": steps,
            "ar_batch1_ms": many, "ar_batch1_ms_one_rank": one, "ratio_to_tp1": many / one}


def transformers_ar_tokens_per_s(hf_model, context: int, new_tokens: int, device: torch.device) -> float:
    vocab = hf_model.config.vocab_size
    prompt = torch.randint(min(200, vocab // 2), min(1000, vocab), (1, context), device=device)

    def run(n):
        with torch.no_grad():
            hf_model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    run(1)  # warm-up
    synchronize(device)
    one = median_seconds(lambda: run(1), device, 1, warmup=0)
    many = median_seconds(lambda: run(new_tokens), device, 1, warmup=0)
    return (new_tokens - 1) / max(many - one, 1e-9)


def _timed_batch(server, batch: list[list[int]], params) -> dict:
    first, done, stamps = {}, {}, {}
    lock, finished = threading.Lock(), threading.Event()
    start = time.perf_counter()

    def on_update(update, i):
        now = time.perf_counter()
        with lock:
            if update.token_ids:
                first.setdefault(i, now)
                stamps.setdefault(i, []).append((now, len(update.token_ids)))
            if update.finished:
                done[i] = update
                if len(done) == len(batch):
                    finished.set()

    for i, prompt in enumerate(batch):
        server.submit(prompt, params, lambda u, i=i: on_update(u, i))
    finished.wait()
    elapsed = time.perf_counter() - start
    outputs = [done[i].output for i in range(len(batch)) if done[i].output is not None]
    tokens = sum(len(o.output_ids) for o in outputs)
    forwards = sum(o.num_forward_passes for o in outputs)
    gaps = [(t1 - t0) / n for marks in stamps.values() for (t0, _), (t1, n) in zip(marks, marks[1:])]
    return {"tokens": tokens, "tokens_per_forward": tokens / max(forwards, 1), "tokens_per_s": tokens / elapsed,
            "ttft_ms": 1e3 * statistics.mean(first[i] - start for i in first) if first else None,
            "itl_ms": 1e3 * statistics.mean(gaps) if gaps else None}


def end_to_end(server, prompts: list[list[int]], modes: list[str], concurrencies: list[int], max_new_tokens: int,
               block_length: int | None = None) -> list[dict]:
    """Per mode and concurrency: tokens per forward, tokens/s, time to first token, inter-token latency."""
    from nemodiff.runtime.request import SamplingParams

    rows = []
    for mode in modes:
        for concurrency in concurrencies:
            batch = [prompts[i % len(prompts)] for i in range(concurrency)]
            params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, mode=mode,
                                    block_length=block_length)
            rows.append({"mode": mode, "concurrency": concurrency} | _timed_batch(server, batch, params))
    return rows
