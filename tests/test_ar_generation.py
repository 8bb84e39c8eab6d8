"""KV-cached AR generation against transformers, a no-cache recompute, and batching."""

import torch

from helpers import transformers_model
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Pattern, Segment

PROMPTS = [[1, 200, 201, 202], [1, 150, 151, 152, 153, 154, 155, 156, 157, 158, 300], [1, 17]]


def no_cache_greedy(model, prompt, steps):
    """Recompute the whole sequence every step: no KV cache involved."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model.forward([Segment(0, ids, list(range(len(ids))), 0, Pattern.CAUSAL, logit_rows=[len(ids) - 1])])
        ids.append(int(logits[0][-1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_transformers_and_recompute(checkpoint, engine_fp32):
    llm = LLM(engine_fp32, device="cpu")
    reference = transformers_model(checkpoint)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)  # all prompts batched together
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            hf = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=None, pad_token_id=0, min_new_tokens=24)
        assert out.output_ids == hf[0, len(prompt):].tolist()
        assert out.output_ids == no_cache_greedy(llm.model, prompt, 24)
        assert out.num_forward_passes == 24 and out.finish_reason == "length"


def test_generation_stops_at_eos_like_transformers(checkpoint, engine_fp32):
    llm = LLM(engine_fp32, device="cpu")
    reference = transformers_model(checkpoint)
    prompt = PROMPTS[1]
    free = llm.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))[0].output_ids
    eos = free[5]  # declare a token the model emits as the EOS: generation must end right there
    llm.engine.eos_ids = frozenset({eos})
    out = llm.generate(prompt, SamplingParams(max_new_tokens=12))[0]
    assert out.finish_reason == "eos" and out.output_ids == free[: free.index(eos) + 1]
    with torch.no_grad():
        hf = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                pad_token_id=0)
    assert out.output_ids == hf[0, len(prompt):].tolist()


def test_segments_of_several_requests_equal_each_alone(engine_fp32):
    engine = load_engine(engine_fp32, device="cpu")
    model, cfg = engine.model, engine.config.model
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, 64, torch.float32)
    prefixes = {0: [1, 5, 9, 13, 17, 21, 25], 1: [1, 300, 301], 2: [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]}
    for rid, ids in prefixes.items():  # commit each prefix into the paged cache
        cache.add_request(rid)
        cache.reserve(rid, len(ids))
        model.forward([Segment(rid, ids, list(range(len(ids))), 0, Pattern.CAUSAL, write_kv=True)], cache)
        cache.set_length(rid, len(ids))
    quad = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    segments = [
        Segment(0, [60, 61, 62], [7, 8, 9], 7, Pattern.CAUSAL),
        Segment(1, [100, 100, 100], [3, 4, 5], 3, Pattern.FULL),
        Segment(2, [70, 71, 72], [11, 12, 13], 11, Pattern.MASK, mask=quad),
    ]
    together = model.forward(segments, cache)
    for seg, got in zip(segments, together):
        alone = model.forward([seg], cache)[0]
        assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[1], model.forward([Segment(1, [100] * 3, [3, 4, 5], 3, Pattern.CAUSAL)],
                                                         cache)[0])  # the pattern matters


def test_cached_segment_equals_no_cache_recompute_for_every_pattern(engine_fp32):
    engine = load_engine(engine_fp32, device="cpu")
    model, cfg = engine.model, engine.config.model
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, 32, torch.float32)
    prefix, tail = [1, 9, 8, 7, 6, 5, 4, 3, 2, 200], [100, 101, 102, 103]
    cache.add_request(0)
    cache.reserve(0, len(prefix))
    model.forward([Segment(0, prefix, list(range(len(prefix))), 0, Pattern.CAUSAL, write_kv=True)], cache)
    cache.set_length(0, len(prefix))
    n, p = len(tail), len(prefix)
    masks = {Pattern.CAUSAL: torch.ones(n, n, dtype=torch.bool).tril(), Pattern.FULL: torch.ones(n, n, dtype=torch.bool)}
    for pattern, intra in masks.items():
        cached = model.forward([Segment(0, tail, list(range(p, p + n)), p, pattern)], cache)[0]
        dense = torch.ones(p + n, p + n, dtype=torch.bool).tril()
        dense[p:, p:] = intra
        recompute = model.forward([Segment(0, prefix + tail, list(range(p + n)), 0, Pattern.MASK, mask=dense,
                                           logit_rows=list(range(p, p + n)))])[0]
        assert torch.allclose(cached, recompute, rtol=1e-5, atol=1e-5)


def test_quadratic_layout_cached_equals_no_cache_recompute(engine_fp32):
    from nemodiff.runtime.model.segments import first_cycle_mask, quadratic_mask

    engine = load_engine(engine_fp32, device="cpu")
    model, cfg = engine.model, engine.config.model
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, 32, torch.float32)
    prompt, k = [1, 9, 8, 7, 6, 5, 4], 3
    p = len(prompt)
    cache.add_request(0)
    cache.reserve(0, p + k)
    first = model.forward([Segment(0, prompt + [100] * k, list(range(p + k)), 0, Pattern.MASK,
                                   write_kv=[True] * p + [False] * k, mask=first_cycle_mask(p, k))], cache)[0]
    causal = model.forward([Segment(0, prompt, list(range(p)), 0, Pattern.CAUSAL)])[0]
    assert torch.allclose(first[:p], causal, rtol=1e-5, atol=1e-5)  # the masks never leak into the prompt
    cache.set_length(0, p)
    cache.reserve(0, p + k)
    drafts = [50, 51, 52]
    tokens = drafts + [100] * (k * k)
    positions = [p, p + 1, p + 2] + [p + i + 1 + j for i in range(k) for j in range(k)]
    cached = model.forward([Segment(0, tokens, positions, p, Pattern.MASK, write_kv=[True] * k + [False] * k * k,
                                    mask=quadratic_mask(k))], cache)[0]
    n = p + len(tokens)
    dense = torch.zeros(n, n, dtype=torch.bool)
    dense[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    dense[p:, :p] = True
    dense[p:, p:] = quadratic_mask(k)
    recompute = model.forward([Segment(0, prompt + tokens, list(range(p)) + positions, 0, Pattern.MASK, mask=dense,
                                       logit_rows=list(range(p, n)))])[0]
    assert torch.allclose(cached, recompute, rtol=1e-5, atol=1e-5)
    # the draft rows are exactly a causal forward over prompt + drafts
    plain = model.forward([Segment(0, prompt + drafts, list(range(p + k)), 0, Pattern.CAUSAL,
                                   logit_rows=[p, p + 1, p + 2])])[0]
    assert torch.allclose(cached[:k], plain, rtol=1e-5, atol=1e-5)
