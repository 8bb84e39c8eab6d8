"""Structured output (docs/design.md §12) in every mode.

Constrained output parses or matches in AR, diffusion, linear-spec and quadratic-spec; at
temperature 0 the spec modes equal constrained AR token for token, with and without drafts built
under the grammar, through preemption too; a bad schema, regex or grammar is refused at admission
with a message naming the problem while the other requests go on; the grammar's end is a stop.
"""

from __future__ import annotations

import json
import re

import pytest

from helpers import make_checkpoint, make_engine, make_sticky_checkpoint
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.request import Guide

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"]}
REGEX = r"[a-z]{2,5}-[0-9]{2}"
GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= [0-9] | [0-9] "+" expr'
CHOICES = ("yes", "no", "maybe not")
GUIDES = {
    "json_schema": Guide("json_schema", json.dumps(SCHEMA)),
    "regex": Guide("regex", REGEX),
    "choice": Guide("choice", choices=CHOICES),
    "ebnf_grammar": Guide("ebnf_grammar", GRAMMAR),
    "json": Guide("json"),
}
MODES = ("ar", "linear-spec", "quadratic-spec", "diffusion")
TEXTS = ["hello world", "the cat sat on", "1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    return {"sticky": make_engine(make_sticky_checkpoint(root / "s"), root / "es", kv_page_size=4, block_length=4),
            "random": make_engine(make_checkpoint(root / "r", seed=2, lora_rank=8), root / "er", kv_page_size=4,
                                  block_length=4)}


@pytest.fixture(scope="module")
def llms(engines):
    return {name: LLM(path, device="cpu") for name, path in engines.items()}


def prompts(llm):
    return [llm.tokenizer.encode(t) for t in TEXTS]


