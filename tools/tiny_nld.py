"""A trainable NLD model (autograd) and the joint AR + block-diffusion objective (docs/design.md §2, §3, §6).

[checkpoint: trained here, written by tools/train_default_model.py] ──builder──▶ engine dir ──runtime──▶ Triton

`TinyNLD` mirrors the inference architecture exactly (the Ministral3 layout): RMSNorm
computed in float32 then cast and scaled, rotate-half RoPE with the checkpoint's
YaRN/default inverse frequencies and attention factor, the llama-4 query scale,
grouped-query attention with scale 1/sqrt(head_dim), a SiLU-gated MLP and an untied
`diffusion_head`. `hf_state_dict()` returns the weights under the upstream names.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nemodiff.engine_format import RopeConfig
from nemodiff.runtime.model.rope import inverse_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.hq, self.hkv, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.input_layernorm = RMSNorm(hidden, cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(hidden, cfg["rms_norm_eps"])
        self.q_proj = nn.Linear(hidden, self.hq * self.hd, bias=False)
        self.k_proj = nn.Linear(hidden, self.hkv * self.hd, bias=False)
        self.v_proj = nn.Linear(hidden, self.hkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.hq * self.hd, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x, cos, sin, q_scale, mask):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, self.hq, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.hkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.hkv, self.hd).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin) * q_scale
        k = k * cos + rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.hd ** -0.5, enable_gqa=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, self.hq * self.hd))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyNLD(nn.Module):
    """The NLD backbone + head. `cfg` is the checkpoint's config.json as a dict."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.diffusion_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        params = dict(cfg["rope_parameters"])
        fields = set(RopeConfig.__dataclass_fields__)
        rope = RopeConfig(**{k: v for k, v in params.items() if k in fields})
        inv_freq, self.attention_factor = inverse_frequencies(rope, cfg["head_dim"])
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.beta, self.original_max = rope.llama_4_scaling_beta, rope.original_max_position_embeddings

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """GPT-style init: N(0, std) everywhere, residual outputs scaled by 1/sqrt(2 * layers)."""
        out_std = std / math.sqrt(2 * len(self.layers))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        q_scale = 1 + self.beta * torch.log(1 + torch.floor(positions.float() / self.original_max))
        return cos, sin, q_scale[:, None]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [b, T], positions [T], mask [T, T] bool (True = may attend) -> logits [b, T, vocab]."""
        cos, sin, q_scale = self.rope(positions)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, q_scale, mask)
        return self.diffusion_head(self.norm(x))

    def causal_logits(self, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        return self(torch.tensor([ids]), torch.arange(n), mask)[0]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the upstream checkpoint names (encoder.*, diffusion_head.weight)."""
        return {k: v.detach().clone().contiguous() for k, v in self._hf_parameters().items()}

    @torch.no_grad()
    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        params = self._hf_parameters()
        if set(params) != set(weights):
            raise KeyError(f"weight names differ: {sorted(set(params) ^ set(weights))[:5]}")
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))

    def _hf_parameters(self) -> dict[str, nn.Parameter]:
        out = {"encoder.embed_tokens.weight": self.embed_tokens.weight}
        for i, layer in enumerate(self.layers):
            p = f"encoder.layers.{i}."
            out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{proj}.weight"] = getattr(layer, proj).weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{proj}.weight"] = getattr(layer, proj).weight
        out["encoder.norm.weight"] = self.norm.weight
        out["diffusion_head.weight"] = self.diffusion_head.weight
        return out


def joint_mask(length: int, block: int) -> torch.Tensor:
    """[2L, 2L] mask for the input [noisy x | clean x] (docs/design.md §6).

    A noisy token sees its own noisy block (bidirectional) and the clean tokens of earlier
    blocks; a clean token sees the clean tokens up to itself (causal).
    """
    blocks = torch.arange(length) // block
    noisy_noisy = blocks[:, None] == blocks[None, :]
    noisy_clean = blocks[:, None] > blocks[None, :]
    clean_clean = torch.ones(length, length, dtype=torch.bool).tril()
    top = torch.cat((noisy_noisy, noisy_clean), dim=1)
    bottom = torch.cat((torch.zeros(length, length, dtype=torch.bool), clean_clean), dim=1)
    return torch.cat((top, bottom), dim=0)


def joint_loss(model: TinyNLD, clean: torch.Tensor, mask: torch.Tensor, mask_id: int, alpha: float,
               generator: torch.Generator, eps: float = 1e-3) -> tuple[torch.Tensor, float, float]:
    """Joint AR + block-diffusion loss on a batch of clean sequences [b, L].

    Per sequence t ~ U(eps, 1); each token is replaced by the mask id with probability t.
    Diffusion loss: CE on masked positions weighted 1/t, summed and divided by b * L
    (an unbiased estimate of the per-token masked-diffusion bound). AR loss: mean next-token
    CE on the clean half. Returns (total, diffusion, AR).
    """
    b, length = clean.shape
    t = eps + (1 - eps) * torch.rand(b, 1, generator=generator)
    masked = torch.rand(b, length, generator=generator) < t
    noisy = torch.where(masked, torch.full_like(clean, mask_id), clean)
    positions = torch.arange(length).repeat(2)
    logits = model(torch.cat((noisy, clean), dim=1), positions, mask)
    vocab = logits.shape[-1]
    noisy_logits, clean_logits = logits[:, :length], logits[:, length:]
    ce = F.cross_entropy(noisy_logits.reshape(-1, vocab), clean.reshape(-1), reduction="none").view(b, length)
    diffusion = (ce * masked / t).sum() / (b * length)
    ar = F.cross_entropy(clean_logits[:, :-1].reshape(-1, vocab), clean[:, 1:].reshape(-1))
    return diffusion + alpha * ar, float(diffusion.detach()), float(ar.detach())
