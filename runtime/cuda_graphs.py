"""CUDA-graph replay for the steady-state step shapes of every mode.

checkpoint ──builder──▶ engine dir ──[runtime: CUDA graphs]──▶ Triton

A step whose segments all have one shape (AR: 1 causal token; verify/commit: B causal
tokens; draft/denoise: B full tokens; QuadraticSpec: k(k+1) tokens under its mask) is
padded to a batch-size bucket and replayed from a graph captured for that (shape, bucket).
All per-step data lives in static device buffers that are refilled before each replay;
the attention kernel reads prefix lengths and page tables from them, so one graph serves
any context length. Padding segments have no prefix and write their K/V to a scratch page
that no request owns. Mixed-shape steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemodiff.plugins.kernels import AttentionMeta

from .kv_cache import PagedKVCache
from .segments import Pattern, Segment

BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_GRAPH_TOKENS = 4096  # larger steps (e.g. QuadraticSpec at big batch) run eagerly


@dataclass(frozen=True)
class StepShape:
    length: int
    pattern: Pattern
    write: tuple[bool, ...]
    mask: bytes | None
    lora: bool

    @classmethod
    def of(cls, segments: list[Segment]) -> "StepShape | None":
        first = segments[0]
        shape = cls(len(first), first.pattern, tuple(first.write_flags()),
                    first.mask.to(torch.uint8).numpy().tobytes() if first.pattern is Pattern.MASK else None,
                    first.use_lora)
        for seg in segments[1:]:
            if (len(seg), seg.pattern, tuple(seg.write_flags()), seg.use_lora) != \
                    (shape.length, shape.pattern, shape.write, shape.lora):
                return None
            if shape.mask is not None and seg.mask.to(torch.uint8).numpy().tobytes() != shape.mask:
                return None
        return shape


class _Graph:
    def __init__(self, model, cache: PagedKVCache, shape: StepShape, bucket: int, max_pages: int, pool,
                 scratch_slot: int):
        from .model import _Batch

        dev, n = model.device, shape.length
        tokens, writes = bucket * n, [j for j in range(n) if shape.write[j]]
        self.shape, self.bucket = shape, bucket

        def zeros(count, dtype=torch.int32):
            return torch.zeros(count, dtype=dtype, device=dev)

        self.ids, self.positions = zeros(tokens, torch.long), zeros(tokens, torch.long)
        self.write_slots = zeros(bucket * len(writes), torch.long) + scratch_slot  # warm-up writes go nowhere
        write_rows = torch.tensor([b * n + j for b in range(bucket) for j in writes], dtype=torch.long, device=dev)
        lora_rows = torch.arange(tokens, device=dev) if shape.lora else zeros(0, torch.long)
        self.batch = _Batch(ids=self.ids, positions=self.positions, bounds=[], write_rows=write_rows,
                            write_slots=self.write_slots, prefix_slots=[], intra_masks=[], lora_rows=lora_rows,
                            logit_rows=torch.arange(tokens, device=dev), logit_counts=[tokens])
        mask = (torch.frombuffer(bytearray(shape.mask), dtype=torch.uint8).to(dev).repeat(bucket)
                if shape.mask is not None else zeros(1, torch.uint8))
        longest = max_pages * cache.page_size
        splits = 1 if longest <= 1024 else min(32, -(-longest // 1024))
        heads = model.num_heads  # this rank's query heads under tensor parallelism
        self.meta = AttentionMeta(
            token_seg=torch.arange(bucket, device=dev, dtype=torch.int32).repeat_interleave(n),
            seg_start=torch.arange(0, tokens + 1, n, device=dev, dtype=torch.int32),
            prefix_len=zeros(bucket), block_tables=zeros(bucket * max_pages).view(bucket, max_pages),
            pattern=torch.full((bucket,), {Pattern.CAUSAL: 0, Pattern.FULL: 1, Pattern.MASK: 2}[shape.pattern],
                               dtype=torch.int32, device=dev),
            mask_offset=torch.arange(bucket, device=dev, dtype=torch.int64) * (n * n if shape.mask else 0),
            masks=mask, page_size=cache.page_size, num_splits=splits,
            workspace=(torch.empty(splits * tokens * heads * (model.config.head_dim + 2), device=dev)
                       if splits > 1 else None))
        self.model, self.cache = model, cache
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream), torch.inference_mode():
            model._run(self.batch, cache, self.meta)  # warm-up outside the graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool):
            self.logits = model._run(self.batch, cache, self.meta)

    def run(self, segments: list[Segment], scratch_slot: int) -> list[torch.Tensor]:
        n, cache, pages = self.shape.length, self.cache, self.meta.block_tables.shape[1]
        ids, positions, slots, prefix, tables = [], [], [], [], []
        for seg in segments:
            ids += seg.token_ids
            positions += seg.positions
            written = [p for p, w in zip(seg.positions, seg.write_flags()) if w]
            slots += cache.slots(seg.request_id, torch.tensor(written)).tolist() if written else []
            prefix.append(seg.prefix_len)
            table = cache.page_table(seg.request_id)
            tables.append(table + [0] * (pages - len(table)))
        pad = self.bucket - len(segments)
        ids += [0] * (pad * n)
        positions += [0] * (pad * n)
        slots += [scratch_slot] * (pad * sum(self.shape.write))
        prefix += [0] * pad
        tables += [[0] * pages] * pad
        self.ids.copy_(torch.tensor(ids))
        self.positions.copy_(torch.tensor(positions))
        self.write_slots.copy_(torch.tensor(slots, dtype=torch.long))
        self.meta.prefix_len.copy_(torch.tensor(prefix, dtype=torch.int32))
        self.meta.block_tables.copy_(torch.tensor(tables, dtype=torch.int32))
        self.graph.replay()
        out = []
        for b, seg in enumerate(segments):
            out.append(self.logits[b * n: (b + 1) * n][seg.rows()].clone())
        return out


class GraphRunner:
    def __init__(self, model, cache: PagedKVCache, max_seq_len: int, buckets: tuple[int, ...] = BUCKETS):
        self.model, self.cache, self.buckets = model, cache, buckets
        self.max_pages = -(-max_seq_len // cache.page_size) + 2
        self.scratch_slot = cache.take_scratch_page() * cache.page_size
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[StepShape, int], _Graph] = {}

    def capture_steady_shapes(self, block: int, lora: bool) -> None:
        """Capture the steady-state shapes of every mode at engine start."""
        from .strategies.quadratic_spec import quadratic_mask

        def like(n, pattern, write, use_lora=False, mask=None):
            return [Segment(0, [0] * n, list(range(n)), 0, pattern, write_kv=write, mask=mask, use_lora=use_lora)]

        self.capture(like(1, Pattern.CAUSAL, True))  # AR step
        self.capture(like(block, Pattern.CAUSAL, True))  # linear-spec verify, diffusion commit
        self.capture(like(block, Pattern.FULL, False))  # diffusion denoise
        if lora:
            self.capture(like(block, Pattern.FULL, False, use_lora=True))  # linear-spec draft
        k = block
        self.capture(like(k * (k + 1), Pattern.MASK, [True] * k + [False] * (k * k), mask=quadratic_mask(k)))

    def capture(self, segments_like: list[Segment]) -> None:
        """Capture every bucket for the shape of `segments_like` (used at engine start)."""
        shape = StepShape.of(segments_like)
        for bucket in self.buckets:
            if (shape, bucket) not in self.graphs and bucket * shape.length <= MAX_GRAPH_TOKENS:
                self.graphs[(shape, bucket)] = _Graph(self.model, self.cache, shape, bucket, self.max_pages,
                                                      self.pool, self.scratch_slot)

    def try_run(self, segments: list[Segment]) -> list[torch.Tensor] | None:
        if not segments or len(segments) > self.buckets[-1]:
            return None
        if any(len(self.cache.page_table(s.request_id)) > self.max_pages for s in segments):
            return None
        shape = StepShape.of(segments)
        if shape is None:
            return None
        bucket = next(b for b in self.buckets if b >= len(segments))
        if bucket * shape.length > MAX_GRAPH_TOKENS:
            return None
        graph = self.graphs.get((shape, bucket))
        if graph is None:
            graph = self.graphs[(shape, bucket)] = _Graph(self.model, self.cache, shape, bucket, self.max_pages,
                                                          self.pool, self.scratch_slot)
        return graph.run(segments, self.scratch_slot)
