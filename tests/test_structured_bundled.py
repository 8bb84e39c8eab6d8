"""Structured output on the bundled model (models/nld-tiny): valid JSON in every mode, lossless self-speculation.

[checkpoint: models/nld-tiny] ──builder──▶ engine dir ──runtime──▶ Triton

A trained model, unlike the test models of tests/test_structured_output.py, has strong opinions
about the next token that the grammar must overrule at almost every position. At temperature 0:
every mode writes an object that parses and conforms to the benchmark's schema (nemodiff/bench/structured.py),
linear-spec and quadratic-spec equal constrained AR token for token with and without grammar-shaped
drafts, choice and regex guides hold, a bad schema is refused with the problem named while the other
requests go on, and a constrained request preempted mid-output resumes exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nemodiff import LLM, Guide, SamplingParams
from nemodiff.bench.structured import PROMPTS, SCHEMA, output_problem, schema_problem
from nemodiff.builder.build import BuildOptions, build_engine

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "nld-tiny"
GUIDE = Guide("json_schema", json.dumps(SCHEMA))
TEXTS = PROMPTS[:3]  # a story, counting, a times table
MODES = {"ar": {}, "diffusion": {}, "linear-spec": {}, "quadratic-spec": {"block_length": 4}}
REGEX = r"[A-Z][a-z]{1,7} (has|had) [0-9]{1,2} (keys|maps|apples)\."
CHOICES = ("the horse", "the pig", "the wolf")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nld-tiny-guided") / "engine"
    build_engine(MODEL_DIR, path, BuildOptions(dtype="fp32"))
    return path


@pytest.fixture(scope="module")
def llm(engine):
    return LLM(engine, device="cpu")


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def guided(llm, prompts):
    """Per mode (and for the spec modes per draft shaping) the outputs under the schema."""
    out = {}
    for mode, extra in MODES.items():
        for shaped in ((True, False) if "spec" in mode else (True,)):
            out[mode, shaped] = llm.generate(prompts, SamplingParams(max_new_tokens=96, mode=mode, guide=GUIDE,
                                                                     guided_drafts=shaped, **extra))
    return out


def test_the_schema_checker():
    good = {"name": "Ruby", "place": "the mill", "count": 7}
    assert schema_problem(good, SCHEMA) is None
    assert "missing count" in schema_problem({"name": "a", "place": "b"}, SCHEMA)
    assert "expected an integer" in schema_problem({**good, "count": True}, SCHEMA)
    assert "outside [0, 99]" in schema_problem({**good, "count": 100}, SCHEMA)
    assert "length 13" in schema_problem({**good, "name": "x" * 13}, SCHEMA)
    assert "unexpected age" in schema_problem({**good, "age": 3}, SCHEMA)
    assert "finished by length" in output_problem(json.dumps(good), "length")
    assert "not JSON" in output_problem('{"name": "a\n"}', "stop")  # strict: a raw control character


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_writes_an_object_of_the_schema(guided, mode):
    for out in guided[mode, True]:
        assert output_problem(out.text, out.finish_reason) is None, (mode, out.text)
        assert out.text.startswith('{"name": "')


@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec"])
def test_spec_modes_equal_constrained_ar(guided, mode):
    for shaped in (True, False):
        for out, ar in zip(guided[mode, shaped], guided["ar", True]):
            assert out.output_ids == ar.output_ids, (mode, shaped)
            assert out.finish_reason == ar.finish_reason == "stop"


def test_grammar_shaped_drafts_are_accepted_more(guided):
    def tpf(outs):
        return sum(len(o.output_ids) for o in outs) / sum(o.num_forward_passes for o in outs)

    for mode in ("linear-spec", "quadratic-spec"):
        assert tpf(guided[mode, True]) > tpf(guided[mode, False]), mode


def test_choice_and_regex_guides(llm, prompts):
    for guide, ok in ((Guide("choice", choices=CHOICES), lambda text: text in CHOICES),
                      (Guide("regex", REGEX), lambda text: re.fullmatch(REGEX, text))):
        ar = llm.generate(prompts, SamplingParams(max_new_tokens=40, guide=guide))
        for mode in ("diffusion", "linear-spec", "quadratic-spec"):
            outs = llm.generate(prompts, SamplingParams(max_new_tokens=40, mode=mode, guide=guide,
                                                        **MODES[mode]))
            for out, want in zip(outs, ar):
                assert out.finish_reason == "stop" and ok(out.text), (guide.kind, mode, out.text)
                if mode != "diffusion":
                    assert out.output_ids == want.output_ids, (guide.kind, mode)


def test_a_bad_schema_is_refused_while_the_others_finish(llm, prompts):
    engine = llm.engine
    good = [engine.add_request(p, SamplingParams(max_new_tokens=96, mode=mode, guide=GUIDE, **MODES[mode]))
            for p, mode in zip(prompts * 2, MODES)]
    engine.step()
    bad = Guide("json_schema", json.dumps({"type": "object", "properties": {"count": {"type": "integr"}}}))
    with pytest.raises(ValueError, match='invalid JSON schema: .*Unsupported type "integr"'):
        engine.add_request(prompts[0], SamplingParams(max_new_tokens=96, guide=bad))
    with pytest.raises(ValueError, match="json_schema guide is not valid JSON"):
        engine.add_request(prompts[0], SamplingParams(guide=Guide("json_schema", '{"type": ')))
    while engine.has_unfinished():
        engine.step()
    for request in good:
        assert output_problem(request.text, request.finish_reason) is None, (request.params.mode, request.text)
    with pytest.raises(ValueError, match="Unsupported type"):  # LLM.generate: the whole call, nothing left running
        llm.generate(prompts, [SamplingParams(guide=GUIDE), SamplingParams(guide=bad), SamplingParams(guide=GUIDE)])
    assert not engine.has_unfinished()


def test_preemption_mid_output_stays_exact(engine, guided, prompts):
    small = LLM(engine, device="cpu", num_kv_pages=12, max_batch_size=6)
    for mode in ("ar", "linear-spec", "quadratic-spec"):
        params = SamplingParams(max_new_tokens=96, mode=mode, guide=GUIDE, **MODES[mode])
        outs = small.generate(prompts * 2, params)
        assert [o.output_ids for o in outs] == [o.output_ids for o in guided["ar", True] * 2], mode
        assert sum(o.stats.get("preemptions", 0) for o in outs) > 0, mode
    diffusion = small.generate(prompts * 2, SamplingParams(max_new_tokens=96, mode="diffusion", guide=GUIDE))
    assert [o.output_ids for o in diffusion] == [o.output_ids for o in guided["diffusion", True] * 2]
    assert sum(o.stats.get("preemptions", 0) for o in diffusion) > 0
    assert small.engine.scheduler.num_preemptions > 0 and small.cache.num_used_pages == 0