def check(kind: str, text: str) -> None:
    if kind == "json_schema":
        # xgrammar's string of bounded length admits control characters unescaped: strict=False reads them
        value = json.loads(text, strict=False)
        assert set(value) == {"name", "ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
        assert isinstance(value["name"], str) and len(value["name"]) <= 6
    elif kind == "json":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    else:
        assert re.fullmatch(r"\([0-9](\+[0-9])*\)", text), text


@pytest.mark.parametrize("kind", list(GUIDES))
def test_output_follows_the_guide_in_every_mode(llms, kind):
    llm = llms["sticky"]
    for mode in MODES:
        for threshold in ((0.9, None) if mode == "diffusion" else (0.9,)):
            outs = llm.generate(prompts(llm), SamplingParams(max_new_tokens=48, mode=mode, guide=GUIDES[kind],
                                                             threshold=threshold))
            for out in outs:
                assert out.finish_reason == "stop", (mode, out.text)
                check(kind, out.text)


@pytest.mark.parametrize("name", ["sticky", "random"])
@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice", "ebnf_grammar"])
def test_spec_modes_equal_constrained_ar(llms, name, kind):
    llm = llms[name]
    params = dict(max_new_tokens=40, guide=GUIDES[kind])
    ar = llm.generate(prompts(llm), SamplingParams(**params))
    for mode, block in (("linear-spec", 4), ("quadratic-spec", 3), ("quadratic-spec", 4)):
        for shaped in (True, False):
            outs = llm.generate(prompts(llm), SamplingParams(**params, mode=mode, block_length=block,
                                                             guided_drafts=shaped))
            for out, want in zip(outs, ar):
                assert out.output_ids == want.output_ids, (mode, block, shaped)
                assert out.finish_reason == want.finish_reason


def test_grammar_shaped_drafts_raise_acceptance(llms):
    """Drafts built under the grammar are valid as far as they go, so more of them are accepted."""
    llm = llms["sticky"]
    rates = {}
    for mode in ("linear-spec", "quadratic-spec"):
        for shaped in (True, False):
            outs = llm.generate(prompts(llm), SamplingParams(max_new_tokens=40, mode=mode, block_length=4,
                                                             guide=GUIDES["json_schema"], guided_drafts=shaped))
            rates[mode, shaped] = sum(len(o.output_ids) for o in outs) / sum(o.num_forward_passes for o in outs)
        assert rates[mode, True] > rates[mode, False], rates


def test_draft_walks_follow_recent_acceptance(llms, monkeypatch):
    """A spec request builds its drafts under the grammar only two rows past the most tokens one of its last
    four verifications accepted (all rows at first); the rows after stay unmasked, and the output is still
    constrained AR's."""
    from nemodiff.runtime.decoding.decision_pass import Decider
    from nemodiff.runtime.decoding.grammar_jobs import WALK, GuideJob
    from nemodiff.runtime.decoding.strategies.linear_spec import LinearSpecStrategy

    llm = llms["random"]
    params = dict(max_new_tokens=40, guide=GUIDES["json_schema"])
    ar = llm.generate(prompts(llm), SamplingParams(**params))
    history, walks = [], []
    real_walk, real_shape = LinearSpecStrategy.draft_walk, Decider.shape

    def draft_walk(self, drafts):
        history.append((list(self.accepted), drafts))
        return real_walk(self, drafts)

    def shape(self, first_row, count, fn):
        if isinstance(fn, GuideJob) and fn.kind == WALK:
            walks.append((fn.count, fn.walk))
        return real_shape(self, first_row, count, fn)

    monkeypatch.setattr(LinearSpecStrategy, "draft_walk", draft_walk)
    monkeypatch.setattr(Decider, "shape", shape)
    outs = llm.generate(prompts(llm), SamplingParams(**params, mode="linear-spec", block_length=8))
    assert [o.output_ids for o in outs] == [a.output_ids for a in ar]
    assert len(walks) == len(history) > 0
    for (accepted, drafts), (count, walk) in zip(history, walks):
        assert count == drafts
        assert walk == (min(drafts, max(accepted[-4:]) + 2) if accepted else drafts)
    assert any(walk < count for count, walk in walks)


def test_sampled_output_follows_the_guide(llms):
    llm = llms["random"]
    for mode in MODES:
        for seed in range(3):
            params = SamplingParams(max_new_tokens=48, mode=mode, temperature=1.0, seed=seed, block_length=4,
                                    guide=GUIDES["json_schema"])
            out = llm.generate(prompts(llm)[0], params)[0]
            assert out.finish_reason == "stop", (mode, out.text)
            check("json_schema", out.text)


def test_preemption_keeps_constrained_output_exact(engines):
    guides = [GUIDES["json_schema"], Guide("regex", "[a-z]{24,32}"), GUIDES["json_schema"]] * 2
    reference = LLM(engines["sticky"], device="cpu")
    many = [reference.tokenizer.encode(f"prompt number {i} " * 2) for i in range(6)]
    small = LLM(engines["sticky"], device="cpu", num_kv_pages=24, max_batch_size=6)
    for mode in ("ar", "linear-spec", "quadratic-spec", "diffusion"):
        params = [SamplingParams(max_new_tokens=40, mode=mode, guide=g, block_length=4) for g in guides]
        want = reference.generate(many, params)
        outs = small.generate(many, params)
        assert [o.output_ids for o in outs] == [w.output_ids for w in want], mode
        assert sum(o.stats.get("preemptions", 0) for o in outs) > 0, mode
        assert small.cache.num_used_pages == 0


@pytest.mark.parametrize("guide, message", [
    (Guide("json_schema", '{"type": "object", "properties": '), "json_schema guide is not valid JSON"),
    (Guide("json_schema", '{"type": "foo"}'), 'invalid JSON schema: Unsupported type "foo"'),
    (Guide("regex", "[a-"), "invalid regular expression: Regex parsing error at position 4: Unclosed '\\['"),
    (Guide("ebnf_grammar", 'root ::= "a" b'), 'invalid grammar: .*Rule "b" is not defined'),
    (Guide("choice", choices=()), "a choice guide needs a non-empty list"),
    (Guide("xml", "x"), "guide kind must be one of"),
    (None, "max_thinking_tokens cannot be combined with a guide"),
])
def test_a_bad_guide_is_refused_at_admission_and_others_go_on(llms, guide, message):
    llm = llms["random"]
    engine = llm.engine
    good = engine.add_request(prompts(llm)[0], SamplingParams(max_new_tokens=20, guide=GUIDES["regex"]))
    bad = SamplingParams(max_new_tokens=20, guide=guide)
    if guide is None:
        bad = SamplingParams(max_new_tokens=20, guide=GUIDES["regex"], max_thinking_tokens=4)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompts(llm)[1], bad)
    while not good.finished:
        engine.step()
    assert good.finish_reason == "stop"
    check("regex", good.text)
    with pytest.raises(ValueError, match=message):  # LLM.generate: the same message, nothing left running
        llm.generate(prompts(llm), [SamplingParams(guide=GUIDES["regex"])] * 2 + [bad])
    assert not engine.has_unfinished()


