"""The project's GEMM, one launch per linear: `x [M, K]` (bf16/fp16) times `w [N, K]`, fp32
accumulation, output in x's dtype. Weight-only fp8 (float8_e4m3fn with one float32 scale per output
channel: `fp8_linear`), or weights in x's dtype (`dense_linear`: every linear of bf16/fp16 engines,
the head and the draft adapter of all of them), so that no product of the forward is left to cuBLAS,
which picks its kernel and split by M.

checkpoint ──builder (quantizes weights, compiles `variants`)──▶ engine dir ──runtime (every linear)──▶ Triton

At decode sizes a forward reads every weight once, so time is weight bytes over memory
bandwidth (docs/design.md §7): the kernel streams the e4m3 bytes (half of bf16) and converts each tile
to the activation dtype in registers (exact: every e4m3 value is a bf16 and an fp16 value), feeds
the tensor cores, and applies the channel scale to the fp32 sum once at the end
(`sum_k x[m,k] * w[n,k] * s[n] = s[n] * sum_k x[m,k] * w[n,k]`). No dequantised weight is ever
written to memory.

One meaning at every M: an output row's value must not depend on how many rows ride along
(a verify forward of 32 rows gives the same row as an AR step of one, so speculative decoding
stays lossless in fp8). So every M runs the same tiles (`TILES`), and K is cut into the same
chunks: `choose_split` looks at N, K and the SM count only, and the chunk sums are added in a
fixed order, 0 + c_0 + c_1 + ..., before the scale. Two ways to run the chunks give the same bits:
- SPLIT (small grids, i.e. decode): one program per chunk stores its float32 sum in a workspace
  and counts its arrival in the tile's int32 counter (nemodiff/plugins/scratch.py); the last program of
  the tile to arrive adds the chunk sums in order, writes the output and sets the counter back
  to 0. No second launch, no atomics on data, deterministic.
- serial (grids that fill the GPU without splitting): one program sums the chunks itself, in
  the same order.

`ALIGNED` (K and x's row stride multiples of 16, true for every real model) lets the compiler
use 16-byte vector loads; odd shapes run the unaligned variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from nemodiff.engine_format import ModelConfig

from .norm import ACTIVATION_DTYPES
from .scratch import Counters, fresh_counters
from .spec import KernelVariant, pointer

PROGRAMS_PER_SM = 2  # split K until about this many programs per SM are in flight (at M = 1)
MAX_SPLIT_K = 8


@triton.jit
def fp8_gemm_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, partial_ptr, counters_ptr, M, N, K, stride_xm, k_per_split,
                    num_splits,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                    ALIGNED: tl.constexpr, INTERPRET: tl.constexpr, HAS_SCALE: tl.constexpr):
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
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    m_mask = rm[:, None] < M
    n_mask = rn[:, None] < N
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
    split_stride = tl.cast(M, tl.int64) * N
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT:  # this program sums chunk pid_k; the tile's last program to arrive adds the chunks up
        first_chunk = pid_k
        last_chunk = pid_k + 1
    else:  # this program sums every chunk, in order
        first_chunk = 0
        last_chunk = num_splits
    for chunk in range(first_chunk, last_chunk):
        k_start = chunk * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):  # chunks are whole K tiles
            cols = k0 + rk[None, :]
            k_mask = cols < K
            x = tl.load(x_rows + cols, mask=m_mask & k_mask, other=0.0)
            w = tl.load(w_rows + cols, mask=n_mask & k_mask, other=0.0)
            if INTERPRET:  # the interpreter's dot is wrong on bf16 operands
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
        if SPLIT:
            tl.store(partial_ptr + pid_k * split_stride + offsets, acc, mask=out_mask)
        else:
            total += acc
    if SPLIT:
        # every thread's partial stores happen before the one release below (CTA barrier, then a
        # gpu-scope acq_rel atomic); the last arrival's acquire makes every chunk visible to it
        tl.debug_barrier()
        counter = counters_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            for chunk in range(0, num_splits):  # a fixed order, whichever program merges
                total += tl.load(partial_ptr + chunk * split_stride + offsets, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            if HAS_SCALE:
                total = total * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counter, 0)  # zero again for the next launch or graph replay
    else:
        if HAS_SCALE:
            total = total * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=out_mask)


KERNELS = {"fp8_gemm": fp8_gemm_kernel}


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Decode tiles for every M: small N tiles so that even the 4096-wide projections give 128 tiles at
# M = 1. The same tiles at every M keep each row's reduction (and its tensor-core instruction) fixed.
TILES = TileConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=4)


@lru_cache(maxsize=None)  # one variant object per specialisation: its key is hashed once
def gemm_variant(dtype: torch.dtype, split: bool, aligned: bool, interpret: bool,
                 weight: torch.dtype = torch.float8_e4m3fn) -> KernelVariant:
    """fp8 weights carry a channel scale; weights in the activation dtype (bf16, fp16) do not."""
    ptr = pointer(dtype)
    return KernelVariant(
        kernel="fp8_gemm",
        signature=(("x_ptr", ptr), ("w_ptr", pointer(weight)), ("scale_ptr", "*fp32"), ("out_ptr", ptr),
                   ("partial_ptr", "*fp32"), ("counters_ptr", "*i32"),
                   ("M", "i32"), ("N", "i32"), ("K", "i32"), ("stride_xm", "i32"), ("k_per_split", "i32"),
                   ("num_splits", "i32")),
        constexprs=(("BLOCK_M", TILES.block_m), ("BLOCK_N", TILES.block_n), ("BLOCK_K", TILES.block_k),
                    ("SPLIT", split), ("ALIGNED", aligned), ("INTERPRET", interpret),
                    ("HAS_SCALE", weight == torch.float8_e4m3fn)),
        num_warps=TILES.num_warps,
        num_stages=TILES.num_stages,
    )


DENSE_DTYPES = ("bf16", "fp16")  # engines whose dense linears (and every head) run this kernel


def variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    """Split and serial, aligned and unaligned: fp8 engines' quantized linears, and the dense products of
    16-bit engines (every linear of bf16/fp16 engines; the head and the draft adapter of fp8 ones, whose
    rank may be any size)."""
    if dtype != "fp8" and dtype not in DENSE_DTYPES:
        return []
    act = ACTIVATION_DTYPES[dtype]
    found = [gemm_variant(act, split, aligned, False, act) for aligned in (True, False) for split in (False, True)]
    if dtype == "fp8":
        aligned_options = sorted({k % 16 == 0 for _, k in linear_shapes(config)}, reverse=True)
        found = [gemm_variant(act, split, aligned, False) for aligned in aligned_options
                 for split in (False, True)] + found
    return found


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of the fused qkv, o, fused gate_up and down projections."""
    h, q_out = config.hidden_size, config.num_attention_heads * config.head_dim
    kv_out, i = config.num_key_value_heads * config.head_dim, config.intermediate_size
    return [(q_out + 2 * kv_out, h), (h, q_out), (2 * i, h), (h, i)]


