"""Self-speculation is lossless: at temperature 0, linear-spec, quadratic-spec and auto equal AR."""

import pytest
import torch

from helpers import make_checkpoint, make_engine, make_sticky_checkpoint, rotating_auto
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.decoding.strategies.speculative import verify

PROMPTS = [
    [1, 200, 201, 202],
    [1] + list(range(130, 160)),  # much longer than a 4-token KV page
    [1, 300, 300, 301, 302, 303, 304],
]
SPEC_MODES = ("linear-spec", "quadratic-spec")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossless")
    return {
        "random": make_engine(make_checkpoint(root / "r0", seed=0, lora_rank=8), root / "e-r0", kv_page_size=4),
        "random-wide": make_engine(make_checkpoint(root / "r1", seed=5, lora_rank=4, num_hidden_layers=3,
                                                   head_dim=32, num_attention_heads=2, num_key_value_heads=1),
                                   root / "e-r1", kv_page_size=8),
        "sticky": make_engine(make_sticky_checkpoint(root / "s0", seed=0), root / "e-s0", kv_page_size=4),
        "sticky-2": make_engine(make_sticky_checkpoint(root / "s1", seed=3), root / "e-s1", kv_page_size=4),
    }


@pytest.mark.parametrize("block", [4, 8, 32])
@pytest.mark.parametrize("name", ["random", "random-wide", "sticky", "sticky-2"])
def test_spec_modes_equal_ar(engines, name, block):
    llm = LLM(engines[name], device="cpu")
    max_new = 45  # not a multiple of any block length
    ar = llm.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    lengths = set()
    for mode in SPEC_MODES:
        for lora in (True, False):
            params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, mode=mode, block_length=block,
                                    draft_lora=lora)
            outs = llm.generate(PROMPTS, params)
            for out, want in zip(outs, ar):
                assert out.output_ids == want.output_ids, (mode, lora)
                assert out.finish_reason == "length" and len(out.output_ids) == max_new
                lengths |= set(out.stats["accepted_length_histogram"])
                expected_forwards = out.stats["cycles"] * (2 if mode == "linear-spec" else 1) + 1
                assert out.num_forward_passes == expected_forwards
    if name.startswith("sticky"):
        # the sticky models accept whole blocks and partial ones, not just the bonus token
        assert max(lengths) == block and any(1 < n < block for n in lengths), lengths
    if block == 8:  # auto, left to its policy and made to change mode at every boundary, equals AR too
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, mode="auto", block_length=block)
        assert [o.output_ids for o in llm.generate(PROMPTS, params)] == [o.output_ids for o in ar]
        kept = rotating_auto(llm)
        try:
            outs = llm.generate(PROMPTS, params)
        finally:
            llm.engine.auto = kept
        assert [o.output_ids for o in outs] == [o.output_ids for o in ar]
        assert all(o.stats["mode_switches"] >= 3 for o in outs)


@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("name", ["random", "random-wide"])
def test_eos_ends_generation_like_ar(engines, mode, name):
    llm = LLM(engines[name], device="cpu")
    free = llm.generate(PROMPTS, SamplingParams(max_new_tokens=30, ignore_eos=True))
    for prompt, reference in zip(PROMPTS, free):
        tokens = reference.output_ids
        eos = next((t for i, t in enumerate(tokens) if i >= 5 and tokens.index(t) == i), tokens[-1])
        llm.engine.eos_ids = frozenset({eos, 9999})
        want = llm.generate(prompt, SamplingParams(max_new_tokens=30))[0]
        assert want.finish_reason == "eos" and want.output_ids[-1] == eos
        got = llm.generate(prompt, SamplingParams(max_new_tokens=30, mode=mode, block_length=8))[0]
        assert got.output_ids == want.output_ids and got.finish_reason == "eos"


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_eos_inside_an_accepted_block(engines, mode):
    """The sticky model accepts whole blocks; an end token forced mid-block (thinking budget)
    that is also an EOS must end generation there, exactly as in AR."""
    llm = LLM(engines["sticky"], device="cpu")
    end = llm.tokenizer.think_end_id()
    llm.engine.eos_ids = frozenset({end})
    params = SamplingParams(max_new_tokens=40, max_thinking_tokens=13)
    want = llm.generate(PROMPTS, params)
    got = llm.generate(PROMPTS, SamplingParams(**{**vars(params), "mode": mode, "block_length": 8,
                                                  "draft_lora": False}))
    for g, w in zip(got, want):
        assert w.output_ids[-1] == end and len(w.output_ids) == 14 and w.finish_reason == "eos"
        assert g.output_ids == w.output_ids and g.finish_reason == "eos"
    assert any(max(g.stats["accepted_length_histogram"]) > 1 for g in got)


