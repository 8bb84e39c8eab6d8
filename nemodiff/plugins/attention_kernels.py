"""The Triton kernel of paged segment attention (the host side and the contract are in attention.py).

checkpoint ──builder (compiles it per arch)──▶ engine dir ──[runtime: attention kernel]──▶ Triton

One launch per layer does what rotary_kv_write, segment_attention and the split-KV reduce did:

- Input is the fused projection `qkv [T, (Hq + 2 Hkv) * D]`. Queries and the segment's own keys
  are rotated as they are read (YaRN rotate-half RoPE, docs/design.md §3: cos/sin from
  `positions * inv_freq` in float32 times the attention factor, every product rounded to the
  activation dtype where the runtime's PyTorch path rounds it), and the queries scaled by
  `1 + beta * ln(1 + floor(pos / original_max))`. The two halves of a head are rotated as
  [rows, D/2] tiles (half the registers and transcendentals of whole rows) and joined side by side
  into one [rows, D] tile, so that q.k stays one dot over the head.
- Each token's rotated k and its v go into the paged cache at its slot (-1: not written), once per
  token and KV head: by the program of the token's own query tile whose split reads the token's
  key block (every tile reads its own tokens' keys, and exactly one split reads each block).
- With split KV, the tile's last program to finish merges the splits (see the end of the kernel).

No race between the cache write and the reads: within one forward the kernel reads from the cache
only committed prefixes, positions < prefix_len of each segment's own request, through its page
table. The slots a forward writes are its segments' own tokens, at positions >= that segment's
prefix_len; a request has at most one segment per forward (the engine schedules one), and
shared prefix-cache pages are full committed pages, never written (docs/design.md §10). A
segment's own keys come from qkv, never from the slots being written.

One program owns one query tile (BLOCK_M tokens of one segment), one KV head, and one split of
that tile's keys. Its ROWS = BLOCK_M x GROUP rows are every query head sharing the KV head (row r
is token r // GROUP, head r % GROUP), padded to a power of two of at least 16, so each K/V block is
read once for all of them and both products run on tensor cores. Every segment (decode, verify,
draft, prefill) takes the same tile shape, so a row's products run on the same instructions in
every mode.

Batch invariance (docs/design.md, "What is bit-exact where"): a request's keys are numbered by
position, the committed prefix first (gathered from the paged cache through the page table), then
the segment's own keys (read from qkv under the segment's pattern). Key blocks of BLOCK_N and chunks
of `chunk_keys` keys (a constant of the engine's KV cache) are counted from position 0, whatever
the segment. Each chunk is an online softmax over its blocks in order; the chunks' outputs are
folded in chunk order. Split s of `num_splits` takes an equal run of chunks and stores each chunk's
output; the tile's last program folds them. A key a row must not see adds exactly nothing (its
probability is 0), so a query's result depends on its own keys only: not on its segment's length,
on how many programs share the tile, or on the rest of the batch.

The kernel is self-contained (no calls to other jitted functions): the interpreter launcher wraps
it alone. With INTERPRET set, dot operands are upcast to float32, because the interpreter's
bfloat16 dot is wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Finite stand-in for minus infinity: exp2 of a difference of two of them is 1, never NaN.
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def segment_attention_kernel(
    qkv_ptr, positions_ptr, slots_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, out_ptr, workspace_ptr, counters_ptr,
    seg_start_ptr, prefix_len_ptr, table_row_ptr, block_tables_ptr, pattern_ptr, mask_offset_ptr, masks_ptr,
    tile_seg_ptr, tile_start_ptr,
    num_tokens, max_pages, page_size, num_splits, chunk_keys, max_chunks, scale, attention_factor, beta, original_max,
    HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads: tl.constexpr = NUM_KV_HEADS * GROUP
    qkv_stride: tl.constexpr = (num_heads + 2 * NUM_KV_HEADS) * HEAD_DIM
    half: tl.constexpr = HEAD_DIM // 2
    dtype = out_ptr.dtype.element_ty

    seg = tl.load(tile_seg_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)
    first_token = tl.load(seg_start_ptr + seg)
    seg_len = tl.load(seg_start_ptr + seg + 1) - first_token
    prefix = tl.load(prefix_len_ptr + seg)
    table_row = tl.load(table_row_ptr + seg).to(tl.int64)
    pattern = tl.load(pattern_ptr + seg)
    mask_offset = tl.load(mask_offset_ptr + seg)
    mask_words = (seg_len + 31) // 32

    # rotate-half in halves of the head: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], cos/sin [*, D/2]
    dims = tl.arange(0, HEAD_DIM)
    hd = tl.arange(0, half)
    inv_freq = tl.load(inv_freq_ptr + hd)
    k_column = (num_heads + kv_head) * HEAD_DIM  # this KV head's k in a qkv row; v follows all k heads
    v_column = (num_heads + NUM_KV_HEADS + kv_head) * HEAD_DIM

    rows = tl.arange(0, ROWS)
    query = tile_start + rows // GROUP  # query index inside the segment
    row_ok = (rows < BLOCK_M * GROUP) & (query < seg_len)
    head = kv_head * GROUP + rows % GROUP
    token = (first_token + query).to(tl.int64)
    position = tl.load(positions_ptr + token, mask=row_ok, other=0).to(tl.float32)
    angle = position[:, None] * inv_freq[None, :]
    cos = (tl.cos(angle) * attention_factor).to(dtype).to(tl.float32)
    sin = (tl.sin(angle) * attention_factor).to(dtype).to(tl.float32)
    q_src = qkv_ptr + token[:, None] * qkv_stride + (head * HEAD_DIM)[:, None] + hd[None, :]
    x1 = tl.load(q_src, mask=row_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(q_src + half, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_scale = (1.0 + beta * tl.log(1.0 + tl.floor(position / original_max))).to(dtype).to(tl.float32)[:, None]
    # each rounded like the PyTorch path: products, their sum, then the product with the rounded scale
    q1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    q2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # the two halves side by side: one [ROWS, D] tile, so that q.k is one dot over the whole head
    q = tl.reshape(tl.permute(tl.join((q1 * q_scale).to(dtype), (q2 * q_scale).to(dtype)), (0, 2, 1)),
                   (ROWS, HEAD_DIM))
    if INTERPRET:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E

    # Keys are numbered by their position in the request: the committed prefix (gathered from the paged
    # cache), then the segment's own keys (rotated from qkv). Key blocks of BLOCK_N and chunks of
    # chunk_keys keys are counted from position 0 whatever the segment, so a query meets the same
    # blocks and chunks (holding the same values) as an AR step at its position would.
    own_keys = tl.where(pattern == 0, tl.minimum(seg_len, tile_start + BLOCK_M), seg_len)
    # Own keys each row sees by rule (causal: up to itself; full: all; mask: none, the bits decide);
    # only MASK segments read bitmask words. Scalar conditions stay out of block masks, which the
    # interpreter mishandles.
    rule_keys = tl.where(pattern == 0, query + 1, tl.where(pattern == 1, seg_len, 0))
    mask_keys = tl.where(pattern == 2, seg_len, 0)
    chunk_blocks = chunk_keys // BLOCK_N
    prefix_blocks = prefix // BLOCK_N  # blocks wholly inside the prefix; the next ones may mix in own keys
    total_blocks = tl.cdiv(prefix + own_keys, BLOCK_N)
    total_chunks = tl.cdiv(total_blocks, chunk_blocks)
    first_chunk = 0
    end_chunk = total_chunks
    used_splits = 1  # splits that get at least one chunk; split 0 always does
    if SPLIT:
        per_split = tl.cdiv(total_chunks, num_splits)
        first_chunk = tl.minimum(split * per_split, total_chunks)
        end_chunk = tl.minimum(first_chunk + per_split, total_chunks)
        used_splits = tl.cdiv(total_chunks, per_split)
    cols = tl.arange(0, BLOCK_N)
    lse_base = tl.cast(max_chunks, tl.int64) * num_tokens * num_heads * HEAD_DIM

    # The fold of the chunk outputs, in chunk order: out = sum_c w_c o_c / sum_c w_c with
    # w_c = 2^(lse_c - max lse). The merge of split programs runs the same fold on the same values.
    f_m = tl.full([ROWS], float("-inf"), tl.float32)
    f_den = tl.zeros([ROWS], tl.float32)
    f_out = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for chunk in range(first_chunk, end_chunk):
        c_first = chunk * chunk_blocks
        c_end = tl.minimum(c_first + chunk_blocks, total_blocks)
        m_i = tl.full([ROWS], NEG_BIG, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)

        # 1) blocks wholly inside the committed prefix, gathered through the page table, all visible
        for block in range(c_first, tl.minimum(c_end, prefix_blocks)):
            pos = block * BLOCK_N + cols
            page = tl.load(block_tables_ptr + table_row * max_pages + pos // page_size)
            slot = page.to(tl.int64) * page_size + pos % page_size
            kv_rows = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
            k = tl.load(k_cache_ptr + kv_rows[:, None] + dims[None, :])
            v = tl.load(v_cache_ptr + kv_rows[:, None] + dims[None, :])
            if INTERPRET:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            qk = tl.where(row_ok[:, None], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if INTERPRET:  # the compiled dot takes P in the value dtype: round it as the cubin does
                p = p.to(dtype).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        # 2) the prefix's last partial block and the segment's own keys, rotated as they are read from
        #    qkv, under its pattern: 0 causal, 1 full, 2 explicit bitmask
        for block in range(tl.maximum(c_first, prefix_blocks), c_end):
            pos = block * BLOCK_N + cols
            in_prefix = pos < prefix
            key = tl.maximum(pos - prefix, 0)  # own key index (0 for prefix keys, which is_own masks)
            is_own = (pos >= prefix) & (key < own_keys)
            page = tl.load(block_tables_ptr + table_row * max_pages + pos // page_size, mask=in_prefix, other=0)
            slot = page.to(tl.int64) * page_size + pos % page_size
            kv_rows = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
            k_old = tl.load(k_cache_ptr + kv_rows[:, None] + dims[None, :], mask=in_prefix[:, None], other=0.0)
            v_old = tl.load(v_cache_ptr + kv_rows[:, None] + dims[None, :], mask=in_prefix[:, None], other=0.0)
            key_token = (first_token + key).to(tl.int64)
            key_pos = tl.load(positions_ptr + key_token, mask=is_own, other=0).to(tl.float32)
            key_angle = key_pos[:, None] * inv_freq[None, :]
            key_cos = (tl.cos(key_angle) * attention_factor).to(dtype).to(tl.float32)
            key_sin = (tl.sin(key_angle) * attention_factor).to(dtype).to(tl.float32)
            k_src = qkv_ptr + key_token[:, None] * qkv_stride
            k1 = tl.load(k_src + k_column + hd[None, :], mask=is_own[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(k_src + k_column + half + hd[None, :], mask=is_own[:, None], other=0.0).to(tl.float32)
            r1 = ((k1 * key_cos).to(dtype).to(tl.float32) - (k2 * key_sin).to(dtype).to(tl.float32)).to(dtype)
            r2 = ((k2 * key_cos).to(dtype).to(tl.float32) + (k1 * key_sin).to(dtype).to(tl.float32)).to(dtype)
            k_new = tl.reshape(tl.permute(tl.join(r1, r2), (0, 2, 1)), (BLOCK_N, HEAD_DIM))
            v_new = tl.load(k_src + v_column + dims[None, :], mask=is_own[:, None], other=0.0)
            # this tile's own tokens go into the cache: each (token, KV head) once, by the one program
            # of its tile whose split holds the token's key block
            writes = is_own & (key >= tile_start) & (key < tile_start + BLOCK_M)
            w_slot = tl.load(slots_ptr + key_token, mask=writes, other=-1)
            writes = writes & (w_slot >= 0)
            w_rows = (w_slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
            tl.store(k_cache_ptr + w_rows[:, None] + hd[None, :], r1, mask=writes[:, None])
            tl.store(k_cache_ptr + w_rows[:, None] + half + hd[None, :], r2, mask=writes[:, None])
            tl.store(v_cache_ptr + w_rows[:, None] + dims[None, :], v_new, mask=writes[:, None])
            k = tl.where(in_prefix[:, None], k_old, k_new)
            v = tl.where(in_prefix[:, None], v_old, v_new)
            if INTERPRET:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            words = tl.load(masks_ptr + (mask_offset + query * mask_words)[:, None] + (key // 32)[None, :],
                            mask=row_ok[:, None] & (is_own & (key < mask_keys))[None, :], other=0)
            own_visible = (key[None, :] < rule_keys[:, None]) | (((words >> (key % 32)[None, :]) & 1) != 0)
            visible = (in_prefix[None, :] | (own_visible & is_own[None, :])) & row_ok[:, None]
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if INTERPRET:
                p = p.to(dtype).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        # the chunk's output and log-sum-exp (base 2): kept for the merge when splits share the tile,
        # and folded in
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows that see no key of the chunk add nothing to the fold
        c_out = acc / l_safe[:, None]
        c_lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), NEG_BIG)
        if SPLIT:
            if used_splits > 1:
                part = (chunk * num_tokens + first_token + query).to(tl.int64) * num_heads + head
                tl.store(workspace_ptr + part[:, None] * HEAD_DIM + dims[None, :], c_out, mask=row_ok[:, None])
                tl.store(workspace_ptr + lse_base + part, c_lse, mask=row_ok)
        f_next = tl.maximum(f_m, c_lse)
        f_alpha = tl.exp2(f_m - f_next)
        f_weight = tl.exp2(c_lse - f_next)
        f_den = f_den * f_alpha + f_weight
        f_out = f_out * f_alpha[:, None] + c_out * f_weight[:, None]
        f_m = f_next

    out_rows = (token * num_heads + head) * HEAD_DIM
    if used_splits == 1:  # one program folded every chunk (always so without SPLIT): the result is final
        if split == 0:
            f_safe = tl.where(f_den > 0, f_den, 1.0)
            tl.store(out_ptr + out_rows[:, None] + dims[None, :], (f_out / f_safe[:, None]).to(dtype),
                     mask=row_ok[:, None])
    if SPLIT:
        # Every program of the tile counts its arrival; the last one folds the chunks in order (the same
        # fold, on the same values, as one program folding them all) and zeroes the counter again for
        # the next launch or graph replay. The CTA barrier puts all threads' partial stores before the
        # single gpu-scope acq_rel atomic; the last arrival's acquire makes every split's stores
        # visible to it, and its loads bypass L1 (.cg).
        tl.debug_barrier()
        counter = counters_ptr + tile * NUM_KV_HEADS + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            tl.store(counter, 0)
            if used_splits > 1:
                m = tl.full([ROWS], float("-inf"), tl.float32)
                den = tl.zeros([ROWS], tl.float32)
                merged = tl.zeros([ROWS, HEAD_DIM], tl.float32)
                for c in range(0, total_chunks):
                    c_part = (c * num_tokens + first_token + query).to(tl.int64) * num_heads + head
                    s_lse = tl.load(workspace_ptr + lse_base + c_part, mask=row_ok, other=NEG_BIG,
                                    cache_modifier=".cg")
                    s_out = tl.load(workspace_ptr + c_part[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None],
                                    other=0.0, cache_modifier=".cg")
                    m_next = tl.maximum(m, s_lse)
                    s_alpha = tl.exp2(m - m_next)
                    s_weight = tl.exp2(s_lse - m_next)
                    den = den * s_alpha + s_weight
                    merged = merged * s_alpha[:, None] + s_out * s_weight[:, None]
                    m = m_next
                safe = tl.where(den > 0, den, 1.0)
                tl.store(out_ptr + out_rows[:, None] + dims[None, :], (merged / safe[:, None]).to(dtype),
                         mask=row_ok[:, None])
