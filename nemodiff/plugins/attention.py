"""Paged segment attention: the host wrapper, tile planning and the variants of the Triton kernel.

checkpoint ──builder (compiles `variants`)──▶ engine dir ──[runtime: segment_attention]──▶ Triton

A forward is a ragged batch of segments (docs/design.md §4). Each query of segment s sees the request's
committed prefix (`prefix_len[s]` keys in the paged cache, all visible) and the segment's own
keys under its pattern: 0 causal, 1 full, 2 explicit mask (a bitmask, see `pack_bitmask`).
`plan_tiles` cuts segments into query tiles of `block_m` tokens (one tile shape for every mode),
`chunk_keys_for` fixes the key chunks of a cache, `choose_splits` picks how many programs share a
tile's chunks, and `segment_attention` launches the kernel of attention_kernels.py
through a launcher (interpreter, JIT or ahead of time): one launch takes the fused q/k/v
projection, applies RoPE and the llama-4 query scale, stores the segment's k and v into the paged
cache, attends, and merges its KV splits. The kernel's layout and algorithm are described there;
`reference_segment_attention` is the plain PyTorch oracle of the attention itself and
`reference_fused_attention` of the whole launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from nemodiff.engine_format import ModelConfig

from .attention_kernels import segment_attention_kernel
from .scratch import Counters, fresh_counters
from .spec import KernelVariant, pointer

KERNELS = {"segment_attention": segment_attention_kernel}

CAUSAL, FULL, MASK = 0, 1, 2
MAX_SPLITS = 32
MAX_CHUNKS = 64  # chunks a request's longest context is cut into, at most (sizes chunk_keys)
KEY_BLOCK = 64  # chunk_keys is a multiple of every variant's key block
TILE_ROWS = 64  # rows (query tokens x heads of a KV head) of every query tile
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


class Rope(Protocol):
    """The rotary parameters the kernel applies (nemodiff/runtime/model/rope.py's RotaryEmbedding is one)."""

    inv_freq: torch.Tensor  # float32 [head_dim / 2]
    attention_factor: float  # multiplies cos and sin
    beta: float  # llama-4 query scale: 1 + beta * ln(1 + floor(pos / original_max))
    original_max: int


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
    """Query tokens per tile: one choice, about TILE_ROWS rows (tokens x group), for every segment.
    One tile shape for decode, verify and prefill keeps a row's products on the same instructions
    whatever the batch (on Hopper a 16-row tile runs mma.sync, a 64-row one wgmma); decode pays
    padded rows in compute, which its memory-bound attention has to spare."""
    return (max(1, TILE_ROWS // group),)


def plan_tiles(seg_lengths: np.ndarray, group: int) -> tuple[int, np.ndarray, np.ndarray]:
    """-> (block_m, tile_seg, tile_start): one tile per block_m query tokens of each segment."""
    lengths = np.asarray(seg_lengths, dtype=np.int64)
    block_m = block_m_choices(group)[0]
    counts = -(-lengths // block_m)
    tile_seg = np.repeat(np.arange(lengths.size), counts)
    first_tile = np.cumsum(counts) - counts
    tile_start = (np.arange(tile_seg.size) - np.repeat(first_tile, counts)) * block_m
    return block_m, tile_seg.astype(np.int32), tile_start.astype(np.int32)


def chunk_keys_for(max_keys: int) -> int:
    """Keys per chunk for a cache whose requests hold at most `max_keys` keys: whole KEY_BLOCKs, few
    enough chunks (<= MAX_CHUNKS) that their outputs fit a workspace. A constant of the cache, so a
    query's chunks, and with them its result's bits, never depend on the batch."""
    blocks = -(-max(1, max_keys) // KEY_BLOCK)
    return KEY_BLOCK * max(1, -(-blocks // MAX_CHUNKS))


def chunk_slots(max_keys: int, num_tokens: int) -> int:
    """Chunks a forward of `num_tokens` tokens may touch (its prefixes plus its own keys), at most."""
    return -(-(max_keys + num_tokens) // chunk_keys_for(max_keys))


def choose_splits(num_tiles: int, num_kv_heads: int, longest_context: int, sm_count: int,
                  chunk_keys: int = KEY_BLOCK) -> int:
    """Split each tile's chunks over enough programs to fill about two waves of `sm_count` SMs,
    when the unsplit grid would leave SMs idle; never more programs than chunks. Only speed: every
    split count gives the same bits."""
    programs = max(1, num_tiles * num_kv_heads)
    if programs >= sm_count:
        return 1
    wanted = -(-2 * max(1, sm_count) // programs)
    return max(1, min(MAX_SPLITS, wanted, -(-longest_context // chunk_keys)))


def workspace_elems(num_tokens: int, num_heads: int, head_dim: int, chunks: int) -> int:
    """float32 elements for the chunk outputs [chunks, T, Hq, D] and their log-sum-exps [chunks, T, Hq]."""
    return 0 if chunks <= 1 else chunks * num_tokens * num_heads * (head_dim + 1)


def _tile_shape(block_m: int, group: int, dtype: torch.dtype) -> dict:
    """Rows padded for tensor cores; float32 (IEEE) dots run on FMA units and keep both operands
    in registers, so float32 takes narrow key blocks. At head_dim 128 the 16-bit variants compile
    without register spills for sm_90a and sm_100a (32 bytes of stack: libdevice's sin/cos scratch);
    on sm_80 the 32-token tiles spill about 400 bytes. float32 ones spill heavily (the compiler
    computes the key rotation in the FMA dot's replicated operand layout: about 600 bytes at decode,
    20 KB at 32-token tiles), which only the exact-reference fp32 engines pay."""
    rows = max(16, 1 << (block_m * group - 1).bit_length())
    block_n = 16 if dtype == torch.float32 else 64
    return {"ROWS": rows, "BLOCK_N": block_n, "num_warps": 4 if rows <= 32 else 8}


@lru_cache(maxsize=None)  # one variant object per specialisation: its key is hashed once
def attention_variant(dtype: torch.dtype, head_dim: int, num_kv_heads: int, group: int, block_m: int,
                      split: bool, interpret: bool = False) -> KernelVariant:
    """The kernel's variant for tensors of `dtype` (qkv, caches and out); positions and slots are int64."""
    shape = _tile_shape(block_m, group, dtype)
    data = pointer(dtype)
    signature = (("qkv_ptr", data), ("positions_ptr", "*i64"), ("slots_ptr", "*i64"), ("inv_freq_ptr", "*fp32"),
                 ("k_cache_ptr", data), ("v_cache_ptr", data), ("out_ptr", data),
                 ("workspace_ptr", "*fp32" if split else data),  # unused without splits: out stands in
                 ("counters_ptr", "*i32"))
    signature += tuple((name, "*i32") for name in INDEX_ARGUMENTS)
    signature += (("num_tokens", "i32"), ("max_pages", "i32"), ("page_size", "i32"), ("num_splits", "i32"),
                  ("chunk_keys", "i32"), ("max_chunks", "i32"), ("scale", "fp32"), ("attention_factor", "fp32"), ("beta", "fp32"), ("original_max", "fp32"))
    constexprs = (("HEAD_DIM", head_dim), ("NUM_KV_HEADS", num_kv_heads), ("GROUP", group), ("BLOCK_M", block_m),
                  ("ROWS", shape["ROWS"]), ("BLOCK_N", shape["BLOCK_N"]), ("SPLIT", split),
                  ("INTERPRET", interpret))
    return KernelVariant("segment_attention", signature, constexprs, num_warps=shape["num_warps"], num_stages=2)


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    """Every attention variant an engine of `config` in `dtype` may launch."""
    torch_dtype = ENGINE_DTYPES[dtype]
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv_heads
    return [attention_variant(torch_dtype, head_dim, kv_heads, group, block_m, split)
            for block_m in block_m_choices(group) for split in (False, True)]


def segment_attention(launcher, qkv: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor, rope: Rope,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float,
                      num_heads: int, num_kv_heads: int, head_dim: int, out: torch.Tensor | None = None,
                      counters: Counters | None = None) -> torch.Tensor:
    """Attention of a ragged batch of segments straight from the fused projection, in one launch.

    qkv [T, (Hq + 2 Hkv) * D]; positions, write_slots int64 [T] (slot -1: the token's k/v are not
    stored); caches [slots, Hkv, D], all data of one dtype -> out [T, Hq, D]. Stores each written
    token's rotated k and its v into the caches; `counters` count split arrivals (fresh when None)."""
    num_tokens = qkv.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or not qkv.is_contiguous():
        raise ValueError(f"qkv must be contiguous [T, {(num_heads + 2 * num_kv_heads) * head_dim}], "
                         f"got {tuple(qkv.shape)}")
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if positions.shape != (num_tokens,) or write_slots.shape != (num_tokens,) \
            or positions.dtype != torch.int64 or write_slots.dtype != torch.int64:
        raise ValueError("positions and write_slots must be int64 [T]")
    if rope.inv_freq.dtype != torch.float32 or rope.inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must be float32 [{head_dim // 2}]")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[1:] != (num_kv_heads, head_dim) or cache.dtype != qkv.dtype \
                or not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous [slots, {num_kv_heads}, {head_dim}] in {qkv.dtype}")
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device) if out is None else out
    num_tiles = meta.tile_seg.numel()
    if num_tokens == 0 or num_tiles == 0:
        return out
    splits = meta.num_splits
    split = splits > 1
    max_keys = meta.block_tables.shape[1] * meta.page_size
    chunk_keys, slots = chunk_keys_for(max_keys), chunk_slots(max_keys, num_tokens)
    if split and (meta.workspace is None or meta.workspace.numel() < workspace_elems(
            num_tokens, num_heads, head_dim, slots)):
        raise ValueError(f"num_splits={splits} needs a float32 workspace of "
                         f"{workspace_elems(num_tokens, num_heads, head_dim, slots)} elements")
    need = num_tiles * num_kv_heads if split else 1  # one arrival counter per tile and KV head
    counted = counters.get(need, qkv.device) if counters is not None else fresh_counters(need, qkv.device)
    interpret = launcher.name == "interpret"
    variant = attention_variant(qkv.dtype, head_dim, num_kv_heads, group, meta.block_m, split, interpret)
    args = (qkv, positions, write_slots, rope.inv_freq, k_cache, v_cache, out, meta.workspace if split else out,
            counted, meta.seg_start, meta.prefix_len, meta.table_row, meta.block_tables, meta.pattern,
            meta.mask_offset, meta.masks, meta.tile_seg, meta.tile_start,
            num_tokens, meta.block_tables.shape[1], meta.page_size, splits, chunk_keys, slots, float(scale),
            float(rope.attention_factor), float(rope.beta), float(rope.original_max))
    launcher.launch(variant, (num_tiles, num_kv_heads, splits), args)
    return out


def reference_fused_attention(qkv, positions, write_slots, rope: Rope, k_cache, v_cache, seg_start, prefix_len,
                              table_row, block_tables, page_size, pattern, masks, num_heads, num_kv_heads, head_dim):
    """What one launch computes, from the runtime's PyTorch pieces: RoPE, query scale and the cache write
    (nemodiff/plugins/rotary.py, in place on the caches), then `reference_segment_attention` (float32 [T, Hq, D])."""
    from .rotary import reference_rotary_kv_write

    q, k, v = reference_rotary_kv_write(qkv, positions, write_slots, rope.inv_freq, rope.attention_factor, rope.beta,
                                        rope.original_max, k_cache, v_cache, num_heads, num_kv_heads, head_dim)
    return reference_segment_attention(q, k, v, k_cache, v_cache, seg_start, prefix_len, table_row, block_tables,
                                       page_size, pattern, masks)


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
