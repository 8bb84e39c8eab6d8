"""CUDA-graph replay of the declared steady step shapes, captured once at engine start.

checkpoint ──builder──▶ engine dir ──[runtime: CUDA graphs]──▶ Triton

A steady shape is a step whose segments all have one `shape_key` (AR: 1 causal token;
verify: B causal tokens; commit: B causal tokens, last row only; denoise and draft: B full
tokens; QuadraticSpec: k(k+1) tokens under its mask). `capture_steady_shapes` captures each
declared shape at every batch bucket when the engine starts; a later step of that shape is
padded to its bucket and replayed, anything else runs eagerly, and nothing is ever captured
while serving. Graphs run the kernel path only: per-step data is copied (device to device)
into static buffers shared by all graphs, the attention kernel reads prefix lengths and
page-table rows from them (so one graph serves any context length, its split-KV factor
sized for the longest), padding segments write no K/V and use the cache's padding row, and
the head runs only on the rows the shape can ask for. With `capture=False` the same static
path runs eagerly, which is how it is tested on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nemodiff.plugins.launch import sm_count

from .batch import ForwardBatch
from .kernel_meta import CPU_SM_COUNT, Workspace, attention_meta, tile_plan
from .kv_cache import PagedKVCache
from .segments import Mask, Pattern

BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_GRAPH_TOKENS = 4096  # larger steps (e.g. QuadraticSpec k = 32 at batch 4+) run eagerly


@dataclass(frozen=True)
class SteadyLayout:
    length: int
    pattern: Pattern
    mask: Mask | None
    rows: np.ndarray  # logit rows the graph computes (a superset of what a step may ask)
    lora: bool


def steady_layout(key: tuple) -> SteadyLayout:
    kind = key[0]
    if kind == "ar":
        return SteadyLayout(1, Pattern.CAUSAL, None, np.array([0]), False)
    if kind in ("verify", "commit"):
        n = key[1]
        return SteadyLayout(n, Pattern.CAUSAL, None, np.arange(n) if kind == "verify" else np.array([n - 1]), False)
    if kind in ("denoise", "draft"):
        n = key[1]
        return SteadyLayout(n, Pattern.FULL, None, np.arange(1, n), kind == "draft" and bool(key[2]))
    if kind == "quad":
        from nemodiff.runtime.model.segments import cycle_layout

        k = key[1]
        mask, _, _, rows = cycle_layout(k)
        return SteadyLayout(k * (k + 1), Pattern.MASK, mask, rows, False)
    raise KeyError(f"no steady layout for shape {key!r}")


def declared_shapes(block: int, lora: bool) -> list[tuple]:
    """The steady shapes of every mode at the engine's block length."""
    shapes = [("ar",), ("verify", block), ("commit", block), ("denoise", block), ("draft", block, False),
              ("quad", block)]
    if lora:
        shapes.append(("draft", block, True))
    return shapes


class _StaticInputs:
    """Per-token and per-segment buffers every graph reads; refilled before each replay."""

    def __init__(self, tokens: int, segments: int, device: torch.device):
        self.ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.token_slots = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.prefix = torch.zeros(segments, dtype=torch.int32, device=device)
        self.table_row = torch.zeros(segments, dtype=torch.int32, device=device)


