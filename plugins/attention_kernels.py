"""Triton kernels of paged segment attention (the host side and the contract are in attention.py).

checkpoint ──builder (compiles these per arch)──▶ engine dir ──[runtime: attention kernels]──▶ Triton

One program of `segment_attention_kernel` owns one query tile (BLOCK_M tokens of one segment),
one KV head, and one split of that tile's keys. Its ROWS = BLOCK_M x GROUP rows are every query
head sharing the KV head (row r is token r // GROUP, head r % GROUP), padded to a power of two
of at least 16, so each K/V block is read once for all of them and both products run on tensor
cores. A tile's keys are numbered prefix first (gathered from the paged cache through the page
table), then the segment's own keys (read from k/v under the segment's pattern), in blocks of
BLOCK_N; split s of `num_splits` takes an equal run of those blocks, so the grid never depends on
the context length. With splits, each program leaves its normalised partial output and its
log-sum-exp (base 2) in a float32 workspace, and `segment_attention_reduce_kernel` merges them.

Both kernels are self-contained (no calls to other jitted functions): the interpreter launcher
wraps each one alone. With INTERPRET set, dot operands are upcast to float32, because the
interpreter's bfloat16 dot is wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Finite stand-in for minus infinity: exp2 of a difference of two of them is 1, never NaN.
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def segment_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, out_ptr, workspace_ptr,
    seg_start_ptr, prefix_len_ptr, table_row_ptr, block_tables_ptr, pattern_ptr, mask_offset_ptr, masks_ptr,
    tile_seg_ptr, tile_start_ptr,
    num_tokens, max_pages, page_size, num_splits, scale,
    HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads: tl.constexpr = NUM_KV_HEADS * GROUP

    seg = tl.load(tile_seg_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)
    first_token = tl.load(seg_start_ptr + seg)
    seg_len = tl.load(seg_start_ptr + seg + 1) - first_token
    prefix = tl.load(prefix_len_ptr + seg)
    table_row = tl.load(table_row_ptr + seg).to(tl.int64)
    pattern = tl.load(pattern_ptr + seg)
    mask_offset = tl.load(mask_offset_ptr + seg)
    mask_words = (seg_len + 31) // 32

    rows = tl.arange(0, ROWS)
    query = tile_start + rows // GROUP  # query index inside the segment
    row_ok = (rows < BLOCK_M * GROUP) & (query < seg_len)
    head = kv_head * GROUP + rows % GROUP
    q_rows = ((first_token + query).to(tl.int64) * num_heads + head) * HEAD_DIM
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E

    # Own keys this tile can see: causal rows stop at the tile's last query.
    own_keys = tl.where(pattern == 0, tl.minimum(seg_len, tile_start + BLOCK_M), seg_len)
    # Own keys each row sees by rule (causal: up to itself; full: all; mask: none, the bits decide);
    # only MASK segments read bitmask words. Scalar conditions stay out of block masks, which the
    # interpreter mishandles.
    rule_keys = tl.where(pattern == 0, query + 1, tl.where(pattern == 1, seg_len, 0))
    mask_keys = tl.where(pattern == 2, seg_len, 0)
    prefix_blocks = tl.cdiv(prefix, BLOCK_N)
    total_blocks = prefix_blocks + tl.cdiv(own_keys, BLOCK_N)
    first_block = 0
    end_block = total_blocks
    if SPLIT:
        per_split = tl.cdiv(total_blocks, num_splits)
        first_block = tl.minimum(split * per_split, total_blocks)
        end_block = tl.minimum(first_block + per_split, total_blocks)

    m_i = tl.full([ROWS], NEG_BIG, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # 1) the committed prefix, gathered through the page table, all visible
    for block in range(first_block, tl.minimum(end_block, prefix_blocks)):
        pos = block * BLOCK_N + cols
        key_ok = pos < prefix
        page = tl.load(block_tables_ptr + table_row * max_pages + pos // page_size, mask=key_ok, other=0)
        slot = page.to(tl.int64) * page_size + pos % page_size
        kv_rows = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
        k = tl.load(k_cache_ptr + kv_rows[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_rows[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # 2) the segment's own keys under its pattern: 0 causal, 1 full, 2 explicit bitmask
    for block in range(tl.maximum(first_block, prefix_blocks), end_block):
        key = (block - prefix_blocks) * BLOCK_N + cols
        key_ok = key < seg_len
        kv_rows = ((first_token + key).to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_DIM
        k = tl.load(k_ptr + kv_rows[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        words = tl.load(masks_ptr + (mask_offset + query * mask_words)[:, None] + (key // 32)[None, :],
                        mask=row_ok[:, None] & (key < mask_keys)[None, :], other=0)
        visible = (key[None, :] < rule_keys[:, None]) | (((words >> (key % 32)[None, :]) & 1) != 0)
        visible = visible & key_ok[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows that see no key (padding, empty splits) stay finite
    out = acc / l_safe[:, None]
    if SPLIT:
        part = (split * num_tokens + first_token + query).to(tl.int64) * num_heads + head
        tl.store(workspace_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), NEG_BIG)
        lse_base = tl.cast(num_splits, tl.int64) * num_tokens * num_heads * HEAD_DIM
        tl.store(workspace_ptr + lse_base + part, lse, mask=row_ok)
    else:
        tl.store(out_ptr + q_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def segment_attention_reduce_kernel(
    workspace_ptr, out_ptr, num_tokens, num_splits,
    HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    """Merges the splits of one token and one KV head's query heads: out = sum_s w_s o_s / sum_s w_s
    with w_s = 2^(lse_s - max lse)."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_heads: tl.constexpr = NUM_KV_HEADS * GROUP
    rows = tl.arange(0, GROUP_ROWS)
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    head_rows = token.to(tl.int64) * num_heads + kv_head * GROUP + rows
    lse_base = tl.cast(num_splits, tl.int64) * num_tokens * num_heads * HEAD_DIM
    split_stride = tl.cast(num_tokens, tl.int64) * num_heads

    m = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
    den = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], tl.float32)
    for split in range(0, num_splits):
        part = split * split_stride + head_rows
        lse = tl.load(workspace_ptr + lse_base + part, mask=row_ok, other=NEG_BIG)
        o = tl.load(workspace_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        den = den * alpha + w
        acc = acc * alpha[:, None] + o * w[:, None]
        m = m_new
    tl.store(out_ptr + head_rows[:, None] * HEAD_DIM + dims[None, :], (acc / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
