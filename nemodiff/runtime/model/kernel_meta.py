"""The attention kernel's view of a batch: query tiles, split-KV factor, workspace.

checkpoint ──builder──▶ engine dir ──[runtime: batch ▶ kernel metadata]──▶ model ──▶ serving

The batch builder already uploaded the per-segment arrays (starts, prefix lengths, page-table
rows, patterns, mask bitmasks); this adds the query-tile plan of `plugins.attention` (uploaded
through a reused staging buffer, 16-byte aligned like every pointer a kernel reads), sizes the
split-KV factor from the SM count and the real context of the step, and hands out a workspace
that is reused from step to step.
"""

from __future__ import annotations

import numpy as np
import torch

from nemodiff.device import Platform
from nemodiff.engine_format import ModelConfig

from .batch import ForwardBatch
from .kv_cache import PagedKVCache


class Workspace:
    """A float32 buffer that only grows."""

    def __init__(self, device: torch.device):
        self.device, self.buffer = device, None

    def get(self, elems: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < elems:
            self.buffer = torch.empty(max(elems, 1), dtype=torch.float32, device=self.device)
        return self.buffer


def longest_context(batch: ForwardBatch) -> int:
    """The most keys any query of the batch sees: its committed prefix plus its own segment."""
    return max(p + (b - a) for p, (a, b) in zip(batch.prefix_lens, batch.bounds))


class KernelMeta:
    """Builds the AttentionMeta of each forward on the kernel path (one per model)."""

    def __init__(self, platform: Platform, config: ModelConfig):
        self.platform, self.config = platform, config
        self.workspace = Workspace(platform.device)
        self._tiles = platform.staging(torch.int32)

    def tile_plan(self, batch: ForwardBatch, persistent: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(block_m, tile_seg, tile_start) on the device for this batch's segment lengths. persistent: the
        tensors outlive the next step (CUDA graphs keep them), so they do not share the staging buffer."""
        from nemodiff.plugins.attention import plan_tiles

        cfg = self.config
        lengths = np.fromiter((b - a for a, b in batch.bounds), dtype=np.int64, count=len(batch.bounds))
        block_m, tile_seg, tile_start = plan_tiles(lengths, cfg.num_attention_heads // cfg.num_key_value_heads)
        seg, start = self._tiles.upload([tile_seg.astype(np.int32), tile_start.astype(np.int32)])
        if persistent:
            seg, start = seg.clone(), start.clone()
        return block_m, seg, start

    def splits(self, num_tiles: int, context: int, cache: PagedKVCache) -> int:
        """Split-KV programs per tile for `context` keys (1: no split) on this platform's SMs."""
        from nemodiff.plugins.attention import choose_splits

        return choose_splits(num_tiles, self.config.num_key_value_heads, context, self.platform.sm_count,
                             self.chunk_keys(cache))

    @staticmethod
    def max_keys(cache: PagedKVCache) -> int:
        return cache.block_tables.shape[1] * cache.page_size

    def chunk_keys(self, cache: PagedKVCache) -> int:
        """The attention kernel's key chunk for this cache (a constant of the cache: see plugins.attention)."""
        from nemodiff.plugins.attention import chunk_keys_for

        return chunk_keys_for(self.max_keys(cache))

    def workspace_elems(self, num_tokens: int, cache: PagedKVCache) -> int:
        """What a split forward of `num_tokens` tokens needs: every chunk it may touch."""
        from nemodiff.plugins.attention import chunk_slots, workspace_elems

        cfg = self.config
        return workspace_elems(num_tokens, cfg.num_attention_heads, cfg.head_dim,
                               chunk_slots(self.max_keys(cache), num_tokens))

    def attention(self, batch: ForwardBatch, cache: PagedKVCache, num_splits: int | None = None,
                  workspace: Workspace | None = None, persistent: bool = False):
        """The AttentionMeta of `batch`; the split factor from the batch's real longest context unless given."""
        from nemodiff.plugins.attention import AttentionMeta

        block_m, tile_seg, tile_start = self.tile_plan(batch, persistent)
        if num_splits is None:
            num_splits = self.splits(len(tile_seg), longest_context(batch), cache)
        space = None
        if num_splits > 1:
            space = (workspace or self.workspace).get(self.workspace_elems(batch.num_tokens, cache))
        return AttentionMeta(
            seg_start=batch.seg_start, prefix_len=batch.seg_prefix, table_row=batch.seg_table_row,
            block_tables=cache.block_tables, pattern=batch.seg_pattern, mask_offset=batch.mask_offset,
            masks=batch.mask_bits, tile_seg=tile_seg, tile_start=tile_start, page_size=cache.page_size,
            block_m=block_m, num_splits=num_splits, workspace=space,
        )
