"""RoPE on the fused projection output, the llama-4 query scale and the paged KV-cache write: the
PyTorch reference of what the attention kernel does to its inputs (nemodiff/plugins/attention_kernels.py).

checkpoint ──builder──▶ engine dir ──runtime (attention input of every layer)──▶ Triton

Input: `qkv [T, (Hq + 2 Hkv) * D]` (the fused q/k/v projection). Output: q `[T, Hq, D]` rotated
(YaRN rotate-half, docs/design.md §3) and multiplied by `1 + beta * ln(1 + floor(pos / original_max))`,
k `[T, Hkv, D]` rotated, v `[T, Hkv, D]` copied, all contiguous; k and v are also stored into one
layer's paged cache (`[num_slots, Hkv, D]`) at `write_slots[t]` for every token whose slot is
>= 0 (-1: not written). cos/sin come from `positions * inv_freq` in float32 times the attention
factor, and every product is rounded to the activation dtype where the runtime's PyTorch path
(`nemodiff/runtime/model/rope.py`, `nemodiff/runtime/model/transformer.py`) rounds it. There is no kernel of its own
any more: the attention kernel rotates q and k as it reads them and writes the cache itself.
"""

from __future__ import annotations

import torch

from .reference import apply_rotary


def reference_rotary_kv_write(qkv, positions, write_slots, inv_freq, attention_factor, beta, original_max,
                              k_cache, v_cache, num_heads, num_kv_heads, head_dim):
    """The runtime's PyTorch path (nemodiff/runtime/model/rope.py + the cache write of nemodiff/runtime/model/transformer.py), in place on the caches."""
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