def test_grammars_are_compiled_once_and_the_end_is_a_stop(llms):
    llm = llms["random"]
    grammars = llm.engine.grammars()
    before = grammars.compiled_count
    for _ in range(3):
        out = llm.generate(prompts(llm)[0], SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                           guide=Guide("choice", choices=("alpha", "beta"))))[0]
        assert out.text in ("alpha", "beta") and out.finish_reason == "stop"  # ignore_eos: the grammar still ends
    assert grammars.compiled_count == before + 1
    grammars.cache_size = 2
    for i in range(4):
        grammars.compile(Guide("regex", f"x{i}"))
    assert len(grammars._cache) == 2


def test_log_probabilities_are_raw_under_a_guide(llms):
    """The grammar masks the choice, not the reported distribution (docs/design.md §11)."""
    llm = llms["random"]
    prompt = prompts(llm)[0]
    guided = llm.generate(prompt, SamplingParams(max_new_tokens=4, logprobs=3, guide=GUIDES["regex"]))[0]
    for i, entry in enumerate(guided.logprobs):  # the same prefix, unguided, scores the token the same
        free = llm.generate(prompt + guided.output_ids[:i], SamplingParams(max_new_tokens=1, logprobs=3))[0]
        assert [t for t, _ in entry.top] == [t for t, _ in free.logprobs[0].top]
        assert abs(entry.top[0][1] - free.logprobs[0].top[0][1]) < 1e-5


def test_command_line_guides(engines, tmp_path):
    from click.testing import CliRunner

    from nemodiff.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    runner = CliRunner()
    base = ["generate", str(engines["random"]), "--prompt", "hi", "--device", "cpu", "--json"]
    for flags, kind in ((["--json-schema", str(schema)], "json_schema"), (["--regex", REGEX], "regex"),
                        (["--choice", ",".join(CHOICES), "--mode", "linear-spec"], "choice"),
                        (["--grammar", GRAMMAR, "--mode", "diffusion"], "ebnf_grammar")):
        result = runner.invoke(main, base + flags)
        assert result.exit_code == 0, result.output
        check(kind, json.loads(result.output)["text"])
    result = runner.invoke(main, base + ["--regex", "[a-"])
    assert result.exit_code != 0 and "invalid regular expression" in result.output
    result = runner.invoke(main, base + ["--regex", "a", "--choice", "a,b"])
    assert result.exit_code != 0 and "at most one of" in result.output


SAMPLES, TOP_K = 500, 3


def constrained_ar_table(llm, prompt: list[int], guide: Guide, length: int) -> dict[tuple, float]:
    """The exact probability of every output under the guide: per step the logits masked by the grammar,
    then top-k, then softmax (what the sampler does), until the grammar ends or `length` tokens."""
    import torch

    from nemodiff.runtime.decoding.grammar import unpack
    from nemodiff.runtime.model.segments import Segment

    grammars = llm.engine.grammars()
    table = {}

    def walk(prefix: tuple, p: float) -> None:
        matcher = grammars.matcher(guide)
        matcher.advance(list(prefix))
        if len(prefix) == length or matcher.terminated:
            table[prefix] = table.get(prefix, 0.0) + p
            return
        seq = prompt + list(prefix)
        row = llm.model.forward([Segment(0, seq, list(range(len(seq))), 0)])[0][-1].double()
        allowed = unpack(torch.from_numpy(matcher.masks()), row.shape[0])[0]
        values, ids = torch.topk(row.masked_fill(~allowed, float("-inf")), TOP_K)
        for token, q in zip(ids.tolist(), torch.softmax(values, -1).tolist()):
            if q > 0:
                walk(prefix + (token,), p * q)

    walk((), 1.0)
    return table


