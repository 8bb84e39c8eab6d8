"""Reference segment attention in PyTorch (CPU and GPU): the semantics every kernel must match.

checkpoint ──builder──▶ engine dir ──[runtime: attention]──▶ Triton

For one segment: keys are the request's committed prefix (read from the paged cache,
all visible) followed by the segment's own fresh keys under its intra-segment pattern.
Grouped-query attention with scale 1/sqrt(head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    """Device-side description of a ragged batch, shared by every layer of one forward
    (what a paged attention kernel reads; built by runtime/model.py::kernel_meta)."""

    token_seg: torch.Tensor  # [T] int32
    seg_start: torch.Tensor  # [S+1] int32
    prefix_len: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, max_pages] int32
    pattern: torch.Tensor  # [S] int32
    mask_offset: torch.Tensor  # [S] int64
    masks: torch.Tensor  # [bytes] uint8 (at least one byte)
    page_size: int
    num_splits: int
    workspace: torch.Tensor | None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                      intra_mask: torch.Tensor) -> torch.Tensor:
    """q: [n, Hq, D]; k, v: [n, Hkv, D]; prefix_k/v: [P, Hkv, D] or None; intra_mask: [n, n] bool.

    Returns [n, Hq * D].
    """
    n, num_heads, head_dim = q.shape
    if prefix_k is not None and prefix_k.shape[0]:
        k = torch.cat((prefix_k, k), dim=0)
        v = torch.cat((prefix_v, v), dim=0)
        prefix = torch.ones(n, prefix_k.shape[0], dtype=torch.bool, device=q.device)
        mask = torch.cat((prefix, intra_mask.to(q.device)), dim=1)
    else:
        mask = intra_mask.to(q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask[None, None], scale=head_dim ** -0.5, enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(n, num_heads * head_dim)
