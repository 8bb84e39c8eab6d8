"""Paged segment attention: the host wrapper, tile planning and the variants of the Triton kernels.

checkpoint ──builder (compiles `variants`)──▶ engine dir ──[runtime: segment_attention]──▶ Triton

A forward is a ragged batch of segments (docs/design.md §4). Each query of segment s sees the request's
committed prefix (`prefix_len[s]` keys in the paged cache, all visible) and the segment's own
keys under its pattern: 0 causal, 1 full, 2 explicit mask (a bitmask, see `pack_bitmask`).
`plan_tiles` cuts segments into query tiles of `block_m` tokens, `choose_splits` picks how many
programs share a tile's keys, and `segment_attention` launches the kernels of
attention_kernels.py through a launcher (interpreter, JIT or ahead of time). The kernels' layout
and algorithm are described there; `reference_segment_attention` is the plain PyTorch oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nemodiff.engine_format import ModelConfig

from .attention_kernels import segment_attention_kernel, segment_attention_reduce_kernel
from .spec import KernelVariant, pointer

KERNELS = {
    "segment_attention": segment_attention_kernel,
    "segment_attention_reduce": segment_attention_reduce_kernel,
}

CAUSAL, FULL, MASK = 0, 1, 2
MAX_SPLITS = 32
MIN_KEYS_PER_SPLIT = 128  # two key blocks: fewer keys per program cost more in merging than they save
LARGE_TILE_TOKENS = 256  # a segment this long takes the biggest tiles (prefill, QuadraticSpec k >= 16)
ENGINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
INDEX_ARGUMENTS = ("seg_start_ptr", "prefix_len_ptr", "table_row_ptr", "block_tables_ptr", "pattern_ptr",
                   "mask_offset_ptr", "masks_ptr", "tile_seg_ptr", "tile_start_ptr")


@dataclass
class AttentionMeta:
    """Device tensors describing one forward's segments, built once and shared by every layer."""

    seg_start: torch.Tensor  # int32 [S+1]
    prefix_len: torch.Tensor  # int32 [S]
    table_row: torch.Tensor  # int32 [S]  row of block_tables for the segment's request
    block_tables: torch.Tensor  # int32 [R, max_pages]
    pattern: torch.Tensor  # int32 [S]  0 causal, 1 full, 2 mask
    mask_offset: torch.Tensor  # int32 [S]  first word of the segment's bitmask in `masks`
    masks: torch.Tensor  # int32 [W], W >= 1; see pack_bitmask
    tile_seg: torch.Tensor  # int32 [NT] segment of each query tile
    tile_start: torch.Tensor  # int32 [NT] first query token of the tile, relative to its segment
    page_size: int
    block_m: int
    num_splits: int
    workspace: torch.Tensor | None  # float32, >= workspace_elems(...) when num_splits > 1


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [n, n] -> int32 [n * ceil(n/32)]: row i is words [i*W, (i+1)*W), bit j%32 of word j//32."""
    mask = mask.cpu()
    n = mask.shape[0]
    words = (n + 31) // 32
    bits = torch.zeros(n, words * 32, dtype=torch.int64)
    bits[:, :n] = mask.to(torch.int64)
    packed = (bits.view(n, words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # two's complement of bit 31
    return packed.to(torch.int32).reshape(-1)


def block_m_choices(group: int) -> tuple[int, ...]:
    """Query tokens per tile: 1 for decode, else about 64 or 128 rows (tokens x group)."""
    return tuple(sorted({1, max(1, 64 // group), max(1, 128 // group)}))


def plan_tiles(seg_lengths: np.ndarray, group: int) -> tuple[int, np.ndarray, np.ndarray]:
    """-> (block_m, tile_seg, tile_start): one tile per block_m query tokens of each segment.

    One block_m serves the whole forward (one launch): 1 when every segment is a single token
    (decode), about 64 rows when the longest is shorter than LARGE_TILE_TOKENS, else about 128."""
    lengths = np.asarray(seg_lengths, dtype=np.int64)
    longest = int(lengths.max()) if lengths.size else 0
    choices = block_m_choices(group)
    if longest <= 1:
        block_m = choices[0]
    elif longest < LARGE_TILE_TOKENS:
        block_m = choices[min(1, len(choices) - 1)]
    else:
        block_m = choices[-1]
    counts = -(-lengths // block_m)
    tile_seg = np.repeat(np.arange(lengths.size), counts)
    first_tile = np.cumsum(counts) - counts
    tile_start = (np.arange(tile_seg.size) - np.repeat(first_tile, counts)) * block_m
    return block_m, tile_seg.astype(np.int32), tile_start.astype(np.int32)


def choose_splits(num_tiles: int, num_kv_heads: int, longest_context: int, sm_count: int) -> int:
    """Split each tile's keys over enough programs to fill about two waves of `sm_count` SMs,
    when the unsplit grid would leave SMs idle and each split still gets a few key blocks."""
    programs = max(1, num_tiles * num_kv_heads)
    if programs >= sm_count:
        return 1
    wanted = -(-2 * max(1, sm_count) // programs)
    return max(1, min(MAX_SPLITS, wanted, longest_context // MIN_KEYS_PER_SPLIT))


def workspace_elems(num_tokens: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements for the partial outputs [splits, T, Hq, D] and their log-sum-exps [splits, T, Hq]."""
    return 0 if num_splits <= 1 else num_splits * num_tokens * num_heads * (head_dim + 1)


def _tile_shape(block_m: int, group: int, dtype: torch.dtype) -> dict:
    """Rows padded for tensor cores; float32 (IEEE) dots run on FMA units and keep both operands
    in registers, so float32 takes narrow key blocks. At head_dim 128 the 16-bit variants compile
    without register spills for sm_90a and sm_100a (a few bytes at most on sm_80); float32 ones
    spill a little, which only the exact-reference fp32 engines pay."""
    rows = max(16, 1 << (block_m * group - 1).bit_length())
    block_n = 16 if dtype == torch.float32 else 64
    return {"ROWS": rows, "BLOCK_N": block_n, "num_warps": 4 if rows <= 32 else 8}


def attention_variant(dtype: torch.dtype, head_dim: int, num_kv_heads: int, group: int, block_m: int,
                      split: bool, interpret: bool = False) -> KernelVariant:
    """The main kernel's variant for tensors of `dtype` (q, k, v, caches and out)."""
    shape = _tile_shape(block_m, group, dtype)
    data = pointer(dtype)
    signature = tuple((name, data) for name in ("q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"))
    signature += (("workspace_ptr", "*fp32" if split else data),)  # unused without splits: out stands in
    signature += tuple((name, "*i32") for name in INDEX_ARGUMENTS)
    signature += (("num_tokens", "i32"), ("max_pages", "i32"), ("page_size", "i32"), ("num_splits", "i32"),
                  ("scale", "fp32"))
    constexprs = (("HEAD_DIM", head_dim), ("NUM_KV_HEADS", num_kv_heads), ("GROUP", group), ("BLOCK_M", block_m),
                  ("ROWS", shape["ROWS"]), ("BLOCK_N", shape["BLOCK_N"]), ("SPLIT", split), ("INTERPRET", interpret))
    return KernelVariant("segment_attention", signature, constexprs, num_warps=shape["num_warps"], num_stages=2)


def reduce_variant(dtype: torch.dtype, head_dim: int, num_kv_heads: int, group: int) -> KernelVariant:
    signature = (("workspace_ptr", "*fp32"), ("out_ptr", pointer(dtype)), ("num_tokens", "i32"), ("num_splits", "i32"))
    constexprs = (("HEAD_DIM", head_dim), ("NUM_KV_HEADS", num_kv_heads), ("GROUP", group),
                  ("GROUP_ROWS", 1 << (group - 1).bit_length()))
    return KernelVariant("segment_attention_reduce", signature, constexprs, num_warps=4, num_stages=1)


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    """Every attention variant an engine of `config` in `dtype` may launch."""
    torch_dtype = ENGINE_DTYPES[dtype]
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv_heads
    found = [attention_variant(torch_dtype, head_dim, kv_heads, group, block_m, split)
             for block_m in block_m_choices(group) for split in (False, True)]
    return found + [reduce_variant(torch_dtype, head_dim, kv_heads, group)]


def segment_attention(launcher, q, k, v, k_cache, v_cache, meta: AttentionMeta, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], caches [slots, Hkv, D], all of one dtype -> out [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    for name, tensor in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.dtype != q.dtype or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous {q.dtype}, got {tensor.dtype}")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    num_tiles = meta.tile_seg.numel()
    if num_tokens == 0 or num_tiles == 0:
        return out
    splits = meta.num_splits
    split = splits > 1
    if split and (meta.workspace is None or meta.workspace.numel() < workspace_elems(
            num_tokens, num_heads, head_dim, splits)):
        raise ValueError(f"num_splits={splits} needs a float32 workspace of "
                         f"{workspace_elems(num_tokens, num_heads, head_dim, splits)} elements")
    interpret = launcher.name == "interpret"
    variant = attention_variant(q.dtype, head_dim, num_kv_heads, group, meta.block_m, split, interpret)
    args = (q, k, v, k_cache, v_cache, out, meta.workspace if split else out,
            meta.seg_start, meta.prefix_len, meta.table_row, meta.block_tables, meta.pattern, meta.mask_offset,
            meta.masks, meta.tile_seg, meta.tile_start,
            num_tokens, meta.block_tables.shape[1], meta.page_size, splits, float(scale))
    launcher.launch(variant, (num_tiles, num_kv_heads, splits), args)
    if split:
        launcher.launch(reduce_variant(q.dtype, head_dim, num_kv_heads, group), (num_tokens, num_kv_heads),
                        (meta.workspace, out, num_tokens, splits))
    return out


def reference_segment_attention(q, k, v, k_cache, v_cache, seg_start, prefix_len, table_row, block_tables,
                                page_size, pattern, masks) -> torch.Tensor:
    """Plain PyTorch in float32: gather each segment's prefix through the page table, append its own
    keys, apply the visibility, softmax. masks: one bool [n, n] (or None) per segment. -> [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    device = q.device
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=device)
    for s in range(len(prefix_len)):
        a, b = int(seg_start[s]), int(seg_start[s + 1])
        n, prefix = b - a, int(prefix_len[s])
        if n == 0:
            continue
        positions = torch.arange(prefix, device=device)
        pages = block_tables[int(table_row[s])].to(device).long()[positions // page_size]
        slots = pages * page_size + positions % page_size
        keys = torch.cat([k_cache[slots].float(), k[a:b].float()]).repeat_interleave(group, dim=1)
        values = torch.cat([v_cache[slots].float(), v[a:b].float()]).repeat_interleave(group, dim=1)
        if int(pattern[s]) == CAUSAL:
            own = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        elif int(pattern[s]) == FULL:
            own = torch.ones(n, n, dtype=torch.bool, device=device)
        else:
            own = masks[s].to(device).bool()
        visible = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), own], dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[a:b].float(), keys) * head_dim ** -0.5
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[a:b] = torch.einsum("hqk,khd->qhd", weights, values)
    return out
