"""GPU engine checks: the kernel path and its CUDA graphs against the PyTorch reference path, and
decoding on the GPU in every mode. Run by run_device_checks.sh after device_checks.py.

checkpoint ──builder (kernels for this GPU)──▶ engine dir ──[runtime: kernels + graphs on the GPU]──▶ Triton

- teacher-forced: the same cached steps (prefills, then a causal, a full and a QuadraticSpec
  segment in one batch) through the compiled kernels and through the reference path, in bf16 and
  in fp8 (weight-only fp8 GEMMs) on the same weights;
- the steady shapes are captured as CUDA graphs at start and replayed (padded to their bucket)
  when 3 and 5 requests run together in every mode; outputs against the eager kernel path;
- the spec modes against AR on the GPU (greedy), and temperature > 0 in every mode (seeded
  runs repeat exactly; every token is in the vocabulary).
The seed is printed; results go to $OUT/model_checks.json after every check. In the CPU dry run
(check_report.Rig) the engines are built for sm_90a and run under kernels="aot-check" (the graphs'
static, padded path runs eagerly), with one layer, short prompts and a few tokens per request.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_report import Report, Rig, rel  # noqa: E402

from helpers import make_checkpoint  # noqa: E402
from nemodiff import LLM, SamplingParams  # noqa: E402
from nemodiff.builder.build import BuildOptions, build_engine  # noqa: E402
from nemodiff.runtime.model.kv_cache import PagedKVCache  # noqa: E402
from nemodiff.runtime.model.loader import load_engine  # noqa: E402
from nemodiff.runtime.model.segments import Pattern, Segment, quadratic_mask  # noqa: E402

REPORT = Report("model_checks")
record = REPORT.record
RIG = Rig()
MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
KERNELS = "aot-check" if RIG.dry else "aot"  # the engine's cubins: checked and interpreted, or launched
if not RIG.dry:
    GEOMETRY = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64)
    PROMPT_LENGTHS, SEGMENT, K, BLOCK = (5, 40, 300, 17, 64), 32, 8, 8
    TOKENS, GRAPH_TOKENS, COUNTS, SPEC_PROMPTS, SAMPLED = 48, 40, (3, 5), 4, 3
else:  # the test checkpoints' geometry (bench shape "micro") in one layer
    GEOMETRY = dict(num_hidden_layers=1)
    PROMPT_LENGTHS, SEGMENT, K, BLOCK = (3, 6, 2, 4, 3), 4, 2, 2
    TOKENS, GRAPH_TOKENS, COUNTS, SPEC_PROMPTS, SAMPLED = 3, 2, (3,), 2, 1


def agreement(outputs, wanted) -> float:
    """Fraction of tokens equal position by position (bf16 may flip a near-tie now and then)."""
    same = total = 0
    for out, want in zip(outputs, wanted):
        same += sum(int(a == b) for a, b in zip(out.output_ids, want.output_ids))
        total += max(len(out.output_ids), len(want.output_ids))
    return same / max(total, 1)


def cached_steps(model, prompts: list[list[int]]) -> torch.Tensor:
    cfg = model.config
    room = 2 * SEGMENT + K * (K + 1) + 16
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, 16, 256, model.dtype, model.platform)
    logits = []
    for rid, ids in enumerate(prompts):
        cache.add_request(rid)
        cache.reserve(rid, len(ids) + room)
        logits += model.forward([Segment(rid, ids, list(range(len(ids))), 0, write_kv=True)], cache)
        cache.set_length(rid, len(ids))
        cache.reserve(rid, len(ids) + room)
    p0, p1, p2 = (len(p) for p in prompts[:3])
    positions = list(range(p2, p2 + K)) + [p2 + i + 1 + j for i in range(K) for j in range(K)]
    mask = cfg.mask_token_id
    logits += model.forward([
        Segment(0, [60] * SEGMENT, list(range(p0, p0 + SEGMENT)), p0, Pattern.CAUSAL, write_kv=True),
        Segment(1, [mask] * SEGMENT, list(range(p1, p1 + SEGMENT)), p1, Pattern.FULL),
        Segment(2, [50] * K + [mask] * (K * K), positions, p2, Pattern.MASK, write_kv=[True] * K + [False] * K * K,
                mask=quadratic_mask(K)),
    ], cache)
    return torch.cat(logits)


def check_teacher_forced(engine: Path, prompts, bound: float, tag: str) -> None:
    loaded = load_engine(engine, device=RIG.device, kernels=KERNELS).model
    kernel = cached_steps(loaded, prompts)
    plain = cached_steps(load_engine(engine, device=RIG.device, kernels="off").model, prompts)
    err = rel(kernel, plain)
    argmax = float((kernel.argmax(-1) == plain.argmax(-1)).float().mean())
    launches = loaded.kernels.launcher.launches
    record(f"{tag} teacher-forced kernel path vs reference path", err <= bound and launches > 0,
           f"logits rel {err:.2e} (bound {bound}), argmax agreement {argmax:.3f}, {launches} kernel launches")


def check_decoding(engine: Path, prompts) -> None:
    fast = LLM(engine, device=RIG.device, kernels=KERNELS)  # compiled kernels and CUDA graphs
    runner = fast.model.graphs
    captured = runner is not None and runner.capture
    record("kernels and graphs", fast.model.kernels is not None and fast.model.kernels.name == "aot"
           and runner is not None and len(runner.graphs) > 0 and (captured or RIG.dry),
           f"kernels {fast.model.kernels and fast.model.kernels.name}, {len(runner.graphs) if runner else 0} graphs "
           + ("captured at start" if captured else "prepared at start (dry run: the static path runs eagerly)"))
    prepared = set(runner.graphs) if runner else set()
    eager = LLM(engine, device=RIG.device, kernels=KERNELS, cuda_graphs=False)
    ar = fast.generate(prompts[:SPEC_PROMPTS], SamplingParams(max_new_tokens=TOKENS, ignore_eos=True))
    for mode in MODES[2:]:  # lossless at temperature 0
        outs = fast.generate(prompts[:SPEC_PROMPTS], SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, mode=mode,
                                                         block_length=BLOCK))
        share = agreement(outs, ar)
        record(f"{mode} equals ar", share >= 0.9, f"token agreement {share:.3f}")
    for count in COUNTS:  # padded into the 4 and 8 buckets
        for mode in MODES:
            params = SamplingParams(max_new_tokens=GRAPH_TOKENS, ignore_eos=True, mode=mode)
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
        params = SamplingParams(max_new_tokens=GRAPH_TOKENS, ignore_eos=True, mode=mode, temperature=0.8, top_p=0.95,
                                seed=11, block_length=BLOCK if mode != "diffusion" else None)
        first = fast.generate(prompts[:SAMPLED], params)
        again = fast.generate(prompts[:SAMPLED], params)
        ok = [a.output_ids == b.output_ids for a, b in zip(first, again)]
        valid = all(0 <= t < vocab for o in first for t in o.output_ids)
        record(f"{mode} temperature 0.8", all(ok) and valid, f"seeded repeats {ok}, tokens valid {valid}")


def main() -> int:
    seed = int(time.time())
    print(f"device {RIG.name}, seed {seed}", flush=True)
    torch.manual_seed(seed)
    root = Path(tempfile.mkdtemp())
    checkpoint = make_checkpoint(root / "ckpt", lora_rank=16, seed=seed, **GEOMETRY)
    prompts = [[1] + torch.randint(130, 380, (n,)).tolist() for n in PROMPT_LENGTHS]
    steps = []
    for dtype, bound in (("bf16", 3e-2), ("fp8", 3e-2)):
        engine = root / dtype
        steps.append((f"build {dtype}", lambda e=engine, d=dtype: build_engine(
            checkpoint, e, BuildOptions(dtype=d, arch=RIG.arch, kv_page_size=16, max_batch_size=8, block_length=BLOCK,
                                        max_seq_len=512 if RIG.dry else None))))
        steps.append((f"{dtype} teacher-forced", lambda e=engine, b=bound, d=dtype: check_teacher_forced(
            e, prompts, b, d)))
    steps.append(("decoding", lambda: check_decoding(root / "bf16", prompts)))
    REPORT.run(steps)
    return REPORT.finish()


if __name__ == "__main__":
    sys.exit(main())
