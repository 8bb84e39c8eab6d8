"""GPU check of the paged segment-attention kernels (a CUDA machine; CI runs the interpreter tests).

checkpoint ──builder──▶ engine dir ──[runtime: attention kernels]──▶ Triton

1. The JIT-compiled kernel (RoPE, KV-cache write, attention, split merge in one launch) against the
   PyTorch path on a mixed batch (decode, verify, draft, QuadraticSpec mask, prefill, explicit mask),
   fp32/bf16/fp16, GQA 4/1/8, several splits (run this file on its own: development).
2. `benchmarks`: timings at the NLD-8B shape (32 query / 8 KV heads, head_dim 128, bf16, page 16): decode
   against the copy bandwidth (and PyTorch SDPA on contiguous K/V), then the multi-token shapes in TFLOP/s.
   device_checks.py runs them through the ahead-of-time cubins (its launcher and `check_report.Rig`);
   run on its own, this file times Triton's JIT.

    PYTHONPATH=<package tree>:tests python tests/gpu/check_attention.py   (see run_device_checks.sh)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for attention_cases

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from attention_cases import TEST_ROPE, make_case  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nemodiff.plugins.attention import (  # noqa: E402
    CAUSAL,
    FULL,
    MASK,
    AttentionMeta,
    choose_splits,
    chunk_keys_for,
    chunk_slots,
    pack_bitmask,
    plan_tiles,
    segment_attention,
    workspace_elems,
)
from nemodiff.plugins.launch import JitLauncher  # noqa: E402
from nemodiff.plugins.scratch import Counters  # noqa: E402
from nemodiff.runtime.model.rope import RotaryEmbedding  # noqa: E402
from nemodiff.runtime.model.segments import quadratic_mask  # noqa: E402

LAUNCHER = JitLauncher()
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}  # relative Frobenius error


def check_correctness() -> bool:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(40, 40, generator=gen) > 0.5
    mask[:, 0] = True
    segments = [(1, 1000, CAUSAL, None), (32, 517, CAUSAL, None), (32, 300, FULL, None),
                (72, 64, MASK, quadratic_mask(8)), (300, 0, CAUSAL, None), (40, 33, MASK, mask), (1, 0, CAUSAL, None)]
    passed = True
    for dtype in TOLERANCE:
        for heads, kv_heads, head_dim in ((32, 8, 128), (16, 16, 64), (32, 4, 128)):
            case = make_case(segments, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=16, dtype=dtype,
                             device="cuda")
            reference, _, _ = case.reference()
            for splits in (1, 3, 8):
                out = torch.full((case.qkv.shape[0], heads, head_dim), float("nan"), dtype=dtype, device="cuda")
                segment_attention(LAUNCHER, *case.inputs(), case.k_cache.clone(), case.v_cache.clone(),
                                  case.meta(splits), head_dim ** -0.5, *case.shape(), out=out)
                torch.cuda.synchronize()
                error = ((out.float() - reference).norm() / reference.norm()).item()
                ok = not out.isnan().any().item() and error < TOLERANCE[dtype]
                passed &= ok
                print(f"[{'PASS' if ok else 'FAIL'}] attention {str(dtype)[6:]} {heads}/{kv_heads}x{head_dim} "
                      f"splits {splits}: relative error {error:.2e}", flush=True)
    return passed


def gpu_batch(lengths, prefixes, patterns, masks, heads=32, kv_heads=8, head_dim=128, page_size=16, dev="cuda",
              sms=None):
    """Random bf16 tensors on the GPU with a shuffled page table (no poisoning: for timing): the fused
    projection, positions after each prefix, no cache writes (slots -1: the timings are the attention's)."""
    dtype = torch.bfloat16
    pages_per = [-(-p // page_size) for p in prefixes]
    max_pages = max(1, max(pages_per))
    num_pages = len(lengths) * max_pages
    block_tables = torch.randperm(num_pages, device=dev).int().view(len(lengths), max_pages)
    k_cache = torch.randn(num_pages * page_size, kv_heads, head_dim, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    total = sum(lengths)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dtype)
    positions = torch.cat([torch.arange(p, p + n) for n, p in zip(lengths, prefixes)]).to(dev)
    slots = torch.full((total,), -1, dtype=torch.int64, device=dev)
    words = [torch.zeros(1, dtype=torch.int32)] + [pack_bitmask(m) for m in masks if m is not None]
    offsets = np.cumsum([0] + [w.numel() for w in words])
    mask_offset, used = [], 1
    for m in masks:
        mask_offset.append(int(offsets[used]) if m is not None else 0)
        used += m is not None
    block_m, tile_seg, tile_start = plan_tiles(np.array(lengths), heads // kv_heads)
    sms = sms or torch.cuda.get_device_properties(0).multi_processor_count
    max_keys = block_tables.shape[1] * page_size
    splits = choose_splits(len(tile_seg), kv_heads, max(prefixes) + max(lengths), sms, chunk_keys_for(max_keys))
    i32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.int32, device=dev)  # noqa: E731
    chunks = chunk_slots(max_keys, total)
    workspace = torch.empty(workspace_elems(total, heads, head_dim, chunks), device=dev) if splits > 1 else None
    meta = AttentionMeta(i32(np.concatenate([[0], np.cumsum(lengths)])), i32(prefixes),
                         i32(np.arange(len(lengths))), block_tables, i32(patterns), i32(mask_offset),
                         torch.cat(words).to(dev), i32(tile_seg), i32(tile_start), page_size, block_m, splits, workspace)
    return qkv, positions, slots, k_cache, v_cache, meta


class _JitRig:
    """check_report.Rig's timing, for this file run on its own (Triton's do_bench, which flushes the L2 cache)."""

    device, num_sms, dry = torch.device("cuda"), None, False

    def time_ms(self, fn, iters: int = 50, flush_cache: bool = False) -> float:
        return do_bench(fn, warmup=25, rep=100)


def time_attention(launcher, rig, qkv, positions, slots, k_cache, v_cache, meta, heads) -> float:
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(qkv.shape[0], heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    rope, counters = RotaryEmbedding(TEST_ROPE, head_dim, qkv.device), Counters()
    return rig.time_ms(lambda: segment_attention(launcher, qkv, positions, slots, rope, k_cache, v_cache, meta,
                                                 head_dim ** -0.5, heads, kv_heads, head_dim, out=out,
                                                 counters=counters), flush_cache=True)


def time_dense_decode(rig, batch, context, heads, kv_heads, head_dim) -> float:
    """PyTorch SDPA, one query per sequence over contiguous K/V: a yardstick, not a paged kernel."""
    q = torch.randn(batch, heads, 1, head_dim, device=rig.device, dtype=torch.bfloat16)
    kv = torch.randn(batch, kv_heads, context, head_dim, device=rig.device, dtype=torch.bfloat16)
    return rig.time_ms(lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True), flush_cache=True)


def copy_bandwidth(rig, size: int = 2 ** 30) -> float:
    src = torch.empty(size, dtype=torch.uint8, device=rig.device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (rig.time_ms(lambda: dst.copy_(src)) * 1e-3)


def benchmarks(launcher=LAUNCHER, rig=None, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
               small: bool = False) -> list[str]:
    """Rows of timings; `small` (the CPU dry run) keeps one decode case and one multi-token shape, tiny."""
    rig = rig or _JitRig()
    geometry = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dev=rig.device, sms=rig.num_sms)
    rows, bandwidth = [], copy_bandwidth(rig, 2 ** 20 if small else 2 ** 30)
    rows.append(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for batch in (1,) if small else (1, 8, 32):
        for context in (24,) if small else (1024, 8192):
            tensors = gpu_batch([1] * batch, [context - 1] * batch, [CAUSAL] * batch, [None] * batch, **geometry)
            ms, meta = time_attention(launcher, rig, *tensors, heads), tensors[-1]
            kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
            sdpa = time_dense_decode(rig, batch, context, heads, kv_heads, head_dim)
            rows.append(f"decode batch {batch:2d} context {context:5d}: {ms * 1e3:7.1f} us, splits {meta.num_splits:2d}, "
                        f"{kv_bytes / ms / 1e9:6.0f} GB/s = {100 * kv_bytes / (ms * 1e-3) / bandwidth:3.0f}% of copy; "
                        f"SDPA (contiguous) {sdpa * 1e3:7.1f} us")
    shapes = {"QuadraticSpec k=2 (6), context 16": ([6], [16], [MASK], [quadratic_mask(2)])} if small else {
        "verify 8 x 32, context 1024": ([32] * 8, [1024] * 8, [CAUSAL] * 8, [None] * 8),
        "QuadraticSpec k=32 (1056), context 1024": ([1056], [1024], [MASK], [quadratic_mask(32)]),
        "prefill 4096": ([4096], [0], [CAUSAL], [None]),
        "draft 32 x 32, context 4096": ([32] * 32, [4096] * 32, [FULL] * 32, [None] * 32)}
    for name, (lengths, prefixes, patterns, masks) in shapes.items():
        tensors = gpu_batch(lengths, prefixes, patterns, masks, **geometry)
        ms, meta = time_attention(launcher, rig, *tensors, heads), tensors[-1]
        own = [n * (n + 1) // 2 if pat == CAUSAL else int(m.sum()) if pat == MASK else n * n
               for n, pat, m in zip(lengths, patterns, masks)]
        flops = 4 * heads * head_dim * sum(n * p + o for n, p, o in zip(lengths, prefixes, own))
        rows.append(f"{name}: {ms * 1e3:8.1f} us, block_m {meta.block_m}, splits {meta.num_splits}, "
                    f"{flops / ms / 1e9:6.1f} TFLOP/s of visible query-key pairs")
    return rows


if __name__ == "__main__":
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    ok = check_correctness()
    table = benchmarks()
    print("\n=== attention ===")
    print("\n".join(table))
    print("[PASS] attention kernels" if ok else "[FAIL] attention kernels")
    sys.exit(0 if ok else 1)
