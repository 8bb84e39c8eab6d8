"""CUDA-graph replay of the declared steady step shapes, captured once at engine start.

checkpoint ──builder──▶ engine dir ──[runtime: CUDA graphs]──▶ serving

A steady shape is a step whose segments all have one `shape_key` (AR: 1 causal token;
verify: B causal tokens; commit: B causal tokens, last row only; denoise and draft: B full
tokens; QuadraticSpec: k(k+1) tokens under its mask). `capture_steady_shapes` captures each
declared shape at every batch bucket up to the engine's batch size (itself a bucket), once per
split-KV class,
when the engine starts; a later step of that shape is padded to its bucket and replayed, anything
else runs eagerly, and nothing is captured while serving (`captures` counts every graph prepared). Graphs run the kernel path only: per-step data is copied (device to device) into
static buffers shared by all graphs, the attention kernel reads prefix lengths and page-table
rows from them (so one graph serves any context its split class covers), padding segments write
no K/V and use the cache's padding row, and the head runs only on the rows the shape can ask for.

Split-KV: a step's split factor comes from its real longest context and the SM count; graphs
exist for the powers of two up to what the engine's longest context needs, and a step replays the
largest class not above its own factor, so no program is launched without keys to read.

Memory: every graph writes its logits into ONE shared buffer (the graph's own output returns to
the shared pool), sized for the largest graph; shapes whose logits would exceed
`max_logits_bytes` run eagerly. What the buffer and the static inputs take is logged.

The page table: graphs hold `cache.block_tables`, which the cache sizes once at its maximum and never
replaces (nemodiff/runtime/model/kv_cache.py), so a growing cache never recaptures.

On the CPU under aot-check the same code runs with `capture=False`: the static, padded path runs
eagerly (capture is a driver call), which is how CI proves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .batch import ForwardBatch
from .kernel_meta import Workspace, longest_context
from .kv_cache import PagedKVCache
from .segments import Mask, Pattern, cycle_layout

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_GRAPH_TOKENS = 4096  # larger steps (e.g. QuadraticSpec k = 32 at batch 4+) run eagerly
MAX_LOGITS_BYTES = 1 << 30


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


def split_class(splits: int) -> int:
    """The largest power of two not above `splits` (>= 1)."""
    return 1 << (max(1, splits).bit_length() - 1)


class _StaticInputs:
    """Per-token and per-segment buffers every graph reads; refilled before each replay."""

    def __init__(self, tokens: int, segments: int, device: torch.device):
        self.ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.token_slots = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.prefix = torch.zeros(segments, dtype=torch.int32, device=device)
        self.table_row = torch.zeros(segments, dtype=torch.int32, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


class _Graph:
    def __init__(self, runner: "GraphRunner", key: tuple, bucket: int, splits: int):
        model, cache, dev = runner.model, runner.cache, runner.model.device
        layout = steady_layout(key)
        n, static = layout.length, runner.static
        tokens = bucket * n
        self.key, self.bucket, self.splits, self.layout = key, bucket, splits, layout
        self.row_of = np.full(n, -1, dtype=np.int64)  # segment row -> graph row within a segment
        self.row_of[layout.rows] = np.arange(len(layout.rows))
        self.num_rows = bucket * len(layout.rows)

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
        # the runner's one workspace (sized for every graph before the first capture, so it never moves:
        # graphs never run at the same time); tile tensors that outlive the step
        self.meta = model.meta.attention(self.batch, cache, num_splits=splits, workspace=runner.workspace,
                                         persistent=True)
        self.runner = runner
        self.graph = None
        runner.captures += 1
        if runner.capture:
            self.graph, _ = model.platform.capture(self._run, runner.pool)
        else:
            model.platform.touch("graph")  # prepared, run eagerly (the emulated GPU path records it)

    def _run(self) -> torch.Tensor:
        """The forward into the shared logits buffer (what a replay computes)."""
        logits = self.runner.model._run(self.batch, self.runner.cache, self.meta)
        out = self.runner.logits[: self.num_rows]
        out.copy_(logits)
        return out

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
            logits = self.runner.logits
        else:
            with torch.inference_mode():
                logits = self._run()
        per_segment = len(self.layout.rows)
        index = np.concatenate([self.row_of[rows] + s * per_segment for s, rows in enumerate(batch.segment_rows)])
        return logits[self.runner.rows.upload_one(index)]  # staged, no blocking copy


class GraphRunner:
    def __init__(self, model, cache: PagedKVCache, max_seq_len: int, max_batch_size: int = max(BUCKETS),
                 buckets: tuple[int, ...] = BUCKETS, capture: bool | None = None,
                 max_logits_bytes: int = MAX_LOGITS_BYTES):
        self.model, self.cache = model, cache
        # buckets up to the engine's batch size, which is one of them (a batch above the largest runs eagerly)
        top = min(max(max_batch_size, 1), max(buckets))
        self.buckets = tuple(b for b in buckets if b < top) + (top,)
        self.capture = model.platform.captures_graphs if capture is None else capture
        self.longest = max_seq_len
        self.max_logits_bytes = max_logits_bytes
        self.pool = model.platform.graph_pool() if self.capture else None
        self.graphs: dict[tuple[tuple, int, int], _Graph] = {}
        self.static: _StaticInputs | None = None
        self.workspace: Workspace | None = None
        self.logits: torch.Tensor | None = None
        self.rows = model.platform.staging(torch.int64)  # replay row indices
        self.shapes: list[tuple] = []
        self.replays = 0
        self.captures = 0  # graphs prepared (captured on a GPU): all at engine start

    def _tiles(self, key: tuple, bucket: int) -> int:
        length = steady_layout(key).length
        lengths = np.full(bucket, length, dtype=np.int64)
        from nemodiff.plugins.attention import plan_tiles

        cfg = self.model.rank_config
        return len(plan_tiles(lengths, cfg.num_attention_heads // cfg.num_key_value_heads)[1])

    def _plan(self, shapes: list[tuple]) -> list[tuple[tuple, int, int]]:
        vocab = self.model.config.vocab_size
        plan = []
        for key in shapes:
            layout = steady_layout(key)
            for bucket in self.buckets:
                if bucket * layout.length > MAX_GRAPH_TOKENS:
                    continue
                if bucket * len(layout.rows) * vocab * 4 > self.max_logits_bytes:
                    continue
                most = self.model.meta.splits(self._tiles(key, bucket), self.longest, self.cache)
                plan += [(key, bucket, 1 << i) for i in range(split_class(most).bit_length())]
        return plan

    def capture_steady_shapes(self, shapes: list[tuple]) -> None:
        """Capture every declared shape at every bucket and split class (at engine start)."""
        self.shapes = list(shapes)
        plan = self._plan(self.shapes)
        if not plan:
            return
        device = self.model.device
        tokens = max(bucket * steady_layout(key).length for key, bucket, _ in plan)
        rows = max(bucket * len(steady_layout(key).rows) for key, bucket, _ in plan)
        self.static = _StaticInputs(tokens, max(self.buckets), device)
        self.logits = torch.empty(rows, self.model.config.vocab_size, dtype=torch.float32, device=device)
        before = self.model.platform.memory_allocated()
        self.workspace = Workspace(device)
        split_tokens = [bucket * steady_layout(key).length for key, bucket, splits in plan if splits > 1]
        if split_tokens:
            self.workspace.get(self.model.meta.workspace_elems(max(split_tokens), self.cache))
        self.graphs = {}
        for key, bucket, splits in plan:
            self.graphs[(key, bucket, splits)] = _Graph(self, key, bucket, splits)
        log.info("CUDA graphs: %d (%d shapes, buckets %s); shared logits buffer %.1f MiB, static inputs %.1f MiB, "
                 "graph pool and workspaces %.1f MiB", len(self.graphs), len(self.shapes), list(self.buckets),
                 self.logits.numel() * 4 / 2 ** 20, self.static.nbytes() / 2 ** 20,
                 (self.model.platform.memory_allocated() - before) / 2 ** 20)

    def try_replay(self, batch: ForwardBatch) -> torch.Tensor | None:
        """The logits of `batch` from a captured graph, or None when no graph fits it."""
        key = batch.shape_key
        if key is None or batch.image_rows is not None or not self.graphs:
            return None
        count = batch.num_segments
        bucket = next((b for b in self.buckets if b >= count), None)
        if bucket is None:
            return None
        graph = self.graphs.get((key, bucket, 1))
        if graph is None:
            return None
        splits = split_class(self.model.meta.splits(len(graph.meta.tile_seg), longest_context(batch), self.cache))
        graph = self.graphs.get((key, bucket, splits), graph)
        for rows in batch.segment_rows:
            if len(rows) and (rows.max() >= graph.layout.length or (graph.row_of[rows] < 0).any()):
                return None
        self.replays += 1
        return graph.replay(batch)
