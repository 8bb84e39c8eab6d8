"""Rotary position embedding with YaRN scaling and the llama-4 query scale (docs/design.md §3).

checkpoint ──builder──▶ engine dir ──[runtime: model forward]──▶ Triton

The inverse frequencies and attention factor follow the YaRN paper's formulas in the
same parameterisation Hugging Face transformers uses for `rope_type: yarn`, so causal
logits match `Ministral3ForCausalLM` exactly.
"""

from __future__ import annotations

import math

import torch

from nemodiff.engine_format import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim / 2] float32, attention factor applied to cos and sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    pos_freqs = rope.rope_theta ** exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.rope_theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    def __init__(self, rope: RopeConfig, head_dim: int, device: torch.device):
        inv_freq, self.attention_factor = inverse_frequencies(rope, head_dim)
        self.inv_freq = inv_freq.to(device)
        self.beta = rope.llama_4_scaling_beta
        self.original_max = rope.original_max_position_embeddings

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor:
        """1 + beta * ln(1 + floor(pos / original_max)) per token, [T] float32."""
        return 1 + self.beta * torch.log(1 + torch.floor(positions.float() / self.original_max))
