"""Incremental detokenization: each update decodes only a short window of new tokens.

checkpoint ──builder──▶ engine dir ──[runtime: detokenizer]──▶ streaming, stop strings ──▶ Triton

Decoding tokens one by one breaks spaces and multi-byte characters, and decoding the whole
output on every update is O(n²). Like the Hugging Face and vLLM streaming detokenizers, this
keeps two offsets into the ids: text is produced by decoding `ids[prefix:]` and removing the
decoding of `ids[prefix:read]` (the last already-emitted piece, kept as context so spaces and
merges at the boundary come out as in a full decode). A window that ends inside a multi-byte
character (a trailing U+FFFD) emits nothing until the character completes.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], ids: list[int]):
        self.decode = decode
        self.ids = ids  # the request's output ids (a live list: it grows as tokens are appended)
        self.prefix = 0
        self.read = 0
        self.text = ""

    def update(self, upto: int | None = None) -> str:
        """Decode ids up to `upto` (default: all); returns the text added, possibly empty."""
        end = len(self.ids) if upto is None else upto
        if end <= self.read:
            return ""
        before = self.decode(self.ids[self.prefix: self.read]) if self.read > self.prefix else ""
        after = self.decode(self.ids[self.prefix: end])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, end
        self.text += delta
        return delta
