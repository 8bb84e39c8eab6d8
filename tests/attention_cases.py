"""Random inputs for the fused attention kernel: a ragged batch of segments over a shuffled paged cache,
from a random fused q/k/v projection, shared by the interpreter tests and the GPU checks
(tests/gpu/check_attention.py, tests/gpu/device_checks.py)."""

from dataclasses import dataclass

import numpy as np
import torch

from nemodiff.engine_format import RopeConfig
from nemodiff.plugins.attention import (
    AttentionMeta,
    chunk_slots,
    pack_bitmask,
    plan_tiles,
    reference_fused_attention,
    workspace_elems,
)
from nemodiff.runtime.model.rope import RotaryEmbedding

# YaRN with a short original context, so that positions past 64 also take the llama-4 query scale
TEST_ROPE = RopeConfig(rope_type="yarn", rope_theta=1e4, factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                       original_max_position_embeddings=64, llama_4_scaling_beta=0.1)


def _i32(values, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int32, device=device)


@dataclass
class AttentionCase:
    qkv: torch.Tensor
    positions: torch.Tensor  # int64 [T]
    write_slots: torch.Tensor  # int64 [T], -1: not written
    rope: RotaryEmbedding
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seg_start: torch.Tensor
    prefix_len: torch.Tensor
    table_row: torch.Tensor
    block_tables: torch.Tensor
    pattern: torch.Tensor
    mask_offset: torch.Tensor
    masks: torch.Tensor
    mask_list: list
    page_size: int
    lengths: np.ndarray
    heads: int
    kv_heads: int
    head_dim: int

    def meta(self, num_splits: int) -> AttentionMeta:
        """Tiles planned for this batch; a NaN-poisoned workspace when splitting."""
        total = self.qkv.shape[0]
        block_m, tile_seg, tile_start = plan_tiles(self.lengths, self.heads // self.kv_heads)
        device = self.qkv.device
        workspace = None
        if num_splits > 1:
            slots = chunk_slots(self.block_tables.shape[1] * self.page_size, total)
            workspace = torch.full((workspace_elems(total, self.heads, self.head_dim, slots),), float("nan"),
                                   device=device)
        return AttentionMeta(self.seg_start, self.prefix_len, self.table_row, self.block_tables, self.pattern,
                             self.mask_offset, self.masks, _i32(tile_seg, device), _i32(tile_start, device),
                             self.page_size, block_m, num_splits, workspace)

    def inputs(self) -> tuple:
        """The wrapper's leading arguments: qkv, positions, write_slots, rope."""
        return self.qkv, self.positions, self.write_slots, self.rope

    def shape(self) -> tuple:
        return self.heads, self.kv_heads, self.head_dim

    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 attention [T, Hq, D], k cache, v cache) from the PyTorch path, on copies of the caches."""
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        out = reference_fused_attention(*self.inputs(), k_cache, v_cache, self.seg_start, self.prefix_len,
                                        self.table_row, self.block_tables, self.page_size, self.pattern.tolist(),
                                        self.mask_list, *self.shape())
        return out, k_cache, v_cache


def make_case(segments, *, heads, kv_heads, head_dim, page_size, dtype=torch.float32, seed=0, device="cpu",
              write_share=0.75, position_offset=0) -> AttentionCase:
    """segments: (tokens, prefix, pattern, bool mask or None) each. A segment's tokens sit at positions
    prefix + position_offset + 0..n-1 (MASK segments: shuffled), and about `write_share` of them store
    their k/v at their slot. Cache slots that no prefix owns, the segments' own slots included, and
    page-table entries past them hold NaN (the NaN page), so a kernel reading them poisons its output."""
    gen = torch.Generator().manual_seed(seed)
    lengths = np.array([s[0] for s in segments])
    prefixes = [s[1] for s in segments]
    # pages of each request: its prefix's, and those its segment's positions fall in (the rest: the NaN page)
    used = [sorted(set(range(-(-p // page_size))) | set(range((p + position_offset) // page_size,
                                                           -(-(p + position_offset + n) // page_size))))
            for n, p in zip(lengths, prefixes)]
    max_pages = max(1, max((u[-1] + 1 for u in used if u), default=1))
    rows = len(segments) + 2  # the page table holds rows of other requests too
    num_pages = sum(map(len, used)) + 1
    nan_page = num_pages - 1
    table_row = torch.randperm(rows, generator=gen)[: len(segments)].int()
    block_tables = torch.full((rows, max_pages), nan_page, dtype=torch.int32)
    owned = torch.zeros(num_pages * page_size, dtype=torch.bool)
    free_pages = torch.randperm(nan_page, generator=gen).int()
    for row, prefix, pages_used in zip(table_row.tolist(), prefixes, used):
        pages, free_pages = free_pages[:len(pages_used)], free_pages[len(pages_used):]
        block_tables[row, pages_used] = pages
        prefix_pages = block_tables[row, : -(-prefix // page_size)].long()
        owned[(prefix_pages[:, None] * page_size + torch.arange(page_size)).flatten()[:prefix]] = True
    k_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    total = int(lengths.sum())
    qkv = torch.randn(total, (heads + 2 * kv_heads) * head_dim, generator=gen)

    positions, slots = [], []
    for (n, prefix, pattern, _), row in zip(segments, table_row.tolist()):
        pos = prefix + position_offset + (torch.randperm(n, generator=gen) if pattern == 2 else torch.arange(n))
        slot = block_tables[row, pos // page_size].long() * page_size + pos % page_size
        writes = torch.rand(n, generator=gen) < write_share
        positions.append(pos)
        slots.append(torch.where(writes, slot, torch.full_like(slot, -1)))
    words, mask_offset = [torch.zeros(1, dtype=torch.int32)], []
    for _, _, _, mask in segments:
        mask_offset.append(sum(w.numel() for w in words))
        if mask is not None:
            words.append(pack_bitmask(mask))
    seg_start = np.concatenate([[0], np.cumsum(lengths)])
    on = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return AttentionCase(on(qkv), torch.cat(positions).to(device), torch.cat(slots).to(device),
                         RotaryEmbedding(TEST_ROPE, head_dim, torch.device(device)), on(k_cache), on(v_cache),
                         _i32(seg_start, device), _i32(prefixes, device), table_row.to(device), block_tables.to(device),
                         _i32([s[2] for s in segments], device), _i32(mask_offset, device), torch.cat(words).to(device),
                         [s[3] for s in segments], page_size, lengths, heads, kv_heads, head_dim)