@pytest.fixture(scope="module")
def wide(engines):
    """The random engine with room for every sample in one batch."""
    return LLM(engines["random"], device="cpu", max_batch_size=SAMPLES, num_kv_pages=SAMPLES * 6)


@pytest.mark.parametrize("mode, block", [("ar", 4), ("linear-spec", 4), ("quadratic-spec", 3)])
def test_sampling_under_a_guide_follows_the_constrained_distribution(wide, mode, block):
    """At temperature > 0 the spec modes' rejection sampling runs against the masked, renormalised
    target: the first tokens of many seeded requests fit constrained AR's exact distribution."""
    from test_spec_sampling import chi_square_p_value

    llm = wide
    prompt, guide = prompts(llm)[1], Guide("regex", "[a-z]{2,3}( [a-z]{2})?")
    table = constrained_ar_table(llm, prompt, guide, 3)
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, top_k=TOP_K, seed=seed, mode=mode, block_length=block,
                             guide=guide) for seed in range(SAMPLES)]
    counts = {}
    for out in llm.generate([prompt] * SAMPLES, params):
        counts[tuple(out.output_ids)] = counts.get(tuple(out.output_ids), 0) + 1
    p_value, dof = chi_square_p_value(counts, table, SAMPLES)
    assert dof >= 4 and p_value > 1e-3, (mode, p_value, dof)


def test_a_failing_grammar_mask_fails_its_request_alone(llms, monkeypatch):
    llm = llms["sticky"]
    from nemodiff.runtime.decoding.grammar_jobs import FollowUp
    from nemodiff.runtime.decoding.strategies.quadratic_spec import QuadraticSpecStrategy

    def broken(self):  # a follow-up walk reaching past the cycle's rows: its request's grammar work fails
        return FollowUp(self.k * self.k, 1, 1, 1)

    monkeypatch.setattr(QuadraticSpecStrategy, "_next_drafts", broken)
    guide = GUIDES["ebnf_grammar"]
    outs = llm.generate(prompts(llm), [SamplingParams(max_new_tokens=24, guide=guide, mode="quadratic-spec"),
                                       SamplingParams(max_new_tokens=24, guide=guide),
                                       SamplingParams(max_new_tokens=24, guide=guide, mode="linear-spec")])
    assert outs[0].finish_reason == "error"  # its targets went unmasked: a token outside its grammar
    for out in outs[1:]:
        assert out.finish_reason == "stop"
        check("ebnf_grammar", out.text)


def test_guided_and_free_requests_share_steps(llms):
    """Guided and unguided requests of every mode in one batch give what each gives alone; n > 1 choices
    each follow the guide; iterative drafting (draft_threshold) under a guide still equals AR."""
    llm = llms["sticky"]
    texts = prompts(llm)
    params = [SamplingParams(max_new_tokens=30, mode=mode, block_length=4, guide=guide)
              for mode in MODES for guide in (None, GUIDES["regex"], GUIDES["json_schema"])]
    batch = llm.generate([texts[i % 3] for i in range(len(params))], params)
    for i, (p, out) in enumerate(zip(params, batch)):
        alone = llm.generate(texts[i % 3], p)[0]
        assert out.output_ids == alone.output_ids, (p.mode, p.guide)
    many = llm.generate(texts[0], SamplingParams(max_new_tokens=30, n=3, temperature=1.0, seed=1,
                                                 guide=GUIDES["choice"]))
    assert len(many) == 3 and all(o.text in CHOICES for o in many)
    ar = llm.generate(texts, SamplingParams(max_new_tokens=30, guide=GUIDES["json_schema"]))
    iterative = llm.generate(texts, SamplingParams(max_new_tokens=30, guide=GUIDES["json_schema"], mode="linear-spec",
                                                   block_length=4, draft_threshold=0.5))
    assert [o.output_ids for o in iterative] == [o.output_ids for o in ar]
