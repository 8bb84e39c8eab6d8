"""Sampler filters, seeding, and stop rules."""

import pytest
import torch

from nemodiff import LLM, SamplingParams
from nemodiff.runtime.decoding.reference_sampler import distribution, make_generator, sample


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = distribution(logits, temperature=1.0, top_k=2)
    assert (probs[2:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    full = torch.softmax(logits.double(), -1)
    probs = distribution(logits, temperature=1.0, top_p=full[0].item() + 1e-6)  # needs the top two
    assert (probs[:2] > 0).all() and (probs[2:] == 0).all()
    probs = distribution(logits, temperature=1.0, top_p=0.01)
    assert probs[0] == 1.0
    hot = distribution(logits, temperature=10.0)
    assert hot.max() < full.max()


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    a = [sample(logits, 1.0, 0, 1.0, make_generator(5)) for _ in range(3)]
    b = [sample(logits, 1.0, 0, 1.0, make_generator(5)) for _ in range(3)]
    assert a == b
    assert sample(logits, 0.0, 0, 1.0, None) == int(logits.argmax())


def test_seeded_generation_repeats_and_differs_from_greedy(engine_fp32):
    llm = LLM(engine_fp32, device="cpu")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, seed=123, ignore_eos=True)
    first = llm.generate([1, 30, 31], params)[0].output_ids
    assert llm.generate([1, 30, 31], params)[0].output_ids == first
    greedy = llm.generate([1, 30, 31], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].output_ids
    assert first != greedy


def test_stop_rules(engine_fp32):
    llm = LLM(engine_fp32, device="cpu")
    prompt = [1, 200, 17, 18]
    free = llm.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 12
    # a stop string taken from the model's own output ends generation there; the text excludes it
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = llm.generate(prompt, SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert len(out.output_ids) <= 12 and free.output_ids[: len(out.output_ids)] == out.output_ids
    # any id of an EOS list ends generation and is included in output_ids
    llm.engine.eos_ids = frozenset({999, free.output_ids[3]})
    out = llm.generate(prompt, SamplingParams(max_new_tokens=12))[0]
    assert out.finish_reason == "eos" and out.output_ids == free.output_ids[: free.output_ids.index(free.output_ids[3]) + 1]


@pytest.mark.parametrize("bad, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"mode": "beam"}, "unknown decode mode 'beam'"),
    ({"max_new_tokens": 100000}, "exceeds the engine's max_seq_len"),
])
def test_bad_parameters_are_rejected_clearly(engine_fp32, bad, message):
    llm = LLM(engine_fp32, device="cpu")
    with pytest.raises(ValueError, match=message):
        llm.generate([1, 2, 3], SamplingParams(**bad))
    assert llm.generate([1, 2, 3], SamplingParams(max_new_tokens=2))[0].finish_reason in ("length", "eos")
