"""Arrival counters for the kernels that merge their own split work (split-K GEMM, split-KV attention).

checkpoint ──builder──▶ engine dir ──runtime (KernelLibrary hands these to the wrappers)──▶ Triton

A kernel that splits one output tile over several programs counts arrivals in one int32 per
tile: every program adds 1 after storing its partial result, the program that sees the count
reach `splits - 1` merges the partials in a fixed order and stores 0 again. A buffer is zero
between launches, so one buffer serves every launch on a stream and every replay of a captured
CUDA graph, with nothing to reset on the host.

`Counters.get` hands out a zeroed buffer that only grows. A grown buffer never frees the old one:
a CUDA graph captured earlier keeps launching with the old address, which must stay valid (and
zero) for as long as the process lives; the buffers are a few KiB.
"""

from __future__ import annotations

import torch


class Counters:
    def __init__(self):
        self._buffers: dict[torch.device, list[torch.Tensor]] = {}

    def get(self, elems: int, device: torch.device) -> torch.Tensor:
        """A zeroed int32 buffer of at least `elems` counters on `device` (the same one while it is big enough)."""
        held = self._buffers.setdefault(torch.device(device), [])
        if not held or held[-1].numel() < elems:
            size = max(elems, 2 * held[-1].numel() if held else 256)
            held.append(torch.zeros(size, dtype=torch.int32, device=device))
        return held[-1]


def fresh_counters(elems: int, device: torch.device) -> torch.Tensor:
    """Counters for one call made without a `Counters` (tests, one-off calls)."""
    return torch.zeros(max(elems, 1), dtype=torch.int32, device=device)
