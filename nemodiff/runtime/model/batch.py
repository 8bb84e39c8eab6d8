"""Packing a step's segments into one ragged forward batch.

checkpoint ──builder──▶ engine dir ──[runtime: segments ▶ batch]──▶ model ──▶ Triton

`BatchBuilder.build(segments)` concatenates the segments' token ids, positions, write flags
and logit rows with numpy (O(1) Python per segment, nothing per token), resolves KV-cache
slots through the cache's persistent page table, and moves everything to the device in one
copy per dtype from a reused (pinned, on a GPU) staging buffer, each part 16-byte aligned
(`nemodiff.device.Staging`). Per-segment metadata the attention
kernels read (`seg_start`, `prefix_len`, `table_row`, `pattern`, masks) comes along; the
PyTorch reference path gathers its prefix keys from the device page table itself.

Under tensor parallelism the workers receive the packed host arrays of rank 0's step
(`BatchBuilder.packed()`) and rebuild the same batch on their device with `unpack()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter

import numpy as np
import torch

from nemodiff.device import Platform, as_platform

from .kv_cache import PagedKVCache
from .segments import Pattern, Segment
from .segments import arange as _arange


@dataclass
class ForwardBatch:
    num_tokens: int
    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    token_slots: torch.Tensor  # [T] int64, KV slot each token writes, -1 = no write
    write_rows: torch.Tensor  # [W] int64 tokens that write
    write_slots: torch.Tensor  # [W] int64 their slots
    logit_rows: torch.Tensor  # [R] int64
    lora_rows: torch.Tensor  # [L] int64
    logit_counts: list[int]  # per segment
    segment_rows: list[np.ndarray]  # per segment: its logit rows, relative to the segment
    # per segment, host side (reference path and bookkeeping)
    bounds: list[tuple[int, int]]
    table_rows: list[int]
    prefix_lens: list[int]
    patterns: list[int]
    masks: list[torch.Tensor | None]  # explicit masks (Pattern.MASK) as dense bool, else None
    # per segment, device side (kernel path; None when the batch was built for the reference path): int32
    seg_start: torch.Tensor | None
    seg_prefix: torch.Tensor | None
    seg_table_row: torch.Tensor | None
    seg_pattern: torch.Tensor | None
    mask_offset: torch.Tensor | None
    mask_bits: torch.Tensor | None
    image_rows: torch.Tensor | None = None  # token rows whose embedding is replaced
    image_embeds: torch.Tensor | None = None
    shape_key: tuple | None = None  # every segment has this steady shape (CUDA graphs)
    token_starts: np.ndarray | None = None  # host: first token row of each segment
    extras: dict = field(default_factory=dict)  # kernel-path metadata, filled by the model

    @property
    def num_segments(self) -> int:
        return len(self.bounds)


@dataclass
class PackedSizes:
    """Part lengths of a packed step: int64 [ids, positions, token_slots (T each), write_rows,
    write_slots (W each), logit_rows (R), lora_rows (L)]; int32 [seg_start (S + 1), prefix, table row,
    pattern, mask offset (S each), mask words (B)]."""

    tokens: int
    writes: int
    logits: int
    lora: int
    segments: int
    mask_words: int

    def int64_parts(self) -> list[int]:
        t, w = self.tokens, self.writes
        return [t, t, t, w, w, self.logits, self.lora]

    def int32_parts(self) -> list[int]:
        s = self.segments
        return [s + 1, s, s, s, s, self.mask_words]


_FLAG_TYPES = (bool, np.bool_)  # a segment's write_kv given as one flag
_SEGMENT_FIELDS = attrgetter("token_ids", "positions", "write_kv", "prefix_len", "request_id", "pattern",
                             "logit_rows", "mask", "use_lora", "shape_key", "image_embeds", "position_offsets")


@lru_cache(maxsize=512)
def _flags(n: int, value: bool) -> np.ndarray:
    flags = np.full(n, value)
    flags.flags.writeable = False
    return flags


class BatchBuilder:
    def __init__(self, platform: Platform | torch.device | str, image_token_id: int | None = None):
        self.platform = platform = as_platform(platform)
        self.device = platform.device
        self.image_token_id = image_token_id
        self._int64 = platform.staging(torch.int64)
        self._int32 = platform.staging(torch.int32)
        self._rows = platform.staging(torch.int64)  # image rows
        self._last_sizes: PackedSizes | None = None
        self._last_image_rows: np.ndarray | None = None
        self._masks: dict[bytes, torch.Tensor] = {}  # unpack(): dense masks by their packed bits

    def packed(self) -> tuple[PackedSizes, np.ndarray, np.ndarray, np.ndarray | None]:
        """The host arrays behind the last built batch: sizes, int64 parts, int32 parts, image rows."""
        sizes = self._last_sizes
        return sizes, self._int64.flat(), self._int32.flat(), self._last_image_rows

    def unpack(self, sizes: PackedSizes, flat64: np.ndarray, flat32: np.ndarray, image_rows: np.ndarray | None,
               image_embeds: torch.Tensor | None, shape_key: tuple | None) -> ForwardBatch:
        """The batch `packed()` described, rebuilt on this builder's device (one upload per dtype)."""
        parts64 = np.split(flat64, np.cumsum(sizes.int64_parts())[:-1])
        parts32 = np.split(flat32, np.cumsum(sizes.int32_parts())[:-1])
        starts, prefix, rows, patterns, offsets, bits = parts32
        logit_rows = parts64[5]
        owners = np.searchsorted(starts, logit_rows, side="right") - 1
        counts = np.bincount(owners, minlength=sizes.segments).tolist()
        segment_rows = np.split(logit_rows - starts[owners], np.cumsum(counts)[:-1])
        masks = [self._dense_mask(int(b - a), bits, int(o)) if p == 2 else None
                 for a, b, p, o in zip(starts[:-1], starts[1:], patterns, offsets)]
        device_rows = None
        if image_rows is not None:
            device_rows = self._rows.upload_one(image_rows)
        return self._assemble(parts64, parts32, counts, segment_rows, masks, device_rows, image_embeds, shape_key)

    def _dense_mask(self, n: int, bits: np.ndarray, offset: int) -> torch.Tensor:
        words = bits[offset: offset + n * -(-n // 32)]
        key = words.tobytes()
        dense = self._masks.get(key)
        if dense is None:
            unpacked = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(n, -1)[:, :n]
            dense = torch.from_numpy(unpacked.astype(bool))
            if len(self._masks) >= 64:
                self._masks.clear()
            self._masks[key] = dense
        return dense

    def build(self, segments: list[Segment], cache: PagedKVCache | None, kernel_meta: bool = True) -> ForwardBatch:
        """kernel_meta: also put the attention kernels' per-segment metadata on the device (False for
        a model on the reference path, which never reads it)."""
        # O(1) Python per segment, nothing per token: the fields are read in one C-level pass
        count = len(segments)
        (ids, positions, write_kv, prefix, request_ids, patterns, logit_rows_of, masks, use_lora,
         keys, image_embeds, offsets) = zip(*map(_SEGMENT_FIELDS, segments))
        rows = list(map(cache.row, request_ids)) if cache is not None else [0] * count
        masked = Pattern.MASK in patterns
        patterns = list(map(int, patterns))
        if masked:
            masks = [m if p == Pattern.MASK else None for m, p in zip(masks, patterns)]
        if count and len(set(map(len, ids))) == 1 and len(set(map(id, write_kv))) == 1:
            # steady steps: every segment has one length and the same write flags
            starts, write_rows, table_row_of_write, counts, local_rows, logit_rows = self._one_shape(
                count, len(ids[0]), write_kv[0], logit_rows_of, rows)
        else:
            starts, write_rows, table_row_of_write, counts, local_rows, logit_rows = self._any_layout(
                ids, write_kv, logit_rows_of, rows)
        total = int(starts[-1])
        ids = np.concatenate(ids).astype(np.int64, copy=False)
        positions = self._positions(segments, positions, offsets, prefix)
        if cache is None and (len(write_rows) or any(prefix)):
            raise ValueError("segments that read or write the KV cache need a cache")
        token_slots = np.full(total, -1, dtype=np.int64)
        if len(write_rows):
            pos = positions[write_rows]
            page_index = pos // cache.page_size
            beyond = page_index >= cache.pages_per_row[table_row_of_write]
            if beyond.any():
                first = int(np.flatnonzero(beyond)[0])
                owner = segments[int(np.searchsorted(starts, write_rows[first], side="right")) - 1]
                raise IndexError(f"request {owner.request_id}: position {int(pos[first])} is beyond its reserved pages")
            pages = cache.tables_host[table_row_of_write, page_index]
            token_slots[write_rows] = pages.astype(np.int64) * cache.page_size + pos % cache.page_size
        lora_rows = (np.concatenate([np.arange(starts[i], starts[i + 1]) for i, lora in enumerate(use_lora) if lora])
                     if any(use_lora) else np.zeros(0, np.int64))
        if not masked:
            mask_offsets, bits, dense = np.zeros(count, dtype=np.int64), [], [None] * count
        elif masks.count(masks[0]) == count:  # one Mask for every segment (steady QuadraticSpec)
            mask_offsets, bits, dense = np.zeros(count, dtype=np.int64), [masks[0].bits], [masks[0].dense] * count
        else:
            mask_offsets, bits, used, placed = [], [], 0, {}
            for mask in masks:  # segments sharing a Mask share its bits
                if mask is None:
                    mask_offsets.append(used)
                elif id(mask) in placed:
                    mask_offsets.append(placed[id(mask)])
                else:
                    placed[id(mask)] = used
                    mask_offsets.append(used)
                    bits.append(mask.bits)
                    used += len(mask.bits)
            dense = [m.dense if m is not None else None for m in masks]
        bits = np.concatenate(bits) if bits else np.zeros(1, dtype=np.int32)
        self._last_sizes = PackedSizes(total, len(write_rows), len(logit_rows), len(lora_rows), len(segments),
                                       len(bits))
        parts64 = [ids, positions, token_slots, write_rows, token_slots[write_rows], logit_rows, lora_rows]
        parts32 = [starts, np.asarray(prefix), np.asarray(rows), np.asarray(patterns), np.asarray(mask_offsets),
                   bits]
        image_rows = embeds = None
        self._last_image_rows = None
        if not all(e is None for e in image_embeds):
            embeds = [e for e in image_embeds if e is not None]
            image_rows, embeds = self._image_rows(segments, ids, starts, embeds)
        key = keys[0] if keys and keys.count(keys[0]) == count else None
        return self._assemble(parts64, parts32, counts, local_rows, dense, image_rows, embeds, key, kernel_meta)

    @staticmethod
    def _positions(segments: list[Segment], positions: tuple, offsets: tuple, prefix: tuple) -> np.ndarray:
        """Every segment's positions, concatenated (one broadcast when all segments share their
        position offsets)."""
        if positions[0] is None and len(set(map(id, positions))) == 1 and len(set(map(id, offsets))) == 1:
            return (np.asarray(prefix, dtype=np.int64)[:, None] + offsets[0]).reshape(-1)
        return np.concatenate([s.absolute_positions() for s in segments]).astype(np.int64, copy=False)

    @staticmethod
    def _one_shape(count: int, length: int, write_kv, logit_rows_of: tuple, table_rows: list[int]):
        """(segment starts, write rows, their table rows, logit counts, local and batch logit rows) of
        `count` segments of one length and write flags, by broadcasting."""
        starts = _arange(count + 1) * length
        if isinstance(write_kv, _FLAG_TYPES):
            local_writes = _arange(length) if write_kv else _arange(0)
        else:
            local_writes = np.flatnonzero(write_kv)
        write_rows = (starts[:-1, None] + local_writes).reshape(-1)
        table_row_of_write = np.repeat(np.asarray(table_rows, dtype=np.int64), len(local_writes))
        if len(set(map(id, logit_rows_of))) == 1:  # the same logit rows for all
            local = _arange(length) if logit_rows_of[0] is None else np.asarray(logit_rows_of[0], dtype=np.int64)
            return (starts, write_rows, table_row_of_write, [len(local)] * count, [local] * count,
                    (starts[:-1, None] + local).reshape(-1))
        local_rows = [_arange(length) if r is None else np.asarray(r, dtype=np.int64) for r in logit_rows_of]
        counts = list(map(len, local_rows))
        return (starts, write_rows, table_row_of_write, counts, local_rows,
                np.concatenate(local_rows) + np.repeat(starts[:-1], counts))

    @staticmethod
    def _any_layout(ids, write_kv, logit_rows_of, table_rows: list[int]):
        """What `_one_shape` gives, for segments of any lengths, write flags and logit rows."""
        count = len(ids)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=count)
        if set(map(type, write_kv)).issubset(_FLAG_TYPES):  # one flag per segment
            writes = np.repeat(np.array(write_kv, dtype=bool), lengths)
        else:
            writes = np.concatenate([_flags(n, bool(w)) if isinstance(w, _FLAG_TYPES) else w
                                     for n, w in zip(lengths.tolist(), write_kv)]).astype(bool, copy=False)
        starts = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        write_rows = np.flatnonzero(writes)
        table_row_of_write = np.repeat(np.asarray(table_rows, dtype=np.int64), lengths)[write_rows]
        local_rows = [_arange(n) if r is None else np.asarray(r, dtype=np.int64)
                      for n, r in zip(lengths.tolist(), logit_rows_of)]
        counts = [len(r) for r in local_rows]
        logit_rows = (np.concatenate(local_rows) + np.repeat(starts[:-1], counts)) if count else np.zeros(0, np.int64)
        return starts, write_rows, table_row_of_write, counts, local_rows, logit_rows

    def _assemble(self, parts64: list[np.ndarray], parts32: list[np.ndarray], counts: list[int],
                  segment_rows: list[np.ndarray], masks: list[torch.Tensor | None], image_rows, image_embeds,
                  shape_key, kernel_meta: bool = True) -> ForwardBatch:
        (d_ids, d_pos, d_slots, d_wrows, d_wslots, d_logits, d_lora) = self._int64.upload(parts64)
        if kernel_meta:
            (d_start, d_prefix, d_trow, d_pattern, d_moff, d_bits) = self._int32.upload(parts32)
        else:
            self._int32.keep(parts32)
            d_start = d_prefix = d_trow = d_pattern = d_moff = d_bits = None
        starts, prefix, rows, patterns = (np.asarray(p) for p in parts32[:4])
        return ForwardBatch(
            num_tokens=int(starts[-1]), ids=d_ids, positions=d_pos, token_slots=d_slots, write_rows=d_wrows,
            write_slots=d_wslots, logit_rows=d_logits, lora_rows=d_lora, logit_counts=counts,
            segment_rows=segment_rows, bounds=list(zip(starts[:-1].tolist(), starts[1:].tolist())),
            table_rows=rows.tolist(), prefix_lens=prefix.tolist(), patterns=patterns.tolist(), masks=masks,
            seg_start=d_start, seg_prefix=d_prefix, seg_table_row=d_trow, seg_pattern=d_pattern,
            mask_offset=d_moff, mask_bits=d_bits, image_rows=image_rows, image_embeds=image_embeds,
            shape_key=shape_key, token_starts=starts[:-1],
        )

    def _image_rows(self, segments, ids, starts, embeds) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_token_id is None:
            raise ValueError("image embeddings were given, but this model has no image token")
        rows = []
        for seg, start in zip(segments, starts[:-1]):
            if seg.image_embeds is None:
                continue
            local = np.flatnonzero(ids[start: start + len(seg)] == self.image_token_id)
            if len(local) != seg.image_embeds.shape[0]:
                raise ValueError(f"request {seg.request_id}: {seg.image_embeds.shape[0]} image embeddings for "
                                 f"{len(local)} image tokens (image token id {self.image_token_id})")
            rows.append(local + start)
        self._last_image_rows = np.concatenate(rows)
        index = self._rows.upload_one(self._last_image_rows)
        return index, torch.cat([e.to(self.device) for e in embeds])
