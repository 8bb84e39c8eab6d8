"""Log-probabilities in every mode (docs/design.md §11) and n completions per prompt.

AR log-probabilities equal transformers' log-softmax on the same weights; LinearSpec and QuadraticSpec
take theirs from the verify logits and equal AR's; diffusion reports the denoising step that revealed
each token. n > 1: each choice its own derived seed, all sharing the prompt's pages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import make_engine, transformers_model
from nemodiff import LLM, SamplingParams

PROMPT = [1, 200, 201, 202, 203, 204, 205, 206, 207]


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    return make_engine(checkpoint, tmp_path_factory.mktemp("logprobs") / "fp32", kv_page_size=4, block_length=4)


@pytest.fixture(scope="module")
def llm(engine):
    return LLM(engine, device="cpu")


def test_ar_logprobs_equal_transformers_log_softmax(checkpoint, llm):
    out = llm.generate(PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=5))[0]
    model = transformers_model(checkpoint)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + out.output_ids])).logits[0].double()
    want = torch.log_softmax(logits, dim=-1)[len(PROMPT) - 1: -1]
    assert out.logprob_source == "causal" and len(out.logprobs) == len(out.output_ids) == 6
    for entry, token, row in zip(out.logprobs, out.output_ids, want):
        assert entry.token_id == token
        assert abs(entry.logprob - row[token].item()) < 1e-5
        top = torch.topk(row, 5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert np.allclose([lp for _, lp in entry.top], top.values.numpy(), atol=1e-5)
    assert math.isclose(out.cumulative_logprob, sum(e.logprob for e in out.logprobs))


@pytest.mark.parametrize("mode, block", [("linear-spec", 4), ("quadratic-spec", 3)])
def test_spec_mode_logprobs_equal_ar(llm, mode, block):
    ar = llm.generate(PROMPT, SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=3))[0]
    spec = llm.generate(PROMPT, SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=3, mode=mode,
                                               block_length=block))[0]
    assert spec.output_ids == ar.output_ids
    assert np.allclose([e.logprob for e in spec.logprobs], [e.logprob for e in ar.logprobs], atol=1e-5)
    assert [[t for t, _ in e.top] for e in spec.logprobs] == [[t for t, _ in e.top] for e in ar.logprobs]
    assert spec.logprob_source == "causal"


def test_diffusion_reports_the_denoising_step(llm):
    out = llm.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2, mode="diffusion",
                                              threshold=0.5))[0]
    assert out.logprob_source == "denoise" and len(out.logprobs) == 8
    for entry, token in zip(out.logprobs, out.output_ids):  # greedy: the revealed token is its row's best
        assert entry.token_id == token and entry.logprob <= 0
        assert entry.top[0][0] == token and abs(entry.top[0][1] - entry.logprob) < 1e-6


def test_logprob_counts_and_cost(llm):
    none = llm.generate(PROMPT, SamplingParams(max_new_tokens=3))[0]
    assert none.logprobs is None and "logprobs" not in none.to_dict()
    assert llm.engine.decider.logprob_pass is None  # nothing computed when nobody asks
    zero = llm.generate(PROMPT, SamplingParams(max_new_tokens=3, logprobs=0))[0]
    assert [e.top for e in zero.logprobs] == [[], [], []] and zero.to_dict()["logprobs"][0]["top"] == []
    many = llm.generate(PROMPT, SamplingParams(max_new_tokens=2, logprobs=20))[0]
    assert all(len(e.top) == 20 for e in many.logprobs)
    with pytest.raises(ValueError, match="logprobs must be in \\[0, 20\\]"):
        llm.generate(PROMPT, SamplingParams(logprobs=21))
    mixed = llm.generate([PROMPT, PROMPT[:5]], [SamplingParams(max_new_tokens=4, logprobs=1),
                                                 SamplingParams(max_new_tokens=4)])
    assert len(mixed[0].logprobs) == 4 and mixed[1].logprobs is None


@pytest.mark.parametrize("mode", ["ar", "linear-spec", "quadratic-spec", "diffusion"])
def test_n_choices(llm, mode):
    prompt = PROMPT + [210, 211, 212, 213]
    single = llm.generate(prompt, SamplingParams(max_new_tokens=6, mode=mode))[0]
    greedy = llm.generate(prompt, SamplingParams(max_new_tokens=6, mode=mode, n=3))
    assert [o.index for o in greedy] == [0, 1, 2]
    assert all(o.output_ids == single.output_ids for o in greedy)  # at temperature 0 every choice agrees
    assert all(o.cached_prompt_tokens >= 8 for o in greedy[1:])  # the choices share the prompt's pages
    hot = SamplingParams(max_new_tokens=6, mode=mode, n=4, temperature=1.5, seed=11)
    first, again = llm.generate(prompt, hot), llm.generate(prompt, hot)
    assert [o.output_ids for o in first] == [o.output_ids for o in again]  # seeds derived from the request's
    assert len({tuple(o.output_ids) for o in first}) > 1
    assert first[0].output_ids == llm.generate(prompt, SamplingParams(max_new_tokens=6, mode=mode, temperature=1.5,
                                                                      seed=11))[0].output_ids  # choice 0: the seed
