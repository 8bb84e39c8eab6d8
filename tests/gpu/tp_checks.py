"""GPU checks for tensor parallelism (needs 2+ GPUs): NCCL, the kernels and CUDA graphs per rank, and
the same outputs as one GPU. Run by run_device_checks.sh when the machine has two GPUs; results go to
$OUT/tp_checks.json after every check. (Tensor parallelism on the CPU, over gloo, is tested in
tests/test_tensor_parallel.py; this file needs GPUs and does nothing in the CPU dry run.)

checkpoint ──builder (--tp 2, kernels)──▶ engine dir ──runtime (2 ranks over NCCL)──▶ Triton
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_report import DRY_RUN, Report, Rig  # noqa: E402

from helpers import make_checkpoint  # noqa: E402
from nemodiff import LLM, SamplingParams  # noqa: E402
from nemodiff.builder.build import BuildOptions, build_engine  # noqa: E402


def check_tensor_parallel(record, arch: str) -> None:
    root = Path(tempfile.mkdtemp())
    ckpt = make_checkpoint(root / "ckpt", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64, lora_rank=16, seed=3)
    engines = {}
    for tp in (1, 2):
        engines[tp] = root / f"tp{tp}"
        build_engine(ckpt, engines[tp], BuildOptions(dtype="bf16", arch=arch, kv_page_size=16, tp=tp))
    one = LLM(engines[1], device="cuda:0", kernels="aot")
    start = time.time()
    with LLM(engines[2], device="cuda:0", kernels="aot") as two:
        record("tp=2 engine starts", True, f"{time.time() - start:.1f} s, graphs "
               f"{len(two.model.graphs.graphs) if two.model.graphs else 0}")
        prompts = [[1] + torch.randint(130, 380, (n,)).tolist() for n in (5, 40, 300, 17)]
        for mode in ("ar", "linear-spec", "quadratic-spec", "diffusion"):
            params = SamplingParams(max_new_tokens=48, ignore_eos=True, mode=mode, block_length=8)
            a, b = two.generate(prompts, params), one.generate(prompts, params)
            same = sum(x.output_ids == y.output_ids for x, y in zip(a, b))
            record(f"{mode}: 2 ranks vs 1 GPU", same >= len(prompts) - 1,
                   f"{same}/{len(prompts)} identical (bf16 all-reduce order may flip a near-tie)")


def main() -> int:
    if DRY_RUN or torch.cuda.device_count() < 2:
        print("fewer than 2 GPUs: tensor-parallel checks skipped")
        return 0
    report = Report("tp_checks")
    report.run([("tensor parallel", lambda: check_tensor_parallel(report.record, Rig(0).arch))])
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
