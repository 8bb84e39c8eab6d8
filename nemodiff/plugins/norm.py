"""Fused residual add + RMSNorm, and plain RMSNorm (the final norm), as one Triton kernel.

checkpoint ──builder (compiles `variants`)──▶ engine dir ──runtime (norms of every layer)──▶ Triton

`add_rmsnorm` does `residual += delta` in place (delta may be None) and returns
`weight * rmsnorm(residual)`. The rounding is the reference's (`nemodiff/plugins/reference.py::rms_norm`, which the runtime's PyTorch path runs):
the add rounds to the activation dtype, the normalisation runs in float32 and is cast to the
dtype, and the weight multiplies in the dtype. One program normalises one row; the hidden size
is a compile-time constant, so every load and store is a full, aligned vector.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from nemodiff.engine_format import ModelConfig

from .reference import rms_norm as reference_rms_norm
from .spec import KernelVariant, pointer

ACTIVATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@triton.jit
def add_rmsnorm_kernel(residual_ptr, delta_ptr, weight_ptr, out_ptr, eps,
                       N_COLS: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N_COLS
    offsets = row * N_COLS + cols
    x = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + offsets, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / N_COLS
    normed = (x32 * (1.0 / tl.sqrt(mean_square + eps))).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, out, mask=mask)


KERNELS = {"add_rmsnorm": add_rmsnorm_kernel}


@lru_cache(maxsize=None)  # one variant object per specialisation: its key is hashed once
def norm_variant(dtype: torch.dtype, hidden: int, has_delta: bool) -> KernelVariant:
    block = triton.next_power_of_2(hidden)
    ptr = pointer(dtype)
    return KernelVariant(
        kernel="add_rmsnorm",
        signature=(("residual_ptr", ptr), ("delta_ptr", ptr), ("weight_ptr", ptr), ("out_ptr", ptr),
                   ("eps", "fp32")),
        constexprs=(("N_COLS", hidden), ("BLOCK", block), ("HAS_DELTA", has_delta)),
        num_warps=max(1, min(16, block // 512)),
        num_stages=1,
    )


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    act = ACTIVATION_DTYPES[dtype]
    return [norm_variant(act, config.hidden_size, has_delta) for has_delta in (True, False)]


def _rows(x: torch.Tensor) -> int:
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"expected a contiguous [rows, hidden] tensor, got shape {tuple(x.shape)}")
    return x.shape[0]


def add_rmsnorm(launcher, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """residual += delta (in place; delta may be None), then weight * rmsnorm(residual)."""
    rows = _rows(residual)
    if delta is not None and (delta.shape != residual.shape or delta.dtype != residual.dtype):
        raise ValueError("delta must match the residual's shape and dtype")
    if delta is not None:
        _rows(delta)
    if weight.dtype != residual.dtype or weight.shape != (residual.shape[1],):
        raise ValueError("weight must be [hidden] in the residual's dtype")
    out = torch.empty_like(residual) if out is None else out
    if rows:
        variant = norm_variant(residual.dtype, residual.shape[1], delta is not None)
        launcher.launch(variant, (rows,), (residual, residual if delta is None else delta, weight, out, float(eps)))
    return out


def rms_norm(launcher, x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * rmsnorm(x); x is not modified."""
    return add_rmsnorm(launcher, x, None, weight, eps, out=out)


def reference_add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch semantics: (residual + delta, weight * rmsnorm(residual + delta)), inputs untouched."""
    summed = residual + delta if delta is not None else residual.clone()
    return summed, reference_rms_norm(summed, weight, eps)
