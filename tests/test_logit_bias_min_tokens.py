"""Logit bias and min_tokens (docs/design.md §5.6) in every mode.

A +100 bias forces its token and a -100 bias bans it in AR, diffusion, linear-spec and
quadratic-spec; at temperature 0 the spec modes equal AR under the same bias and min_tokens,
token for token; end-of-sequence, stop_token_ids and stop strings cannot end the output before
min_tokens tokens; log-probabilities stay raw; bad values are refused.
"""

from __future__ import annotations

import pytest

from helpers import make_checkpoint, make_engine, make_sticky_checkpoint
from nemodiff import LLM, SamplingParams

MODES = ("ar", "linear-spec", "quadratic-spec", "diffusion")
SPEC = (("linear-spec", 4), ("quadratic-spec", 3), ("quadratic-spec", 4))
TEXTS = ["hello world", "the cat sat on", "1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    sticky = make_engine(make_sticky_checkpoint(root / "s"), root / "es", kv_page_size=4, block_length=4)
    rand = make_engine(make_checkpoint(root / "r", seed=3, lora_rank=8), root / "er", kv_page_size=4, block_length=4)
    return {"sticky": LLM(sticky, device="cpu"), "random": LLM(rand, device="cpu")}


def prompts(llm):
    return [llm.tokenizer.encode(t) for t in TEXTS]


def biases(llm):
    """Several biases: one forcing a token, one banning AR's greedy choices, a spread of small ones."""
    free = llm.generate(prompts(llm), SamplingParams(max_new_tokens=12, ignore_eos=True))
    greedy = sorted({t for out in free for t in out.output_ids})
    spread = {t: (-1) ** t * (1.5 + t % 7) for t in range(0, llm.model.config.vocab_size, 3)}
    return [{7: 100.0}, {t: -100.0 for t in greedy[:3]}, spread]


@pytest.mark.parametrize("name", ["sticky", "random"])
def test_spec_modes_equal_ar_under_bias_and_min_tokens(llms, name):
    llm = llms[name]
    free = llm.generate(prompts(llm), SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop_id = free[0].output_ids[1]  # would end the first prompt's output at two tokens
    cases = [dict(logit_bias=b) for b in biases(llm)]
    cases += [dict(min_tokens=6, stop_token_ids=[stop_id]), dict(min_tokens=5, logit_bias={stop_id: 100.0},
                                                                 stop_token_ids=[stop_id])]
    for case in cases:
        ar = llm.generate(prompts(llm), SamplingParams(max_new_tokens=16, **case))
        for mode, block in SPEC if name == "sticky" else SPEC[::2]:
            outs = llm.generate(prompts(llm), SamplingParams(max_new_tokens=16, mode=mode, block_length=block, **case))
            for out, want in zip(outs, ar):
                assert out.output_ids == want.output_ids, (mode, block, case)
                assert out.finish_reason == want.finish_reason


def test_tensor_decisions_agree(llms):
    """The decisions a GPU runs (tensor operations, not the CPU's numpy path) see the same rows."""
    llm = llms["sticky"]
    spread = biases(llm)[2]
    cases = [dict(logit_bias=spread), dict(logit_bias={min(llm.engine.eos_ids): 100.0}, min_tokens=5)]
    want = [llm.generate(prompts(llm), SamplingParams(max_new_tokens=12, **case)) for case in cases]
    llm.engine.decider.host_arrays = False
    try:
        for case, ar in zip(cases, want):
            for mode in ("ar", "linear-spec", "quadratic-spec"):
                outs = llm.generate(prompts(llm), SamplingParams(max_new_tokens=12, mode=mode, block_length=4, **case))
                assert [o.output_ids for o in outs] == [o.output_ids for o in ar], (mode, case)
    finally:
        llm.engine.decider.host_arrays = True


def test_bias_forces_and_bans_in_every_mode(llms):
    llm = llms["random"]
    free = llm.generate(prompts(llm), SamplingParams(max_new_tokens=8, ignore_eos=True))
    first = {out.output_ids[0] for out in free}
    for mode in MODES:
        for temperature in (0.0, 1.0):
            params = dict(max_new_tokens=8, ignore_eos=True, mode=mode, temperature=temperature, seed=1)
            forced = llm.generate(prompts(llm), SamplingParams(**params, logit_bias={7: 100}))
            assert all(out.output_ids == [7] * 8 for out in forced), mode
            banned = llm.generate(prompts(llm), SamplingParams(**params, logit_bias={t: -100 for t in first}))
            assert all(not first & set(out.output_ids) for out in banned), mode


def test_min_tokens_holds_back_eos_and_stops_in_every_mode(llms):
    llm = llms["random"]
    eos = min(llm.engine.eos_ids)
    for mode in MODES:
        params = dict(max_new_tokens=12, mode=mode, block_length=4)
        # a +100 bias makes end-of-sequence the choice everywhere: min_tokens alone holds it back
        outs = llm.generate(prompts(llm), SamplingParams(**params, logit_bias={eos: 100}, min_tokens=5))
        for out in outs:
            assert len(out.output_ids) == 6 and out.output_ids[-1] == eos and eos not in out.output_ids[:5], mode
            assert out.finish_reason == "eos", mode
        short = llm.generate(prompts(llm), SamplingParams(**params, logit_bias={eos: 100}))
        assert all(len(out.output_ids) == 1 for out in short), mode


def test_stop_strings_wait_for_min_tokens(llms):
    llm = llms["random"]
    free = llm.generate(prompts(llm)[0], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = llm.tokenizer.decode(free.output_ids[:2])[-2:].strip() or llm.tokenizer.decode(free.output_ids[:2])
    early = llm.generate(prompts(llm)[0], SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert len(early.output_ids) <= 2
    late = llm.generate(prompts(llm)[0], SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop],
                                                        min_tokens=8))[0]
    assert len(late.output_ids) >= 8
    assert late.output_ids[:8] == free.output_ids[:8]


def test_log_probabilities_stay_raw_under_bias(llms):
    llm = llms["random"]
    prompt = prompts(llm)[0]
    free = llm.generate(prompt, SamplingParams(max_new_tokens=1, logprobs=2))[0]
    greedy = free.output_ids[0]
    for mode in ("ar", "linear-spec", "quadratic-spec"):
        out = llm.generate(prompt, SamplingParams(max_new_tokens=1, logprobs=2, mode=mode, block_length=4,
                                                  logit_bias={greedy: -100}))[0]
        entry = out.logprobs[0]
        assert entry.token_id != greedy
        assert entry.top[0][0] == greedy  # the banned token is still the raw distribution's first
        assert entry.top[0][1] == pytest.approx(free.logprobs[0].logprob, abs=1e-5)


@pytest.mark.parametrize("params, message", [
    (dict(logit_bias={5: 101}), r"logit_bias values must be numbers in \[-100"),
    (dict(logit_bias={5: float("nan")}), "logit_bias values"),
    (dict(logit_bias={-1: 1}), "logit_bias keys must be token ids"),
    (dict(logit_bias={10**9: 1}), r"logit_bias token ids must be in \[0, "),
    (dict(min_tokens=-1), "min_tokens must be in"),
    (dict(min_tokens=9, max_new_tokens=8), "min_tokens must be in"),
])
def test_bad_values_are_refused(llms, params, message):
    with pytest.raises(ValueError, match=message):
        llms["random"].generate(prompts(llms["random"])[0], SamplingParams(**params))
