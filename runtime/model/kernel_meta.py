"""The attention kernel's view of a batch: query tiles, split-KV factor, workspace.

checkpoint ──builder──▶ engine dir ──[runtime: batch ▶ kernel metadata]──▶ model ──▶ Triton

The batch builder already uploaded the per-segment arrays (starts, prefix lengths, page-table
rows, patterns, mask bitmasks); this adds the query-tile plan of `plugins.attention`, sizes the
split-KV factor from the GPU's SM count and the real context, and hands out a workspace that
is reused from step to step.
"""

from __future__ import annotations

import numpy as np
import torch

from nemodiff.engine_format import ModelConfig
from nemodiff.plugins.launch import sm_count

from .batch import ForwardBatch
from .kv_cache import PagedKVCache

CPU_SM_COUNT = 8  # interpreter runs: enough "SMs" that long contexts exercise the split-KV path


class Workspace:
    """A float32 buffer that only grows."""

    def __init__(self, device: torch.device):
        self.device, self.buffer = device, None

    def get(self, elems: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < elems:
            self.buffer = torch.empty(max(elems, 1), dtype=torch.float32, device=self.device)
        return self.buffer


def tile_plan(batch: ForwardBatch, config: ModelConfig, device: torch.device):
    """(block_m, tile_seg, tile_start) on the device for this batch's segment lengths."""
    from nemodiff.plugins.attention import plan_tiles

    lengths = np.fromiter((b - a for a, b in batch.bounds), dtype=np.int64, count=len(batch.bounds))
    block_m, tile_seg, tile_start = plan_tiles(lengths, config.num_attention_heads // config.num_key_value_heads)
    both = torch.from_numpy(np.concatenate([tile_seg, tile_start]).astype(np.int32))
    if device.type != "cpu":
        both = both.pin_memory().to(device, non_blocking=True)
    return block_m, both[: len(tile_seg)], both[len(tile_seg):]


def attention_meta(batch: ForwardBatch, cache: PagedKVCache, config: ModelConfig, workspace: Workspace,
                   num_splits: int | None = None):
    from nemodiff.plugins.attention import AttentionMeta, choose_splits, workspace_elems

    device = cache.block_tables.device
    block_m, tile_seg, tile_start = tile_plan(batch, config, device)
    if num_splits is None:
        longest = max(p + (b - a) for p, (a, b) in zip(batch.prefix_lens, batch.bounds))
        num_splits = choose_splits(len(tile_seg), config.num_key_value_heads, longest, sm_count(device, CPU_SM_COUNT))
    space = None
    if num_splits > 1:
        space = workspace.get(workspace_elems(batch.num_tokens, config.num_attention_heads, config.head_dim,
                                              num_splits))
    return AttentionMeta(
        seg_start=batch.seg_start, prefix_len=batch.seg_prefix, table_row=batch.seg_table_row,
        block_tables=cache.block_tables, pattern=batch.seg_pattern, mask_offset=batch.mask_offset,
        masks=batch.mask_bits, tile_seg=tile_seg, tile_start=tile_start, page_size=cache.page_size,
        block_m=block_m, num_splits=num_splits, workspace=space,
    )
