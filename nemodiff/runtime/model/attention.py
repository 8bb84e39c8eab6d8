"""Reference segment attention in PyTorch (CPU and GPU): the semantics every kernel must match.

checkpoint ──builder──▶ engine dir ──[runtime: attention]──▶ Triton

For one segment: keys are the request's committed prefix (read from the paged cache,
all visible) followed by the segment's own fresh keys under its intra-segment pattern.
Grouped-query attention with scale 1/sqrt(head_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def equal_segments_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                             prefix_v: torch.Tensor, prefix_visible: torch.Tensor,
                             intra_mask: torch.Tensor) -> torch.Tensor:
    """The same function for S segments of equal length n and one intra pattern, in one call.

    q: [S*n, Hq, D]; k, v: [S*n, Hkv, D]; prefix_k/v: [S, P, Hkv, D] (each segment's prefix, padded
    to the longest); prefix_visible: [S, P] bool (False on padding); intra_mask: [n, n] bool.
    Returns [S*n, Hq * D].
    """
    segments, longest = prefix_visible.shape
    n, num_heads, head_dim = q.shape[0] // segments, q.shape[1], q.shape[2]
    keys = torch.cat((prefix_k, k.view(segments, n, *k.shape[1:])), dim=1).transpose(1, 2)
    values = torch.cat((prefix_v, v.view(segments, n, *v.shape[1:])), dim=1).transpose(1, 2)
    mask = torch.cat((prefix_visible[:, None, :].expand(segments, n, longest),
                      intra_mask.to(q.device)[None].expand(segments, n, n)), dim=2)
    out = F.scaled_dot_product_attention(q.view(segments, n, num_heads, head_dim).transpose(1, 2), keys, values,
                                         attn_mask=mask[:, None], scale=head_dim ** -0.5, enable_gqa=True)
    return out.transpose(1, 2).reshape(segments * n, num_heads * head_dim)