def choose_split(n: int, k: int, num_sms: int) -> int:
    """How many chunks K is cut into (1 = none): enough that the one-row GEMM runs about
    PROGRAMS_PER_SM programs per SM, keeping at least 4 K tiles per chunk. Never depends on M."""
    programs = triton.cdiv(n, TILES.block_n)
    split = 1
    while (programs * split < PROGRAMS_PER_SM * num_sms and split < MAX_SPLIT_K
           and k >= 2 * split * 4 * TILES.block_k):
        split *= 2
    return split


def plan(m: int, n: int, k: int, num_sms: int) -> tuple[int, int, bool]:
    """(chunks, k_per_split, parallel): K's chunks (whole K tiles, none empty) and whether they run
    in programs of their own (when the unsplit grid would leave SMs idle) or one after another."""
    split = choose_split(n, k, num_sms)
    k_per_split = triton.cdiv(triton.cdiv(k, TILES.block_k), split) * TILES.block_k
    split = triton.cdiv(k, k_per_split)
    tiles = triton.cdiv(m, TILES.block_m) * triton.cdiv(n, TILES.block_n)
    return split, k_per_split, split > 1 and tiles < PROGRAMS_PER_SM * num_sms


def fp8_linear(launcher, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, num_sms: int = 1,
               out: torch.Tensor | None = None, counters: Counters | None = None) -> torch.Tensor:
    """x @ (weight.float() * scale[:, None]).T with fp32 accumulation, in x's dtype.

    num_sms: the GPU's multiprocessor count (sizes the K split; 1 means never split).
    counters: where the split programs count arrivals (a fresh zeroed buffer when None)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with unit column stride, got shape {tuple(x.shape)}")
    dense = scale is None
    if weight.dtype != (x.dtype if dense else torch.float8_e4m3fn) or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous {x.dtype if dense else torch.float8_e4m3fn} [N, K] tensor, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not dense and (scale.shape != (n,) or scale.dtype != torch.float32):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"scale {None if dense else (tuple(scale.shape), scale.dtype)} (want float32 [N])")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return out
    split, k_per_split, parallel = plan(m, n, k, num_sms)
    grid = (triton.cdiv(m, TILES.block_m), triton.cdiv(n, TILES.block_n), split if parallel else 1)
    tiles = grid[0] * grid[1] if parallel else 1  # one counter per output tile, read only by split programs
    counted = counters.get(tiles, x.device) if counters is not None else fresh_counters(tiles, x.device)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if parallel else None
    aligned = k % 16 == 0 and x.stride(0) % 16 == 0
    interpret = launcher.name == "interpret"
    launcher.launch(gemm_variant(x.dtype, parallel, aligned, interpret, weight.dtype), grid,
                    (x, weight, scale, out, partial, counted, m, n, k, x.stride(0), k_per_split, split))
    return out


def dense_linear(launcher, x: torch.Tensor, weight: torch.Tensor, num_sms: int = 1, out: torch.Tensor | None = None,
                 counters: Counters | None = None) -> torch.Tensor:
    """x @ weight.T with fp32 accumulation, in x's dtype; weight [N, K] in x's dtype (bf16 or fp16). The same
    tiles, K chunks and fold as the fp8 product, so a row's bits never depend on M."""
    return fp8_linear(launcher, x, weight, None, num_sms=num_sms, out=out, counters=counters)


def reference_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The semantics in float32: the weight is weight.float() * scale[:, None]."""
    return (x.float() @ (weight.float() * scale[:, None]).T).to(x.dtype)
