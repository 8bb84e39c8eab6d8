"""Checks a trained checkpoint through the real builder and runtime.

checkpoint ──[builder: build_engine]──▶ engine dir ──[runtime: LLM]──▶ Triton

`runtime_parity` compares the training module's causal logits with the runtime's forward
on an fp32 engine; `measure_modes` decodes held-out prompts at temperature 0 in every mode
and reports tokens per forward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemodiff import LLM, SamplingParams
from nemodiff.builder.build import BuildOptions, build_engine
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Segment
from nemodiff.runtime.request import MODES


def build_fp32_engine(checkpoint: Path, engine_dir: Path) -> Path:
    build_engine(Path(checkpoint), Path(engine_dir), BuildOptions(dtype="fp32", overwrite=True))
    return Path(engine_dir)


def runtime_parity(model, engine_dir: Path, ids: list[int]) -> float:
    """Max |difference| between the module's causal logits and the runtime's, relative to the max |logit|."""
    runtime = load_engine(Path(engine_dir), device="cpu").model
    got = runtime.forward([Segment(0, list(ids), list(range(len(ids))), 0)])[0]
    with torch.no_grad():
        want = model.causal_logits(list(ids)).float()
    return float((got - want).abs().max() / want.abs().max())


def measure_modes(engine_dir: Path, prompts: list[str], max_new_tokens: int = 64,
                  modes: tuple[str, ...] = MODES) -> dict[str, dict]:
    """Per mode: overall tokens per forward (all tokens / all forwards), per-prompt values, texts and ids."""
    llm = LLM(Path(engine_dir), device="cpu")
    results = {}
    for mode in modes:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, mode=mode)
        outs = llm.generate(list(prompts), [params] * len(prompts))
        tokens = sum(len(o.output_ids) for o in outs)
        forwards = sum(o.num_forward_passes for o in outs)
        results[mode] = {
            "tokens_per_forward": tokens / forwards,
            "per_prompt": [round(o.tokens_per_forward, 3) for o in outs],
            "texts": [o.text for o in outs],
            "output_ids": [list(o.output_ids) for o in outs],
        }
    return results
