"""Loading the compiled kernels (ctypes, C ABI) and calling them on torch tensors.

checkpoint ──builder (compiles)──▶ engine dir/kernels/<sm>/ ──[runtime: loads them here]──▶ Triton

A C ABI loaded with ctypes was chosen over a torch C++ extension: the library does not
link against libtorch, so an engine built with one PyTorch runs under another (serving
images pin their own torch), and the builder needs only nvcc, not torch headers.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .compile import LIBRARY_NAME

ABI_VERSION = 1
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
log = logging.getLogger(__name__)

_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float
_SIGNATURES = {
    "nd_segment_attention": [_P] * 10 + [_I, _I, _P, _P, _P, _I, _I, _I, _I, _F, _I, _I, _P, _P],
    "nd_row_argmax_prob": [_P, _I, _I, _P, _P, _P],
    "nd_denoise_select": [_P] * 9 + [_I, _I, _P],
    "nd_spec_accept": [_P, _P, _P, _I, _P, _P, _P, _P, _I, _P],
    "nd_add_rmsnorm": [_P, _P, _P, _P, _I, _I, _F, _I, _P],
}


def gpu_sm(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass
class AttentionMeta:
    """Device-side description of a ragged batch, shared by every layer of one forward."""

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


class KernelLibrary:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        if self._lib.nd_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{self.path}: kernel ABI {self._lib.nd_abi_version()} != {ABI_VERSION}; rebuild")
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int

    @staticmethod
    def _stream(device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def _check(self, name: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{name} failed with CUDA error {status}")

    def segment_attention(self, q, k_new, v_new, k_cache, v_cache, meta: AttentionMeta, scale: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        tokens, hq, hd = q.shape
        out = torch.empty_like(q) if out is None else out
        self._check("segment_attention", self._lib.nd_segment_attention(
            _ptr(q), _ptr(k_new), _ptr(v_new), _ptr(k_cache), _ptr(v_cache), _ptr(out), _ptr(meta.token_seg),
            _ptr(meta.seg_start), _ptr(meta.prefix_len), _ptr(meta.block_tables), meta.block_tables.shape[1],
            meta.page_size, _ptr(meta.pattern), _ptr(meta.mask_offset), _ptr(meta.masks), tokens, hq,
            k_new.shape[1], hd, scale, DTYPE_CODES[q.dtype], meta.num_splits, _ptr(meta.workspace),
            self._stream(q.device)))
        return out

    def row_argmax_prob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = logits.shape
        argmax = torch.empty(rows, dtype=torch.int32, device=logits.device)
        prob = torch.empty(rows, dtype=torch.float32, device=logits.device)
        self._check("row_argmax_prob", self._lib.nd_row_argmax_prob(
            _ptr(logits), rows, vocab, _ptr(argmax), _ptr(prob), self._stream(logits.device)))
        return argmax, prob

    def denoise_select(self, candidates, confidence, row_start, row_pos, threshold, topk, block_tokens, masked):
        remaining = torch.empty(threshold.shape[0], dtype=torch.int32, device=threshold.device)
        self._check("denoise_select", self._lib.nd_denoise_select(
            _ptr(candidates), _ptr(confidence), _ptr(row_start), _ptr(row_pos), _ptr(threshold), _ptr(topk),
            _ptr(block_tokens), _ptr(masked), _ptr(remaining), threshold.shape[0], block_tokens.shape[1],
            self._stream(threshold.device)))
        return remaining

    def spec_accept(self, target_argmax, row_start, drafts, committed):
        count = committed.shape[0]
        accepted, bonus, new_committed = (torch.empty(count, dtype=torch.int32, device=committed.device)
                                          for _ in range(3))
        self._check("spec_accept", self._lib.nd_spec_accept(
            _ptr(target_argmax), _ptr(row_start), _ptr(drafts), drafts.shape[1], _ptr(committed), _ptr(accepted),
            _ptr(bonus), _ptr(new_committed), count, self._stream(committed.device)))
        return accepted, bonus, new_committed

    def add_rmsnorm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty_like(x) if out is None else out
        self._check("add_rmsnorm", self._lib.nd_add_rmsnorm(
            _ptr(x), _ptr(delta), _ptr(weight), _ptr(out), x.shape[0], x.shape[1], eps, DTYPE_CODES[x.dtype],
            self._stream(x.device)))
        return out


def load_for_engine(engine_dir: Path, sm: str | None, device: torch.device) -> KernelLibrary | None:
    """The engine's kernels when they fit this GPU, else None (with one warning line)."""
    if device.type != "cuda" or sm is None:
        return None
    library = Path(engine_dir) / "kernels" / sm / LIBRARY_NAME
    here = gpu_sm(device)
    if here != sm:
        log.warning("nemodiff: engine kernels are for %s but this GPU is %s; using the PyTorch reference path",
                    sm, here)
        return None
    if not library.is_file():
        log.warning("nemodiff: %s missing; using the PyTorch reference path", library)
        return None
    return KernelLibrary(library)
