"""PyTorch references for the CUDA kernels: the exact semantics each kernel must match.

checkpoint ──builder (compiles kernels)──▶ engine dir ──runtime (kernels or these)──▶ Triton

These run anywhere (CPU included). The runtime's own paths (runtime/attention.py,
the diffusion and speculative strategies) compute the same functions; tests check them
against each other on CPU and the device script checks the kernels against these on GPU.
"""

from __future__ import annotations

import torch

from nemodiff.runtime.attention import segment_attention


def paged_segment_attention(q, k_new, v_new, k_cache, v_cache, seg_start, prefix_len, block_tables, page_size,
                            patterns, masks) -> torch.Tensor:
    """q [T, Hq, D]; k/v_new [T, Hkv, D]; caches [slots, Hkv, D]; seg_start [S+1]; prefix_len [S];
    block_tables [S, max_pages]; patterns: list of 0/1/2; masks: list of [n, n] bool (or None)."""
    outs = []
    for s in range(len(prefix_len)):
        a, b = int(seg_start[s]), int(seg_start[s + 1])
        n, prefix = b - a, int(prefix_len[s])
        positions = torch.arange(prefix)
        slots = block_tables[s][positions // page_size].long() * page_size + positions % page_size
        if patterns[s] == 0:
            intra = torch.ones(n, n, dtype=torch.bool).tril()
        elif patterns[s] == 1:
            intra = torch.ones(n, n, dtype=torch.bool)
        else:
            intra = masks[s].bool()
        outs.append(segment_attention(q[a:b].float(), k_new[a:b].float(), v_new[a:b].float(),
                                      k_cache[slots].float(), v_cache[slots].float(), intra.to(q.device)))
    return torch.cat(outs).view(q.shape[0], q.shape[1], q.shape[2])


def row_argmax_prob(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.double(), dim=-1)
    prob, argmax = probs.max(dim=-1)
    return argmax.int(), prob.float()


def denoise_select(candidates, confidence, row_start, row_pos, threshold, topk, block_tokens, masked):
    """Returns updated (block_tokens, masked, remaining); inputs are not modified."""
    tokens, flags = block_tokens.clone(), masked.clone()
    remaining = []
    for s in range(len(threshold)):
        r0, r1 = int(row_start[s]), int(row_start[s + 1])
        conf = confidence[r0:r1]
        if r1 > r0:
            if float(threshold[s]) > 0:
                chosen = set(torch.nonzero(conf >= float(threshold[s])).flatten().tolist())
                chosen.add(int(conf.argmax()))
            else:
                order = sorted(range(r1 - r0), key=lambda i: (-float(conf[i]), i))
                chosen = set(order[: int(topk[s])])
            for i in chosen:
                tokens[s, int(row_pos[r0 + i])] = int(candidates[r0 + i])
                flags[s, int(row_pos[r0 + i])] = 0
        remaining.append(int(flags[s].sum()))
    return tokens, flags, torch.tensor(remaining, dtype=torch.int32)


def spec_accept(target_argmax, row_start, drafts, committed):
    accepted, bonus, new_committed = [], [], []
    for s in range(len(committed)):
        r0, m = int(row_start[s]), int(row_start[s + 1] - row_start[s])
        n = 1
        while n < m and int(target_argmax[r0 + n - 1]) == int(drafts[s, n - 1]):
            n += 1
        accepted.append(n)
        bonus.append(int(target_argmax[r0 + n - 1]))
        new_committed.append(int(committed[s]) + n)
    as_int = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return as_int(accepted), as_int(bonus), as_int(new_committed)


def add_rmsnorm(x, delta, weight, eps):
    """Returns (x + delta, weight * rmsnorm(x + delta)) rounded like the runtime's path."""
    from nemodiff.runtime.layers import rms_norm

    summed = x + delta if delta is not None else x
    return summed, rms_norm(summed, weight, eps)
