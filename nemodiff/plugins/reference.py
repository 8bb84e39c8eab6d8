"""The PyTorch math every kernel is checked against, and which the runtime's PyTorch path runs.

checkpoint ──builder──▶ engine dir ──runtime (PyTorch path: these functions)──▶ Triton
                                             (kernel path: plugins/ kernels, equal to these)

RMSNorm and rotary embedding in the rounding order transformers uses. They live with the kernels
(not in the runtime) so that a kernel's reference never reaches up into the runtime; the runtime's
layers import them from here.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back, then scale (the order transformers uses)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
