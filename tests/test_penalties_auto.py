"""Penalties in every mode and mode="auto", in the runtime and on the command line.

checkpoint ──builder──▶ engine dir ──[runtime: penalties, the auto policy]──▶ serving

Penalised greedy output equals an independent oracle (transformers' logits with vLLM's penalty rules
applied in `helpers.penalized_greedy`) in AR and both spec modes; auto equals AR, also when a request is
made to change modes at every boundary. The servers' cases are in test_openai_api.py and
test_triton_serving.py.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from helpers import penalized_greedy, rotating_auto, transformers_model
from nemodiff import SamplingParams
from nemodiff.cli import main as nemodiff_cli
from nemodiff.runtime.engine.auto import AutoPolicy, StepCosts
from nemodiff.runtime.request import AUTO_MODES

PROMPT = "the cat sat on the mat and the cat"
PENALTIES = {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3}
COUNT = 20


@pytest.fixture(scope="module")
def oracle(served_engine, served_llm):
    """(prompt ids, penalised greedy ids) from transformers on the served engine's checkpoint."""
    ids = served_llm.tokenizer.encode(PROMPT)
    return ids, penalized_greedy(transformers_model(served_engine.parent / "ckpt"), ids, COUNT,
                                 PENALTIES["repetition_penalty"], PENALTIES["frequency_penalty"],
                                 PENALTIES["presence_penalty"])


def params(mode: str, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=COUNT, ignore_eos=True, mode=mode, block_length=4, **extra)


def test_penalized_greedy_equals_the_oracle_in_every_lossless_mode(served_llm, oracle):
    ids, want = oracle
    plain = served_llm.generate([ids], params("ar"))[0].output_ids
    assert plain != want  # the penalties change this output
    outputs = served_llm.generate([ids] * 4, [params(m, **PENALTIES) for m in ("ar", "linear-spec", "quadratic-spec",
                                                                               "auto")])
    assert [o.output_ids for o in outputs] == [want] * 4
    # diffusion applies them too (to each position's row, from the committed output): its output moves
    diffused = [served_llm.generate([ids], params("diffusion", **extra))[0].output_ids for extra in ({}, PENALTIES)]
    assert diffused[0] != diffused[1]


def test_cli_takes_the_penalties_and_auto_reports_its_modes(served_engine, oracle):
    ids, want = oracle
    args = ["generate", str(served_engine), "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", str(COUNT),
            "--block-length", "4", "--json", "--repetition-penalty", "1.3", "--frequency-penalty", "0.4",
            "--presence-penalty", "0.3", "--ignore-eos", "--mode"]
    for mode in ("linear-spec", "auto"):
        result = CliRunner().invoke(nemodiff_cli, args + [mode])
        assert result.exit_code == 0, result.output
        out = json.loads(result.output.splitlines()[-1])
        assert out["output_ids"] == want
    assert set(out["stats"]["modes"]) <= set(AUTO_MODES) and sum(out["stats"]["modes"].values()) == \
        out["num_forward_passes"]
    result = CliRunner().invoke(nemodiff_cli, args[:-1] + ["--repetition-penalty", "0"])
    assert result.exit_code != 0 and "repetition_penalty must be a number in (0, 10] (got 0.0)" in result.output


@pytest.mark.parametrize("extra", [{}, PENALTIES])
def test_a_request_switching_modes_mid_generation_keeps_ar_tokens(served_llm, extra):
    prompts = ["the cat sat", "a dog ran into the river", "one two"]
    want = [o.output_ids for o in served_llm.generate(prompts, params("ar", **extra))]
    kept = rotating_auto(served_llm)
    try:
        outputs = served_llm.generate(prompts, params("auto", **extra))
    finally:
        served_llm.engine.auto = kept
    assert [o.output_ids for o in outputs] == want
    for output in outputs:
        assert set(output.stats["modes"]) == set(AUTO_MODES) and output.stats["mode_switches"] >= 5


def test_auto_at_temperature_keeps_to_the_lossless_modes(served_llm):
    outputs = served_llm.generate(["the cat", "the dog"], params("auto", temperature=0.8, seed=3))
    for output in outputs:
        assert len(output.output_ids) == COUNT and set(output.stats["modes"]) <= set(AUTO_MODES)


def test_the_policy_picks_the_most_tokens_per_second(served_llm):
    policy = AutoPolicy(served_llm.engine.ctx)
    policy.yields.samples["linear-spec"] = policy.yields.samples["quadratic-spec"] = 100
    policy.yields.tokens |= {"linear-spec": 3.0, "quadratic-spec": 2.0}
    policy.yields.forwards |= {"linear-spec": 1.0, "quadratic-spec": 1.0}
    flat = StepCosts()  # a device with room: a step costs the same whatever its tokens
    for tokens in (1, 8, 64, 512):
        flat.observe(tokens, 0.01)
    policy.costs = flat
    assert policy.choose("ar", AUTO_MODES, 0, 0, 4) == "linear-spec"
    busy = StepCosts()  # compute-bound: a step costs by its tokens
    for tokens in (1, 8, 64, 512):
        busy.observe(tokens, 0.001 * tokens)
    policy.costs = busy
    assert policy.choose("linear-spec", AUTO_MODES, 31 * 4, 31 * 3, 4, 1 / 32) == "ar"
    assert policy.choose("ar", AUTO_MODES, 0, 0, 4) == "ar"  # 3 tokens for 4x the time
    assert busy.predict(32) == pytest.approx(0.032) and busy.predict(1024) == pytest.approx(1.024)


def test_all_requests_move_together_where_one_alone_would_not_pay(served_llm):
    from types import SimpleNamespace

    policy = AutoPolicy(served_llm.engine.ctx)
    policy.yields.samples["linear-spec"] = 100
    policy.yields.tokens["linear-spec"], policy.yields.forwards["linear-spec"] = 3.0, 1.0
    for tokens, seconds in ((8, 0.010), (23, 0.020), (128, 0.021)):  # a knee: 8 x 16 tokens cost 8 x 1's twice
        policy.costs.observe(tokens, seconds)
    requests = [SimpleNamespace(strategy=SimpleNamespace(mode="ar"),
                                request=SimpleNamespace(params=SamplingParams(block_length=16))) for _ in range(8)]
    assert policy.choose("ar", ("ar", "linear-spec"), 7, 7, 16, 1 / 8) == "ar"  # one alone: 10 / 20 ms < 8 / 10 ms
    assert policy.together(requests, 8, 8) == "linear-spec"  # all of them: 24 / 21 ms


def test_penalty_ranges_name_the_field():
    for name, value, message in (("repetition_penalty", 0.0, "repetition_penalty must be a number in (0, 10]"),
                                 ("frequency_penalty", 2.5, "frequency_penalty must be a number in [-2, 2]"),
                                 ("presence_penalty", float("nan"), "presence_penalty must be a number in [-2, 2]"),
                                 ("presence_penalty", True, "presence_penalty must be a number")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            SamplingParams(**{name: value}).validate()
    assert SamplingParams(mode="AUTO").validate().mode == "auto"
