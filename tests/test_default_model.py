"""The shipped default model (models/nld-tiny) really speculates through the real runtime.

[checkpoint: models/nld-tiny] ──builder──▶ engine dir ──runtime──▶ Triton

Builds an fp32 engine from the committed checkpoint and decodes held-out prompts (slot
combinations that never occur in its training corpus) at temperature 0 in every mode.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from nemodiff import LLM, SamplingParams
from nemodiff.builder.build import BuildOptions, build_engine

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "nld-tiny"
sys.path.insert(0, str(ROOT / "tools"))

import default_corpus  # noqa: E402

MAX_NEW_TOKENS = 64
MIN_TPF = {"linear-spec": 2.5, "quadratic-spec": 2.5, "diffusion": 1.8}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    engine = tmp_path_factory.mktemp("nld-tiny") / "engine"
    build_engine(MODEL_DIR, engine, BuildOptions(dtype="fp32"))
    llm = LLM(engine, device="cpu")
    prompts = default_corpus.held_out_prompts()
    results = {}
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, mode=mode)
        results[mode] = llm.generate(prompts, [params] * len(prompts))
    return results


def test_checkpoint_is_small_and_in_upstream_layout():
    files = {f.name: f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in files
    assert sum(files.values()) <= 20 * 1024 * 1024


def test_held_out_prompts_are_not_in_the_training_corpus():
    docs = default_corpus.training_documents(20000)
    for prompt in default_corpus.held_out_prompts():
        assert not any(doc.startswith(prompt) for doc in docs)


@pytest.mark.parametrize("mode", sorted(MIN_TPF))
def test_tokens_per_forward(outputs, mode):
    outs = outputs[mode]
    tpf = sum(len(o.output_ids) for o in outs) / sum(o.num_forward_passes for o in outs)
    assert tpf >= MIN_TPF[mode], f"{mode}: {tpf:.3f} tokens per forward"
    ar = sum(len(o.output_ids) for o in outputs["ar"]) / sum(o.num_forward_passes for o in outputs["ar"])
    assert ar == 1.0


@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec"])
def test_speculation_is_lossless(outputs, mode):
    for spec, ar in zip(outputs[mode], outputs["ar"]):
        assert spec.output_ids == ar.output_ids


def test_ar_output_is_readable(outputs):
    vocabulary = set()
    for doc in default_corpus.training_documents(3000):
        vocabulary.update(re.findall(r"[A-Za-z]+", doc))
    for out in outputs["ar"]:
        assert out.text.isascii()
        words = re.findall(r"[A-Za-z]+", out.text)
        assert len(words) >= 10, out.text
        known = sum(word in vocabulary for word in words) / len(words)
        assert known >= 0.95, out.text
