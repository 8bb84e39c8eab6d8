"""GPU engine checks: the kernel path and its CUDA graphs against the PyTorch reference path, and
decoding on the GPU in every mode. Run by run_device_checks.sh after device_checks.py.

checkpoint ──builder (kernels for this GPU)──▶ engine dir ──[runtime: kernels + graphs on the GPU]──▶ Triton

- teacher-forced: the same cached steps (prefills, then a causal, a full and a QuadraticSpec
  segment in one batch) through the compiled kernels and through the reference path;
- the steady shapes are captured as CUDA graphs at start and replayed (padded to their bucket)
  when 3 and 5 requests run together in every mode; outputs against the eager kernel path;
- the spec modes against AR on the GPU (greedy), and temperature > 0 in every mode (seeded
  runs repeat exactly; every token is in the vocabulary);
- an fp8 engine (weight-only fp8 GEMMs) against the reference path on the same weights.
The seed is printed; results go to $OUT/model_checks.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_report import Report, rel  # noqa: E402

from helpers import make_checkpoint  # noqa: E402
from nemodiff import LLM, SamplingParams  # noqa: E402
from nemodiff.builder.build import BuildOptions, build_engine  # noqa: E402
from nemodiff.plugins.ops import gpu_sm  # noqa: E402
from nemodiff.runtime.model.kv_cache import PagedKVCache  # noqa: E402
from nemodiff.runtime.model.loader import load_engine  # noqa: E402
from nemodiff.runtime.model.segments import (  # noqa: E402
    Pattern,
    Segment,
    quadratic_mask,  # noqa: E402
)

REPORT = Report("model_checks")
record = REPORT.record
MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
ARCH = {"sm_90a": "h100", "sm_100a": "b200", "sm_89": "l40s", "sm_80": "a100"}




def agreement(outputs, wanted) -> float:
    """Fraction of tokens equal position by position (bf16 may flip a near-tie now and then)."""
    same = total = 0
    for out, want in zip(outputs, wanted):
        same += sum(int(a == b) for a, b in zip(out.output_ids, want.output_ids))
        total += max(len(out.output_ids), len(want.output_ids))
    return same / max(total, 1)


def cached_steps(model, prompts: list[list[int]]) -> torch.Tensor:
    cfg = model.config
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, 16, 256, model.dtype, model.device)
    logits = []
    for rid, ids in enumerate(prompts):
        cache.add_request(rid)
        cache.reserve(rid, len(ids) + 80)
        logits += model.forward([Segment(rid, ids, list(range(len(ids))), 0, write_kv=True)], cache)
        cache.set_length(rid, len(ids))
        cache.reserve(rid, len(ids) + 80)
    k, (p0, p1, p2) = 8, (len(p) for p in prompts[:3])
    positions = list(range(p2, p2 + k)) + [p2 + i + 1 + j for i in range(k) for j in range(k)]
    logits += model.forward([
        Segment(0, [60] * 32, list(range(p0, p0 + 32)), p0, Pattern.CAUSAL, write_kv=True),
        Segment(1, [100] * 32, list(range(p1, p1 + 32)), p1, Pattern.FULL),
        Segment(2, [50] * k + [100] * (k * k), positions, p2, Pattern.MASK, write_kv=[True] * k + [False] * k * k,
                mask=quadratic_mask(k)),
    ], cache)
    return torch.cat(logits)


def check_teacher_forced(engine: Path, prompts, bound: float, tag: str) -> None:
    kernel = cached_steps(load_engine(engine, device="cuda", kernels="aot").model, prompts)
    plain = cached_steps(load_engine(engine, device="cuda", kernels="off").model, prompts)
    err = rel(kernel, plain)
    argmax = float((kernel.argmax(-1) == plain.argmax(-1)).float().mean())
    record(f"{tag} teacher-forced kernel path vs reference path", err <= bound,
           f"logits rel {err:.2e} (bound {bound}), argmax agreement {argmax:.3f}")


def check_decoding(engine: Path, prompts) -> None:
    fast = LLM(engine, device="cuda")  # compiled kernels and CUDA graphs
    runner = fast.model.graphs
    record("kernels and graphs", fast.model.kernels is not None and fast.model.kernels.name == "aot"
           and runner is not None and len(runner.graphs) > 0,
           f"kernels {fast.model.kernels and fast.model.kernels.name}, "
           f"{len(runner.graphs) if runner else 0} graphs captured at start")
    prepared = set(runner.graphs) if runner else set()
    eager = LLM(engine, device="cuda", cuda_graphs=False)
    greedy = SamplingParams(max_new_tokens=48, ignore_eos=True)
    ar = fast.generate(prompts[:4], greedy)
    for mode in MODES[1:]:
        outs = fast.generate(prompts[:4], SamplingParams(max_new_tokens=48, ignore_eos=True, mode=mode,
                                                         block_length=8 if mode != "diffusion" else None))
        if mode != "diffusion":
            share = agreement(outs, ar)
            record(f"{mode} equals ar on the GPU", share >= 0.9, f"token agreement {share:.3f}")
    for count in (3, 5):  # padded into the 4 and 8 buckets
        for mode in MODES:
            params = SamplingParams(max_new_tokens=40, ignore_eos=True, mode=mode)
            replays = runner.replays if runner else 0
            got = fast.generate(prompts[:count], params)
            want = eager.generate(prompts[:count], params)
            share = agreement(got, want)
            replayed = (runner.replays if runner else 0) - replays
            record(f"{count} requests {mode}: graphs vs eager kernel path", share >= 0.9 and replayed > 0,
                   f"token agreement {share:.3f}, {replayed} graph replays")
    record("nothing captured while serving", runner is not None and set(runner.graphs) == prepared,
           f"{len(prepared)} graphs before and after")
    vocab = fast.config.model.vocab_size
    for mode in MODES:
        params = SamplingParams(max_new_tokens=40, ignore_eos=True, mode=mode, temperature=0.8, top_p=0.95, seed=11,
                                block_length=8 if mode != "diffusion" else None)
        first = fast.generate(prompts[:3], params)
        again = fast.generate(prompts[:3], params)
        ok = [a.output_ids == b.output_ids for a, b in zip(first, again)]
        valid = all(0 <= t < vocab for o in first for t in o.output_ids)
        record(f"{mode} temperature 0.8", all(ok) and valid, f"seeded repeats {ok}, tokens valid {valid}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    seed = int(time.time())
    print(f"seed {seed}", flush=True)
    torch.manual_seed(seed)
    arch = ARCH.get(gpu_sm(torch.device("cuda")), "h100")
    root = Path(tempfile.mkdtemp())
    checkpoint = make_checkpoint(root / "ckpt", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, lora_rank=16, seed=seed)
    prompts = [[1] + torch.randint(130, 380, (n,)).tolist() for n in (5, 40, 300, 17, 64)]
    steps = []
    for dtype, bound in (("bf16", 3e-2), ("fp8", 3e-2)):
        engine = root / dtype
        steps.append((f"build {dtype}", lambda e=engine, d=dtype: build_engine(
            checkpoint, e, BuildOptions(dtype=d, arch=arch, kv_page_size=16, max_batch_size=8, block_length=8))))
        steps.append((f"{dtype} teacher-forced", lambda e=engine, b=bound, d=dtype: check_teacher_forced(
            e, prompts, b, d)))
    steps.append(("decoding", lambda: check_decoding(root / "bf16", prompts)))
    REPORT.run(steps)
    return REPORT.finish()


if __name__ == "__main__":
    sys.exit(main())
