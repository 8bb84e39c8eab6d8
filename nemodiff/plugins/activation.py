"""SiLU-gated MLP activation, `silu(gate) * up` from the fused `gate_up [T, 2 I]`, as a Triton kernel.

checkpoint ──builder (compiles `variants`)──▶ engine dir ──runtime (MLP of every layer)──▶ Triton

Rounding follows the PyTorch path (`F.silu(gate) * up`): SiLU in float32 rounded to the
activation dtype, then the product rounded again. One program covers BLOCK columns of one row.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from nemodiff.engine_format import ModelConfig

from .norm import ACTIVATION_DTYPES
from .spec import KernelVariant, pointer

BLOCK = 1024


@triton.jit
def silu_mul_kernel(gate_up_ptr, out_ptr, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * (2 * INTERMEDIATE) + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * (2 * INTERMEDIATE) + INTERMEDIATE + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    tl.store(out_ptr + row * INTERMEDIATE + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=mask)


KERNELS = {"silu_mul": silu_mul_kernel}


@lru_cache(maxsize=None)  # one variant object per specialisation: its key is hashed once
def silu_mul_variant(dtype: torch.dtype, intermediate: int) -> KernelVariant:
    block = min(BLOCK, triton.next_power_of_2(intermediate))
    return KernelVariant(
        kernel="silu_mul",
        signature=(("gate_up_ptr", pointer(dtype)), ("out_ptr", pointer(dtype))),
        constexprs=(("INTERMEDIATE", intermediate), ("BLOCK", block)),
        num_warps=max(1, min(4, block // 256)),
        num_stages=1,
    )


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    return [silu_mul_variant(ACTIVATION_DTYPES[dtype], config.intermediate_size)]


def silu_mul(launcher, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] -> [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
        raise ValueError(f"gate_up must be a contiguous [T, 2 * I] tensor, got {tuple(gate_up.shape)}")
    rows, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, intermediate, dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    if rows:
        variant = silu_mul_variant(gate_up.dtype, intermediate)
        block = variant.constexpr_dict()["BLOCK"]
        launcher.launch(variant, (rows, triton.cdiv(intermediate, block)), (gate_up, out))
    return out


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
