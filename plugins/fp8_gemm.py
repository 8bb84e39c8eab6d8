"""Weight-only fp8 GEMM for decode: `x [M, K]` (bf16/fp16) times `w [N, K]` (float8_e4m3fn)
with one float32 scale per output channel, fp32 accumulation, output in x's dtype.

checkpoint ──builder (quantizes weights, compiles `variants`)──▶ engine dir ──runtime (every linear)──▶ Triton

At decode sizes a forward reads every weight once, so time is weight bytes over memory
bandwidth (docs/design.md §7): the kernel streams the e4m3 bytes (half of bf16) and converts each tile
to the activation dtype in registers (exact: every e4m3 value is a bf16 and an fp16 value), feeds
the tensor cores, and applies the channel scale to the fp32 accumulator once at the end
(`sum_k x[m,k] * w[n,k] * s[n] = s[n] * sum_k x[m,k] * w[n,k]`). No dequantised weight is ever
written to memory.

Tiles (see `tile_config`): for M <= 64 the N tile is small (32 rows of w) so that even the
4096-wide projections give 128 tiles, and K is split (`SPLIT_K`, chosen at launch from the SM
count) until about two programs per SM are in flight; split partial sums go to a float32
workspace that `fp8_splitk_reduce_kernel` sums in a fixed order (deterministic). Above M = 64
(prefill, QuadraticSpec's k(k+1)-token forwards: compute-bound) the same kernel runs with
64 x 128 tiles and no split.

`ALIGNED` (K and x's row stride multiples of 16, true for every real model) lets the compiler
use 16-byte vector loads; odd shapes run the unaligned variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nemodiff.engine_format import ModelConfig

from .norm import ACTIVATION_DTYPES
from .spec import KernelVariant, pointer

DECODE_MAX_M = 64  # above this the large-tile configuration runs
PROGRAMS_PER_SM = 2  # split K until about this many programs per SM are in flight
MAX_SPLIT_K = 8


@triton.jit
def fp8_gemm_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, k_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                    ALIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if ALIGNED:  # the host guarantees these are multiples of 16; say so to the compiler
        K = (K // 16) * 16
        stride_xm = (stride_xm // 16) * 16
        k_per_split = (k_per_split // 16) * 16
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    m_mask = rm[:, None] < M
    n_mask = rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):  # splits cover K in whole tiles
        cols = k0 + rk[None, :]
        k_mask = cols < K
        x = tl.load(x_rows + cols, mask=m_mask & k_mask, other=0.0)
        w = tl.load(w_rows + cols, mask=n_mask & k_mask, other=0.0)
        if INTERPRET:  # the interpreter's dot is wrong on bf16 operands
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * scale[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT:
        tl.store(partial_ptr + pid_k.to(tl.int64) * M * N + offsets, acc, mask=out_mask)
    else:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def fp8_splitk_reduce_kernel(partial_ptr, out_ptr, size, splits, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * size + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = {"fp8_gemm": fp8_gemm_kernel, "fp8_splitk_reduce": fp8_splitk_reduce_kernel}
REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def tile_config(m: int) -> TileConfig:
    """Decode tiles by M bucket (16, 32, 64 rows), large tiles above DECODE_MAX_M."""
    if m <= 16:
        return TileConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=4)
    if m <= 32:
        return TileConfig(block_m=32, block_n=32, block_k=256, num_warps=4, num_stages=3)
    if m <= DECODE_MAX_M:
        return TileConfig(block_m=64, block_n=32, block_k=128, num_warps=4, num_stages=3)
    return TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)


def gemm_variant(dtype: torch.dtype, tiles: TileConfig, split: bool, aligned: bool, interpret: bool) -> KernelVariant:
    ptr = pointer(dtype)
    return KernelVariant(
        kernel="fp8_gemm",
        signature=(("x_ptr", ptr), ("w_ptr", "*fp8e4nv"), ("scale_ptr", "*fp32"), ("out_ptr", ptr),
                   ("partial_ptr", "*fp32"),
                   ("M", "i32"), ("N", "i32"), ("K", "i32"), ("stride_xm", "i32"), ("k_per_split", "i32")),
        constexprs=(("BLOCK_M", tiles.block_m), ("BLOCK_N", tiles.block_n), ("BLOCK_K", tiles.block_k),
                    ("SPLIT", split), ("ALIGNED", aligned), ("INTERPRET", interpret)),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def reduce_variant(dtype: torch.dtype) -> KernelVariant:
    return KernelVariant(
        kernel="fp8_splitk_reduce",
        signature=(("partial_ptr", "*fp32"), ("out_ptr", pointer(dtype)), ("size", "i32"), ("splits", "i32")),
        constexprs=(("BLOCK", REDUCE_BLOCK),),
        num_warps=4,
        num_stages=1,
    )


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    """fp8 engines only: every M bucket, split and unsplit, plus the large-M tiles and the reduction."""
    if dtype != "fp8":
        return []
    act = ACTIVATION_DTYPES[dtype]
    shapes = linear_shapes(config)
    aligned_options = sorted({k % 16 == 0 for _, k in shapes}, reverse=True)
    out = []
    for aligned in aligned_options:
        for m in (16, 32, 64):
            out += [gemm_variant(act, tile_config(m), split, aligned, False) for split in (False, True)]
        out.append(gemm_variant(act, tile_config(DECODE_MAX_M + 1), False, aligned, False))
    return out + [reduce_variant(act)]


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of the fused qkv, o, fused gate_up and down projections."""
    h, q_out = config.hidden_size, config.num_attention_heads * config.head_dim
    kv_out, i = config.num_key_value_heads * config.head_dim, config.intermediate_size
    return [(q_out + 2 * kv_out, h), (h, q_out), (2 * i, h), (h, i)]


def choose_split(m: int, n: int, k: int, tiles: TileConfig, num_sms: int) -> int:
    """How many ways to split K so that about PROGRAMS_PER_SM programs run per SM (1 = no split)."""
    if m > DECODE_MAX_M:
        return 1
    programs = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    split = 1
    while (programs * split < PROGRAMS_PER_SM * num_sms and split < MAX_SPLIT_K
           and k >= 2 * split * 4 * tiles.block_k):  # keep at least 4 K tiles per split
        split *= 2
    return split


def fp8_linear(launcher, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, num_sms: int = 1,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight.float() * scale[:, None]).T with fp32 accumulation, in x's dtype.

    num_sms: the GPU's multiprocessor count (sizes the K split; 1 means never split)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with unit column stride, got shape {tuple(x.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError("weight must be a contiguous float8_e4m3fn [N, K] tensor")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"scale {tuple(scale.shape)} {scale.dtype} (want float32 [N])")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return out
    tiles = tile_config(m)
    split = choose_split(m, n, k, tiles, num_sms)
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.block_k), split) * tiles.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    aligned = k % 16 == 0 and x.stride(0) % 16 == 0
    interpret = launcher.name == "interpret"
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), split)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else scale
    launcher.launch(gemm_variant(x.dtype, tiles, split > 1, aligned, interpret), grid,
                    (x, weight, scale, out, partial, m, n, k, x.stride(0), k_per_split))
    if split > 1:
        launcher.launch(reduce_variant(x.dtype), (triton.cdiv(m * n, REDUCE_BLOCK),), (partial, out, m * n, split))
    return out


def reference_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The semantics in float32: the weight is weight.float() * scale[:, None]."""
    return (x.float() @ (weight.float() * scale[:, None]).T).to(x.dtype)
