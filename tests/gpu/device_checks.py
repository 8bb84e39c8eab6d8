"""GPU checks: every kernel against its PyTorch reference, the kernel/graph model path against
the reference path, and lossless decoding on the GPU. Run by run_device_checks.sh.

checkpoint ──builder (compiles kernels)──▶ engine dir ──runtime (kernels + graphs)──▶ Triton

Each check draws fresh random inputs, poisons outputs before the kernel runs (NaN for
floats, -7 for ints) so an unwritten element fails, and compares by relative error
||out - ref|| / ||ref|| against a stated threshold. Results go to $OUT/device_checks.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from nemodiff.plugins import reference
from nemodiff.plugins.compile import compile_kernels
from nemodiff.plugins.kernels import AttentionMeta, KernelLibrary, gpu_sm

RESULTS: list[dict] = []
DEV = torch.device("cuda")


def record(name: str, ok: bool, detail: str) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def check_attention(lib: KernelLibrary, gen: torch.Generator) -> None:
    for dtype, limit in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        for head_dim, heads, kv_heads, lengths, prefixes, splits in (
            (128, 32, 8, [1, 1, 1, 1], [1024, 17, 300, 0], 1),
            (128, 32, 8, [32, 72, 5], [1000, 2100, 3], 3),
            (64, 8, 2, [9, 1, 16], [4500, 33, 64], 6),
        ):
            page = 16
            total, segs = sum(lengths), len(lengths)
            pages_each = [-(-p // page) for p in prefixes]
            perm = torch.randperm(sum(pages_each) + 4, generator=gen).tolist()
            tables, used = [], 0
            for n in pages_each:
                tables.append(perm[used: used + n])
                used += n
            max_pages = max(1, max(pages_each))
            slots = (sum(pages_each) + 4) * page

            def rnd(*shape, dtype=dtype):
                return torch.randn(*shape, generator=gen).to(DEV, dtype)

            q, k_new, v_new = rnd(total, heads, head_dim), rnd(total, kv_heads, head_dim), rnd(total, kv_heads, head_dim)
            k_cache, v_cache = rnd(slots, kv_heads, head_dim), rnd(slots, kv_heads, head_dim)
            patterns = [s % 3 for s in range(segs)]
            masks, flat, offsets, size = [], [], [], 0
            for s, n in enumerate(lengths):
                m = torch.rand(n, n, generator=gen) > 0.5
                m.fill_diagonal_(True)
                masks.append(m if patterns[s] == 2 else None)
                offsets.append(size)
                if patterns[s] == 2:
                    flat.append(m.to(torch.uint8).flatten())
                    size += n * n
            seg_start = [0]
            for n in lengths:
                seg_start.append(seg_start[-1] + n)

            def i32(values):
                return torch.tensor(values, dtype=torch.int32, device=DEV)

            meta = AttentionMeta(
                token_seg=i32([s for s, n in enumerate(lengths) for _ in range(n)]), seg_start=i32(seg_start),
                prefix_len=i32(prefixes), block_tables=i32([t + [0] * (max_pages - len(t)) for t in tables]),
                pattern=i32(patterns), mask_offset=torch.tensor(offsets, dtype=torch.int64, device=DEV),
                masks=(torch.cat(flat) if flat else torch.zeros(1, dtype=torch.uint8)).to(DEV), page_size=page,
                num_splits=splits,
                workspace=torch.empty(splits * total * heads * (head_dim + 2), device=DEV) if splits > 1 else None)
            out = torch.full_like(q, float("nan"))
            lib.segment_attention(q, k_new, v_new, k_cache, v_cache, meta, head_dim ** -0.5, out=out)
            torch.cuda.synchronize()
            ref = reference.paged_segment_attention(
                q.float().cpu(), k_new.float().cpu(), v_new.float().cpu(), k_cache.float().cpu(),
                v_cache.float().cpu(), torch.tensor(seg_start), torch.tensor(prefixes),
                i32([t + [0] * (max_pages - len(t)) for t in tables]).cpu(), page, patterns, masks)
            err = rel(out.cpu(), ref)
            record(f"attention {str(dtype)[6:]} D={head_dim} splits={splits} lens={lengths}", err <= limit,
                   f"rel err {err:.2e} (limit {limit:.0e})")


def check_decode_kernels(lib: KernelLibrary, gen: torch.Generator) -> None:
    for rows, vocab in ((7, 131072), (64, 1000)):
        logits = (torch.randn(rows, vocab, generator=gen) * 4).to(DEV)
        argmax, prob = lib.row_argmax_prob(logits)
        ref_arg, ref_prob = reference.row_argmax_prob(logits.cpu())
        ok = torch.equal(argmax.cpu(), ref_arg) and rel(prob.cpu(), ref_prob) <= 1e-5
        record(f"row_argmax_prob {rows}x{vocab}", ok, f"argmax equal {torch.equal(argmax.cpu(), ref_arg)}, prob rel "
               f"{rel(prob.cpu(), ref_prob):.1e}")
    segs, block = 5, 32
    row_counts = [31, 12, 1, 0, 20]
    row_start = torch.tensor([0] + torch.tensor(row_counts).cumsum(0).tolist(), dtype=torch.int32)
    row_pos = torch.cat([torch.randperm(31, generator=gen)[:n] + 1 for n in row_counts]).int()
    cand = torch.randint(0, 5000, (int(row_start[-1]),), generator=gen, dtype=torch.int32)
    conf = torch.rand(int(row_start[-1]), generator=gen)
    threshold = torch.tensor([0.9, 0.0, 0.5, 0.9, 0.0])
    topk = torch.tensor([0, 3, 0, 0, 1], dtype=torch.int32)
    tokens = torch.randint(0, 5000, (segs, block), generator=gen, dtype=torch.int32)
    masked = torch.zeros(segs, block, dtype=torch.uint8)
    for s in range(segs):
        masked[s, row_pos[int(row_start[s]): int(row_start[s + 1])].long()] = 1
    want = reference.denoise_select(cand, conf, row_start, row_pos, threshold, topk, tokens, masked)
    d_tokens, d_masked = tokens.to(DEV), masked.to(DEV)
    remaining = lib.denoise_select(cand.to(DEV), conf.to(DEV), row_start.to(DEV), row_pos.to(DEV),
                                   threshold.to(DEV), topk.to(DEV), d_tokens, d_masked)
    ok = torch.equal(d_tokens.cpu(), want[0]) and torch.equal(d_masked.cpu(), want[1]) and torch.equal(
        remaining.cpu(), want[2])
    record("denoise_select (threshold and top-k)", ok, f"remaining {remaining.cpu().tolist()}")
    m = 8
    target = torch.randint(0, 50, (segs * m,), generator=gen, dtype=torch.int32)
    drafts = torch.randint(0, 50, (segs, m - 1), generator=gen, dtype=torch.int32)
    for s in range(segs):  # plant accepted prefixes of every length
        keep = s + 1 if s < segs - 1 else m - 1
        drafts[s, :keep] = target[s * m: s * m + keep]
    row_start = torch.arange(0, segs * m + 1, m, dtype=torch.int32)
    committed = torch.randint(0, 4000, (segs,), generator=gen, dtype=torch.int32)
    want = reference.spec_accept(target, row_start, drafts, committed)
    got = lib.spec_accept(target.to(DEV), row_start.to(DEV), drafts.to(DEV), committed.to(DEV))
    ok = all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    record("spec_accept", ok, f"accepted {got[0].cpu().tolist()}")
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(37, 4096, generator=gen).to(DEV, dtype)
        delta = torch.randn(37, 4096, generator=gen).to(DEV, dtype)
        weight = (1 + 0.1 * torch.randn(4096, generator=gen)).to(DEV, dtype)
        want_sum, want_norm = reference.add_rmsnorm(x.clone(), delta, weight, 1e-5)
        out = torch.full_like(x, float("nan"))
        lib.add_rmsnorm(x, delta, weight, 1e-5, out=out)
        e1, e2 = rel(x, want_sum), rel(out, want_norm)
        record(f"add_rmsnorm {str(dtype)[6:]}", e1 <= 1e-3 and e2 <= 1e-2, f"sum rel {e1:.1e}, norm rel {e2:.1e}")


def check_model_paths(arch: str) -> None:
    """Engine on the kernel path (eager and graphs) against the reference path, and lossless decoding."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import make_checkpoint
    from nemodiff import LLM, SamplingParams
    from nemodiff.builder.build import BuildOptions, build_engine

    root = Path(tempfile.mkdtemp())
    ckpt = make_checkpoint(root / "ckpt", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64, lora_rank=16, seed=3)
    engine = root / "engine"
    build_engine(ckpt, engine, BuildOptions(dtype="bf16", arch=arch, kv_page_size=16, max_batch_size=8))
    fast = LLM(engine, device="cuda")
    plain = LLM(engine, device="cuda", cuda_graphs=False)
    plain.model.kernels = None  # the reference path on the same GPU
    record("kernels loaded", fast.model.kernels is not None, str(fast.model.kernels and fast.model.kernels.path))
    record("cuda graphs captured", fast.model.graphs is not None and len(fast.model.graphs.graphs) > 0,
           f"{len(fast.model.graphs.graphs) if fast.model.graphs else 0} graphs")
    prompts = [[1] + torch.randint(130, 380, (n,)).tolist() for n in (5, 40, 300, 17)]
    for mode in ("ar", "linear-spec", "quadratic-spec", "diffusion"):
        params = SamplingParams(max_new_tokens=48, ignore_eos=True, mode=mode, block_length=8)
        a = fast.generate(prompts, params)
        b = plain.generate(prompts, params)
        same = sum(x.output_ids == y.output_ids for x, y in zip(a, b))
        record(f"{mode}: kernel+graph path vs reference path", same >= len(prompts) - 1,
               f"{same}/{len(prompts)} identical (bf16 rounding may flip a near-tie)")
    ar = fast.generate(prompts, SamplingParams(max_new_tokens=48, ignore_eos=True))
    for mode in ("linear-spec", "quadratic-spec"):
        outs = fast.generate(prompts, SamplingParams(max_new_tokens=48, ignore_eos=True, mode=mode, block_length=8))
        agree = [sum(int(x == y) for x, y in zip(o.output_ids, w.output_ids)) / 48 for o, w in zip(outs, ar)]
        record(f"{mode} lossless vs ar on GPU", min(agree) >= 0.9,
               f"token agreement {', '.join(f'{a:.2f}' for a in agree)}")


def main() -> int:
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    sm = gpu_sm(DEV)
    arch = {"sm_90a": "h100", "sm_100a": "b200", "sm_89": "l40s", "sm_80": "a100"}.get(sm, "h100")
    print(f"device {torch.cuda.get_device_name(DEV)} ({sm}), torch {torch.__version__}", flush=True)
    start = time.time()
    lib = KernelLibrary(compile_kernels(sm, out_dir / "kernels" / sm))
    record("compile", True, f"{sm} in {time.time() - start:.1f} s")
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    for name, fn in (("attention", lambda: check_attention(lib, gen)), ("decode", lambda: check_decode_kernels(lib, gen)),
                     ("model", lambda: check_model_paths(arch))):
        try:
            fn()
        except Exception as exc:  # report and go on: one broken part must not hide the others
            record(f"{name} checks", False, f"{type(exc).__name__}: {exc}")
    (out_dir / "device_checks.json").write_text(json.dumps(RESULTS, indent=2))
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
