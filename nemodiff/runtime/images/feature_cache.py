"""A bounded cache of image-encoder outputs, keyed by the content of the preprocessed image.

checkpoint ──builder──▶ engine dir ──[runtime: vision feature cache]──▶ Triton

Agent loops resend the same image turn after turn; the vision tower runs once per distinct
image. Entries are evicted least-recently-used once their total size passes `max_bytes`.
`hits` counts images served without running the tower (including repeats within one call).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def content_key(image: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and values."""
    data = image.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class VisionFeatureCache:
    def __init__(self, max_bytes: int = 256 << 20):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: never kept
        if key in self._entries:
            self.bytes -= self._nbytes(self._entries.pop(key))
        self._entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= self._nbytes(evicted)
            self.evictions += 1

    def record(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self),
                "bytes": self.bytes, "max_bytes": self.max_bytes}

    @staticmethod
    def _nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()