def test_mixed_mode_batch_equals_each_request_alone(engines):
    llm = LLM(engines["sticky"], device="cpu")
    jobs = [
        ([1, 200, 201, 202], SamplingParams(max_new_tokens=21, mode="ar")),
        ([1] + list(range(130, 150)), SamplingParams(max_new_tokens=33, mode="linear-spec", block_length=8)),
        ([1, 300, 301], SamplingParams(max_new_tokens=17, mode="quadratic-spec", block_length=4)),
        ([1, 50, 60, 70], SamplingParams(max_new_tokens=26, mode="diffusion", block_length=8, threshold=0.5)),
        ([1, 50, 61], SamplingParams(max_new_tokens=9, mode="diffusion", block_length=4, threshold=None)),
        ([1, 77], SamplingParams(max_new_tokens=12, mode="linear-spec", temperature=1.0, seed=4)),
    ]
    together = llm.generate([p for p, _ in jobs], [s for _, s in jobs])
    for (prompt, params), got in zip(jobs, together):
        alone = llm.generate(prompt, params)[0]
        assert got.output_ids == alone.output_ids
        assert got.num_forward_passes == alone.num_forward_passes


def test_thinking_budget_forces_end_of_thinking_in_every_mode(engines):
    llm = LLM(engines["sticky"], device="cpu")
    end = llm.tokenizer.think_end_id()
    assert end is not None
    base = SamplingParams(max_new_tokens=20, ignore_eos=True, max_thinking_tokens=6)
    ar = llm.generate(PROMPTS, base)
    free = llm.generate(PROMPTS, SamplingParams(max_new_tokens=20, ignore_eos=True))
    for out, unforced in zip(ar, free):
        assert out.output_ids[:6] == unforced.output_ids[:6] and out.output_ids[6] == end
    for mode in SPEC_MODES:
        outs = llm.generate(PROMPTS, SamplingParams(**{**vars(base), "mode": mode, "block_length": 8}))
        assert [o.output_ids for o in outs] == [o.output_ids for o in ar]
    outs = llm.generate(PROMPTS, SamplingParams(**{**vars(base), "mode": "diffusion", "block_length": 4}))
    assert all(o.output_ids[6] == end and len(o.output_ids) == 20 for o in outs)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_stop_strings_and_exact_lengths_in_every_mode(engines, mode):
    llm = LLM(engines["random"], device="cpu")
    for n in (1, 5, 13):
        out = llm.generate(PROMPTS[1], SamplingParams(max_new_tokens=n, ignore_eos=True, mode=mode, block_length=4))[0]
        assert len(out.output_ids) == n and out.finish_reason == "length"
    free = llm.generate(PROMPTS[1], SamplingParams(max_new_tokens=12, ignore_eos=True, mode=mode, block_length=4))[0]
    stop = free.text[4:6]
    out = llm.generate(PROMPTS[1], SamplingParams(max_new_tokens=12, ignore_eos=True, mode=mode, block_length=4,
                                                  stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.index(stop)]


def test_verify_accepts_the_longest_matching_prefix_plus_bonus():
    vocab, m = 10, 5
    predictions = [3, 4, 5, 6, 7]
    logits = torch.full((m, vocab), -5.0)
    logits[torch.arange(m), torch.tensor(predictions)] = 5.0
    greedy = SamplingParams()
    assert verify(logits, [3, 4, 5, 6], None, greedy, None) == [3, 4, 5, 6, 7]  # all drafts + bonus
    assert verify(logits, [3, 4, 9, 6], None, greedy, None) == [3, 4, 5]  # two accepted, bonus 5
    assert verify(logits, [0, 4, 5, 6], None, greedy, None) == [3]  # none accepted
    assert verify(logits[:1], [], None, greedy, None) == [3]


def test_mode_names_and_aliases():
    from nemodiff.runtime.request import normalize_mode

    assert normalize_mode("FastDiffuser") == "diffusion"
    assert normalize_mode("linear_spec") == "linear-spec"
    assert normalize_mode("quadratic_spec") == "quadratic-spec"
    with pytest.raises(ValueError, match="unknown decode mode"):
        normalize_mode("medusa")
