"""RoPE on the fused projection output, the llama-4 query scale and the paged KV-cache write,
as one Triton kernel.

checkpoint ──builder (compiles `variants`)──▶ engine dir ──runtime (attention input of every layer)──▶ Triton

Input: `qkv [T, (Hq + 2 Hkv) * D]` (the fused q/k/v projection). Output: q `[T, Hq, D]` rotated
(YaRN rotate-half, docs/design.md §3) and multiplied by `1 + beta * ln(1 + floor(pos / original_max))`,
k `[T, Hkv, D]` rotated, v `[T, Hkv, D]` copied, all contiguous; k and v are also stored into one
layer's paged cache (`[num_slots, Hkv, D]`) at `write_slots[t]` for every token whose slot is
>= 0 (-1: not written). cos/sin come from `positions * inv_freq` in float32 times the attention
factor, and every product is rounded to the activation dtype where the runtime's PyTorch path
(`runtime/model/rope.py`, `runtime/model/transformer.py`) rounds it.

Two programs per token: one rotates and scales every query head, the other rotates every key
head, copies every value head and writes both into the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemodiff.engine_format import ModelConfig

from .norm import ACTIVATION_DTYPES
from .spec import KernelVariant, pointer


@triton.jit
def rotary_kv_write_kernel(qkv_ptr, positions_ptr, slots_ptr, inv_freq_ptr, q_ptr, k_ptr, v_ptr,
                           k_cache_ptr, v_cache_ptr, attention_factor, beta, original_max,
                           NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype = q_ptr.dtype.element_ty
    j = tl.arange(0, HALF_BLOCK)[None, :]

    position = tl.load(positions_ptr + token)
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    cos = (tl.cos(angle) * attention_factor).to(dtype).to(tl.float32)
    sin = (tl.sin(angle) * attention_factor).to(dtype).to(tl.float32)

    row = qkv_ptr + token * ((NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM)
    if tl.program_id(1) == 0:  # every query head of the token
        qh = tl.arange(0, Q_BLOCK)[:, None]
        q_mask = (qh < NUM_Q_HEADS) & (j < HALF)
        q1 = tl.load(row + qh * HEAD_DIM + j, mask=q_mask, other=0.0).to(tl.float32)
        q2 = tl.load(row + qh * HEAD_DIM + HALF + j, mask=q_mask, other=0.0).to(tl.float32)
        # rotate-half: [x1, x2] * cos + [-x2, x1] * sin, each product rounded like the PyTorch path
        q_out1 = ((q1 * cos).to(dtype).to(tl.float32) - (q2 * sin).to(dtype).to(tl.float32)).to(dtype)
        q_out2 = ((q2 * cos).to(dtype).to(tl.float32) + (q1 * sin).to(dtype).to(tl.float32)).to(dtype)
        scale = 1.0 + beta * tl.log(1.0 + tl.floor(position.to(tl.float32) / original_max))
        scale = scale.to(dtype).to(tl.float32)
        q_row = q_ptr + token * (NUM_Q_HEADS * HEAD_DIM) + qh * HEAD_DIM
        tl.store(q_row + j, (q_out1.to(tl.float32) * scale).to(dtype), mask=q_mask)
        tl.store(q_row + HALF + j, (q_out2.to(tl.float32) * scale).to(dtype), mask=q_mask)
    else:  # every key and value head of the token, and their cache slots
        kh = tl.arange(0, KV_BLOCK)[:, None]
        kv_mask = (kh < NUM_KV_HEADS) & (j < HALF)
        k_src = row + (NUM_Q_HEADS + kh) * HEAD_DIM
        k1 = tl.load(k_src + j, mask=kv_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_src + HALF + j, mask=kv_mask, other=0.0).to(tl.float32)
        k_out1 = ((k1 * cos).to(dtype).to(tl.float32) - (k2 * sin).to(dtype).to(tl.float32)).to(dtype)
        k_out2 = ((k2 * cos).to(dtype).to(tl.float32) + (k1 * sin).to(dtype).to(tl.float32)).to(dtype)
        v_src = row + (NUM_Q_HEADS + NUM_KV_HEADS + kh) * HEAD_DIM
        v1 = tl.load(v_src + j, mask=kv_mask, other=0.0)
        v2 = tl.load(v_src + HALF + j, mask=kv_mask, other=0.0)
        kv_offset = token * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM
        tl.store(k_ptr + kv_offset + j, k_out1, mask=kv_mask)
        tl.store(k_ptr + kv_offset + HALF + j, k_out2, mask=kv_mask)
        tl.store(v_ptr + kv_offset + j, v1, mask=kv_mask)
        tl.store(v_ptr + kv_offset + HALF + j, v2, mask=kv_mask)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        write = kv_mask & ((kh.to(tl.int64) * 0 + slot) >= 0)
        cache = slot * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM
        tl.store(k_cache_ptr + cache + j, k_out1, mask=write)
        tl.store(k_cache_ptr + cache + HALF + j, k_out2, mask=write)
        tl.store(v_cache_ptr + cache + j, v1, mask=write)
        tl.store(v_cache_ptr + cache + HALF + j, v2, mask=write)


KERNELS = {"rotary_kv_write": rotary_kv_write_kernel}
INDEX_DTYPES = (torch.int64, torch.int32)  # positions and write slots share one of these


def rotary_variant(dtype: torch.dtype, index_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> KernelVariant:
    ptr, index = pointer(dtype), pointer(index_dtype)
    half_block = triton.next_power_of_2(head_dim // 2)
    q_block, kv_block = triton.next_power_of_2(num_heads), triton.next_power_of_2(num_kv_heads)
    return KernelVariant(
        kernel="rotary_kv_write",
        signature=(("qkv_ptr", ptr), ("positions_ptr", index), ("slots_ptr", index), ("inv_freq_ptr", "*fp32"),
                   ("q_ptr", ptr), ("k_ptr", ptr), ("v_ptr", ptr), ("k_cache_ptr", ptr), ("v_cache_ptr", ptr),
                   ("attention_factor", "fp32"), ("beta", "fp32"), ("original_max", "fp32")),
        constexprs=(("NUM_Q_HEADS", num_heads), ("NUM_KV_HEADS", num_kv_heads), ("HEAD_DIM", head_dim),
                    ("Q_BLOCK", q_block), ("KV_BLOCK", kv_block), ("HALF_BLOCK", half_block)),
        num_warps=max(1, min(8, q_block * half_block // 256)),
        num_stages=1,
    )


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    act = ACTIVATION_DTYPES[dtype]
    return [rotary_variant(act, index, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
            for index in INDEX_DTYPES]


def rotary_kv_write(launcher, qkv: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                    inv_freq: torch.Tensor, attention_factor: float, beta: float, original_max: int,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                    head_dim: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) (into `out` when given); writes k/v into the
    caches at write_slots >= 0."""
    tokens = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or not qkv.is_contiguous():
        raise ValueError(f"qkv must be contiguous [T, {(num_heads + 2 * num_kv_heads) * head_dim}], "
                         f"got {tuple(qkv.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if positions.shape != (tokens,) or write_slots.shape != (tokens,):
        raise ValueError("positions and write_slots must be [T]")
    if positions.dtype not in INDEX_DTYPES or write_slots.dtype != positions.dtype:
        raise ValueError("positions and write_slots must share one dtype: int64 or int32")
    if inv_freq.dtype != torch.float32 or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must be float32 [{head_dim // 2}]")
    for cache in (k_cache, v_cache):
        if cache.dim() != 3 or cache.shape[1:] != (num_kv_heads, head_dim) or cache.dtype != qkv.dtype \
                or not cache.is_contiguous():
            raise ValueError(f"caches must be contiguous [slots, {num_kv_heads}, {head_dim}] in {qkv.dtype}")
    if out is None:
        q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        out = (q, k, torch.empty_like(k))
    q, k, v = out
    if tokens:
        variant = rotary_variant(qkv.dtype, positions.dtype, num_heads, num_kv_heads, head_dim)
        launcher.launch(variant, (tokens, 2),
                        (qkv, positions, write_slots, inv_freq, q, k, v, k_cache, v_cache, float(attention_factor),
                         float(beta), float(original_max)))
    return q, k, v


def reference_rotary_kv_write(qkv, positions, write_slots, inv_freq, attention_factor, beta, original_max,
                              k_cache, v_cache, num_heads, num_kv_heads, head_dim):
    """The runtime's PyTorch path (runtime/model/rope.py + the cache write of runtime/model/transformer.py), in place on the caches."""
    from nemodiff.runtime.model.rope import apply_rotary

    dtype, tokens = qkv.dtype, qkv.shape[0]
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)
    scale = (1 + beta * torch.log(1 + torch.floor(positions.float() / original_max))).to(dtype)[:, None, None]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = apply_rotary(q.reshape(tokens, num_heads, head_dim), cos, sin) * scale
    k = apply_rotary(k.reshape(tokens, num_kv_heads, head_dim), cos, sin)
    v = v.reshape(tokens, num_kv_heads, head_dim).contiguous()
    written = write_slots >= 0
    k_cache[write_slots[written]] = k[written]
    v_cache[write_slots[written]] = v[written]
    return q.contiguous(), k.contiguous(), v
