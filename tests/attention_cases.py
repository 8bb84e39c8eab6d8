"""Random inputs for the segment-attention kernels: a ragged batch of segments over a shuffled paged
cache, shared by the interpreter tests and the GPU check (tests/gpu/check_attention.py)."""

from dataclasses import dataclass

import numpy as np
import torch

from nemodiff.plugins.attention import AttentionMeta, pack_bitmask, plan_tiles, workspace_elems


def _i32(values, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int32, device=device)


@dataclass
class AttentionCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
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

    def meta(self, num_splits: int) -> AttentionMeta:
        """Tiles planned for this batch; a NaN-poisoned workspace when splitting."""
        total, heads, head_dim = self.q.shape
        block_m, tile_seg, tile_start = plan_tiles(self.lengths, heads // self.k.shape[1])
        device = self.q.device
        workspace = None
        if num_splits > 1:
            workspace = torch.full((workspace_elems(total, heads, head_dim, num_splits),), float("nan"), device=device)
        return AttentionMeta(self.seg_start, self.prefix_len, self.table_row, self.block_tables, self.pattern,
                             self.mask_offset, self.masks, _i32(tile_seg, device), _i32(tile_start, device),
                             self.page_size, block_m, num_splits, workspace)

    def reference_args(self) -> tuple:
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.seg_start, self.prefix_len, self.table_row,
                self.block_tables, self.page_size, self.pattern.tolist(), self.mask_list)


def make_case(segments, *, heads, kv_heads, head_dim, page_size, dtype=torch.float32, seed=0,
              device="cpu") -> AttentionCase:
    """segments: (tokens, prefix, pattern, bool mask or None) each. Cache slots that no prefix owns,
    and page-table entries past each prefix, hold NaN, so a kernel reading them poisons its output."""
    gen = torch.Generator().manual_seed(seed)
    lengths = np.array([s[0] for s in segments])
    prefixes = [s[1] for s in segments]
    max_pages = max(1, max(-(-p // page_size) for p in prefixes))
    rows = len(segments) + 2  # the page table holds rows of other requests too
    num_pages = rows * max_pages + 1
    nan_page = num_pages - 1
    table_row = torch.randperm(rows, generator=gen)[: len(segments)].int()
    block_tables = torch.full((rows, max_pages), nan_page, dtype=torch.int32)
    owned = torch.zeros(num_pages * page_size, dtype=torch.bool)
    free_pages = torch.randperm(nan_page, generator=gen).int()
    for row, prefix in zip(table_row.tolist(), prefixes):
        count = -(-prefix // page_size)
        pages, free_pages = free_pages[:count], free_pages[count:]
        block_tables[row, :count] = pages
        owned[(pages[:, None] * page_size + torch.arange(page_size)).flatten()[:prefix].long()] = True
    k_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, generator=gen)
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    total = int(lengths.sum())
    q = torch.randn(total, heads, head_dim, generator=gen)
    k = torch.randn(total, kv_heads, head_dim, generator=gen)
    v = torch.randn(total, kv_heads, head_dim, generator=gen)

    words, mask_offset = [torch.zeros(1, dtype=torch.int32)], []
    for _, _, _, mask in segments:
        mask_offset.append(sum(w.numel() for w in words))
        if mask is not None:
            words.append(pack_bitmask(mask))
    seg_start = np.concatenate([[0], np.cumsum(lengths)])
    on = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return AttentionCase(on(q), on(k), on(v), on(k_cache), on(v_cache), _i32(seg_start, device), _i32(prefixes, device),
                         table_row.to(device), block_tables.to(device), _i32([s[2] for s in segments], device),
                         _i32(mask_offset, device), torch.cat(words).to(device), [s[3] for s in segments], page_size,
                         lengths)
