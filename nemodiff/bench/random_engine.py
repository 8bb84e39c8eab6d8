"""End to end on a random model: the engine loop, its CUDA graphs and batched decisions, with no engine dir.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: end to end at a named shape]

`nemodiff bench --shape S --end-to-end` wraps the random model in the runtime's `Engine` as `LLM` does
for an engine directory: a paged KV cache, the steady step shapes of every mode captured as CUDA graphs
at start (`nemodiff/runtime/model/graphs.py`; on the CPU under aot-check the same static, padded path runs
eagerly), the strategies and the batched decisions. Requests run to their token budget (EOS ignored),
one batch per mode and concurrency, stepped on this thread.

With random weights drafts are rejected and diffusion unmasks about one token per denoising step, so the
tokens per forward here are not a trained model's: the time per step is what serving pays, the tokens/s
are those of a model that never agrees with itself. The published tokens per forward give the projections
(`steps.projected_tokens_per_s`).
"""

from __future__ import annotations

import statistics
import time

import torch

from nemodiff.device import synchronize
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.transformer import Model

NOTE = ("random weights: drafts are rejected and diffusion unmasks about one token per step, so tokens per "
        "forward are not a trained model's; see the projections at the published tokens per forward")


def random_engine(model: Model, page_size: int, max_batch_size: int, max_seq_len: int, block_length: int,
                  graphs: bool = True):
    """The runtime's Engine around `model`, set up as `LLM._setup` sets up an engine directory's model."""
    from nemodiff.runtime.decoding.strategies.base import StrategyContext
    from nemodiff.runtime.engine.loop import Engine
    from nemodiff.runtime.engine.scheduler import SchedulerConfig

    cfg = model.config
    per_request = -(-(max_seq_len + 2 * block_length) // page_size)
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, page_size,
                         max_batch_size * per_request, model.dtype, model.platform, max_pages_per_request=per_request,
                         max_requests=2 * max_batch_size + 8, prefix_cache=False)  # every prefill computed
    model.graphs = None
    if graphs and model.uses_kernels(cache) and model.platform.gpu_path:
        from nemodiff.runtime.model.graphs import GraphRunner, declared_shapes

        model.graphs = GraphRunner(model, cache, max_seq_len, max_batch_size)
        model.graphs.capture_steady_shapes(declared_shapes(block_length, model.has_lora))
    ctx = StrategyContext(model=cfg, block_length=block_length, has_lora=model.has_lora)
    scheduler = SchedulerConfig(max_num_seqs=max_batch_size,
                                max_num_batched_tokens=max(2048, block_length * (block_length + 1)))
    return Engine(model, cache, ctx, scheduler, max_seq_len, list(cfg.eos_token_ids), decode=lambda ids: "")


def _run_batch(engine, prompts: list[list[int]], params) -> dict:
    device = engine.model.device
    synchronize(device)
    start = time.perf_counter()
    requests = [engine.add_request(p, params) for p in prompts]
    first: dict[int, float] = {}
    while any(not r.finished for r in requests):
        engine.step()  # decisions reach the host every step, so the clock sees finished work
        now = time.perf_counter()
        for i, r in enumerate(requests):
            if r.output_ids and i not in first:
                first[i] = now
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in requests)
    forwards = sum(r.num_forwards for r in requests)
    gaps = [(r.end_time - first[i]) / (len(r.output_ids) - 1) for i, r in enumerate(requests)
            if len(r.output_ids) > 1 and r.end_time is not None]
    return {"tokens": tokens, "tokens_per_forward": tokens / max(forwards, 1), "tokens_per_s": tokens / elapsed,
            "ttft_ms": 1e3 * statistics.mean(t - start for t in first.values()) if first else None,
            "itl_ms": 1e3 * statistics.mean(gaps) if gaps else None, "steps": forwards}


def engine_end_to_end(engine, modes: list[str], concurrencies: list[int], prompt_tokens: int, max_new_tokens: int,
                      on_result=None, seed: int = 0) -> list[dict]:
    """Per mode and concurrency: tokens, tokens per forward, tokens/s, time to first token, inter-token latency.

    Each batch gets fresh random prompts of `prompt_tokens` ids (no prefix is shared); the first batch of
    every mode runs once untimed (warm-up)."""
    from nemodiff.runtime.request import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size

    def prompts(count: int) -> list[list[int]]:
        return [[1] + torch.randint(200, vocab, (prompt_tokens - 1,), generator=gen).tolist() for _ in range(count)]

    rows = []
    for mode in modes:
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, mode=mode)
        _run_batch(engine, prompts(1), SamplingParams(max_new_tokens=2, ignore_eos=True, mode=mode))  # warm-up
        for concurrency in concurrencies:
            row = {"mode": mode, "concurrency": concurrency} | _run_batch(engine, prompts(concurrency), params)
            rows.append(row)
            if on_result is not None:
                on_result(row)
    return rows