class _Graph:
    def __init__(self, runner: "GraphRunner", key: tuple, bucket: int):
        model, cache, dev = runner.model, runner.cache, runner.model.device
        layout = steady_layout(key)
        n, static = layout.length, runner.static
        tokens = bucket * n
        self.key, self.bucket, self.layout = key, bucket, layout
        self.row_of = np.full(n, -1, dtype=np.int64)  # segment row -> graph row within a segment
        self.row_of[layout.rows] = np.arange(len(layout.rows))

        def const(values, dtype) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values), dtype=dtype).to(dev)

        starts = np.arange(bucket + 1) * n
        bits = layout.mask.bits if layout.mask is not None else np.zeros(1, dtype=np.int32)
        self.batch = ForwardBatch(
            num_tokens=tokens, ids=static.ids[:tokens], positions=static.positions[:tokens],
            token_slots=static.token_slots[:tokens], write_rows=const([], torch.int64),
            write_slots=const([], torch.int64),
            logit_rows=const((starts[:-1, None] + layout.rows[None, :]).reshape(-1), torch.int64),
            lora_rows=const(np.arange(tokens) if layout.lora else [], torch.int64),
            logit_counts=[len(layout.rows)] * bucket, segment_rows=[layout.rows] * bucket,
            bounds=[(int(a), int(a + n)) for a in starts[:-1]], table_rows=[0] * bucket, prefix_lens=[0] * bucket,
            patterns=[int(layout.pattern)] * bucket,
            masks=[layout.mask.dense if layout.mask is not None else None] * bucket,
            seg_start=const(starts, torch.int32), seg_prefix=static.prefix[:bucket],
            seg_table_row=static.table_row[:bucket],
            seg_pattern=const(np.full(bucket, int(layout.pattern)), torch.int32),
            mask_offset=const(np.zeros(bucket), torch.int32), mask_bits=const(bits, torch.int32),
        )
        # sized for the longest context, with a workspace of its own (a shared one could move)
        self.meta = attention_meta(self.batch, cache, model.rank_config, Workspace(dev), num_splits=runner.splits_for(
            self.batch))
        self.runner = runner
        self.graph = None
        if runner.capture:
            self._capture(model, cache, runner.pool)

    def _capture(self, model, cache, pool) -> None:
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            model._run(self.batch, cache, self.meta)  # warm-up outside the graph
        torch.cuda.current_stream(model.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool):
            self.logits = model._run(self.batch, cache, self.meta)

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        static, count, n = self.runner.static, batch.num_segments, self.layout.length
        used = batch.num_tokens
        static.ids[:used].copy_(batch.ids)
        static.positions[:used].copy_(batch.positions)
        static.token_slots[:used].copy_(batch.token_slots)
        static.prefix[:count].copy_(batch.seg_prefix)
        static.table_row[:count].copy_(batch.seg_table_row)
        if count < self.bucket:  # padding segments: no prefix, the padding row, no K/V writes
            static.ids[used: self.bucket * n].zero_()
            static.positions[used: self.bucket * n].zero_()
            static.token_slots[used: self.bucket * n].fill_(-1)
            static.prefix[count: self.bucket].zero_()
            static.table_row[count: self.bucket].zero_()
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            with torch.inference_mode():
                logits = self.runner.model._run(self.batch, self.runner.cache, self.meta)
        per_segment = len(self.layout.rows)
        index = np.concatenate([self.row_of[rows] + s * per_segment for s, rows in enumerate(batch.segment_rows)])
        return logits[torch.from_numpy(index).to(logits.device)]


class GraphRunner:
    def __init__(self, model, cache: PagedKVCache, max_seq_len: int, buckets: tuple[int, ...] = BUCKETS,
                 capture: bool = True):
        self.model, self.cache, self.buckets, self.capture = model, cache, buckets, capture
        self.longest = max_seq_len
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[tuple, int], _Graph] = {}
        self.static: _StaticInputs | None = None
        self.replays = 0

    def splits_for(self, batch: ForwardBatch) -> int:
        """The split-KV factor of a graph: chosen for the longest context the engine allows."""
        from nemodiff.plugins.attention import choose_splits

        cfg, device = self.model.rank_config, self.model.device
        _, tile_seg, _ = tile_plan(batch, cfg, device)
        return choose_splits(len(tile_seg), cfg.num_key_value_heads, self.longest, sm_count(device, CPU_SM_COUNT))

    def capture_steady_shapes(self, shapes: list[tuple]) -> None:
        """Capture every declared shape at every bucket (at engine start; never while serving)."""
        plan = [(key, bucket) for key in shapes for bucket in self.buckets
                if bucket * steady_layout(key).length <= MAX_GRAPH_TOKENS]
        if not plan:
            return
        tokens = max(bucket * steady_layout(key).length for key, bucket in plan)
        self.static = _StaticInputs(tokens, max(self.buckets), self.model.device)
        for key, bucket in plan:
            self.graphs[(key, bucket)] = _Graph(self, key, bucket)

    def try_replay(self, batch: ForwardBatch) -> torch.Tensor | None:
        """The logits of `batch` from a captured graph, or None when no graph fits it."""
        key = batch.shape_key
        if key is None or batch.image_rows is not None:
            return None
        count = batch.num_segments
        bucket = next((b for b in self.buckets if b >= count), None)
        graph = self.graphs.get((key, bucket)) if bucket is not None else None
        if graph is None:
            return None
        for rows in batch.segment_rows:
            if len(rows) and (rows.max() >= graph.layout.length or (graph.row_of[rows] < 0).any()):
                return None
        self.replays += 1
        return graph.replay(batch)
