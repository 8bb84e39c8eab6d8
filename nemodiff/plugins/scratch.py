"""Arrival counters for the kernels that merge their own split work (split-K GEMM, split-KV attention).

checkpoint ──builder──▶ engine dir ──runtime (KernelLibrary hands these to the wrappers)──▶ Triton

A kernel that splits one output tile over several programs counts arrivals in one int32 per
tile: every program adds 1 after storing its partial result, the program that sees the count
reach `splits - 1` merges the partials in a fixed order and stores 0 again. A buffer is zero
between launches, so one buffer serves every launch of one site on one stream and every replay of a
captured CUDA graph, with nothing to reset on the host.

`Counters.get` hands out a zeroed buffer that only grows, one per launch site and stream. A grown buffer never frees the old one:
a CUDA graph captured earlier keeps launching with the old address, which must stay valid (and
zero) for as long as the process lives; the buffers are a few KiB.
"""

from __future__ import annotations

import torch

from nemodiff.device import current_stream_id


class Counters:
    """Arrival counters by launch site and stream. A buffer is zero between launches only on one stream:
    two kernels in flight at once (two streams, or graphs replayed on two streams) must not count in
    the same words, so each launch site ("attention", "gemm") gets buffers of its own, per stream.
    `site(name)` is the view a host wrapper takes; `get` on the root is the site "" of the current stream."""

    def __init__(self):
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._sites: dict[str, _Site] = {}

    def site(self, name: str) -> "_Site":
        found = self._sites.get(name)
        if found is None:
            found = self._sites[name] = _Site(self, name)
        return found

    def get(self, elems: int, device: torch.device, site: str = "") -> torch.Tensor:
        """A zeroed int32 buffer of at least `elems` counters on `device` for `site` on the current stream
        (the same one while it is big enough)."""
        device = torch.device(device)
        held = self._buffers.setdefault((device, site, current_stream_id(device)), [])
        if not held or held[-1].numel() < elems:
            size = max(elems, 2 * held[-1].numel() if held else 256)
            held.append(torch.zeros(size, dtype=torch.int32, device=device))
        return held[-1]


class _Site:
    __slots__ = ("counters", "name")

    def __init__(self, counters: Counters, name: str):
        self.counters, self.name = counters, name

    def get(self, elems: int, device: torch.device) -> torch.Tensor:
        return self.counters.get(elems, device, self.name)


def fresh_counters(elems: int, device: torch.device) -> torch.Tensor:
    """Counters for one call made without a `Counters` (tests, one-off calls)."""
    return torch.zeros(max(elems, 1), dtype=torch.int32, device=device)
