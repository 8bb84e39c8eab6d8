"""Automatic prefix caching (docs/design.md §10): outputs with the cache equal outputs without it.

Requests sharing a prefix of 1, 2 and many pages, a prefix that ends mid-page, a follow-up turn
whose prompt contains the previous answer (generated pages reused), in every mode on the
reference path; preemption, chunked prefill and eviction; shared pages stay untouched.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.kv_cache import KVCacheFullError, PagedKVCache
from nemodiff.runtime.model.prefix_cache import page_digests

MODES = {"ar": {}, "diffusion": {"threshold": 0.5}, "linear-spec": {}, "quadratic-spec": {"block_length": 3}}
PAGE = 4


def prompt(shared: int, tail: list[int]) -> list[int]:
    return [1] + [30 + (7 * i) % 300 for i in range(shared - 1)] + tail


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    return make_engine(checkpoint, tmp_path_factory.mktemp("prefix") / "fp32", kv_page_size=PAGE, block_length=4,
                       max_seq_len=256)


def run_turns(llm: LLM, turns: list[list[int]], params: SamplingParams):
    return [llm.generate(ids, params)[0] for ids in turns]


@pytest.mark.parametrize("mode", list(MODES))
def test_outputs_equal_with_and_without_the_cache(engine, mode):
    params = SamplingParams(max_new_tokens=9, ignore_eos=True, mode=mode, **MODES[mode])
    cached, plain = LLM(engine, device="cpu"), LLM(engine, device="cpu", prefix_cache=False)
    first = prompt(5 * PAGE, [201, 202])
    turns = [first,
             prompt(PAGE + 1, [250]),  # one shared page
             prompt(2 * PAGE + 1, [251, 252]),  # two
             prompt(5 * PAGE, [203, 204, 205]),  # many
             prompt(3 * PAGE + 2, [206])]  # shared up to mid-page: the rest of that page is recomputed
    want = run_turns(plain, turns, params)
    got = run_turns(cached, turns, params)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert [o.cached_prompt_tokens for o in got] == [0, PAGE, 2 * PAGE, 5 * PAGE, 3 * PAGE]
    # the next turn's prompt holds the previous answer: pages of generated tokens are reused too
    follow = first + got[0].output_ids + [207, 208]
    again = cached.generate(follow, params)[0]
    assert again.output_ids == plain.generate(follow, params)[0].output_ids
    assert again.cached_prompt_tokens >= (len(first) + len(got[0].output_ids) - 4) // PAGE * PAGE
    assert cached.cache.num_used_pages == 0 and cached.cache.num_cached_pages > 0
    assert again.to_dict()["stats"]["cached_prompt_tokens"] == again.cached_prompt_tokens


def test_concurrent_requests_share_pages_read_only(engine):
    llm = LLM(engine, device="cpu")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, mode="linear-spec")
    base = prompt(4 * PAGE, [211])
    llm.generate(base, params)
    cache = llm.cache
    pages = cache.match_prefix(page_digests(base, PAGE, 4))
    assert len(pages) == 4
    slots = torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])
    before = cache.k[:, slots].clone(), cache.v[:, slots].clone()
    outs = llm.generate([prompt(4 * PAGE, [212, 213]), prompt(4 * PAGE, [214])], params)
    assert [o.cached_prompt_tokens for o in outs] == [4 * PAGE, 4 * PAGE]
    assert torch.equal(cache.k[:, slots], before[0]) and torch.equal(cache.v[:, slots], before[1])
    plain = LLM(engine, device="cpu", prefix_cache=False).generate(
        [prompt(4 * PAGE, [212, 213]), prompt(4 * PAGE, [214])], params)
    assert [o.output_ids for o in outs] == [o.output_ids for o in plain]


def test_preemption_and_chunked_prefill_stay_exact(engine):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, mode="quadratic-spec", block_length=3)
    prompts = [prompt(6 * PAGE, [220 + i]) for i in range(4)]
    small = dict(num_kv_pages=22, max_batch_size=4, max_num_batched_tokens=16)  # preempts, prefills in chunks
    llm = LLM(engine, device="cpu", **small)
    got = llm.generate(prompts, params)
    want = LLM(engine, device="cpu", prefix_cache=False).generate(prompts, params)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.scheduler.prefix_hits > 0


def test_unreferenced_pages_are_evicted_least_recently_used_first():
    cache = PagedKVCache(1, 1, 4, PAGE, 6, torch.float32, prefix_cache=True)
    old, new = [1] * (2 * PAGE), [2] * (2 * PAGE)
    for rid, ids in ((0, old), (1, new)):
        cache.add_request(rid)
        cache.reserve(rid, len(ids))
        cache.set_length(rid, len(ids))
        cache.offer_pages(rid, page_digests(ids, PAGE, 2))
        cache.free(rid)  # released in this order: `old` first
    assert cache.num_used_pages == 0 and cache.num_free_pages == 6 and cache.num_cached_pages == 4
    cache.add_request(2)
    cache.reserve(2, 4 * PAGE)  # two free pages, then the two least recently released
    assert cache.match_prefix(page_digests(old, PAGE, 2)) == []
    assert len(cache.match_prefix(page_digests(new, PAGE, 2))) == 2
    with pytest.raises(KVCacheFullError):
        cache.reserve(2, 7 * PAGE)
    assert cache.prefix.evictions == 2


def test_prefix_counters_and_switching_the_cache_off(engine):
    llm = LLM(engine, device="cpu")
    ids = prompt(3 * PAGE, [230])
    llm.generate([ids, ids + [231]], SamplingParams(max_new_tokens=2))  # admitted together: no sharing yet
    llm.generate(ids + [232], SamplingParams(max_new_tokens=2))
    scheduler = llm.engine.scheduler
    assert scheduler.prefix_queries == len(ids) + 2 * (len(ids) + 1)  # prompt tokens looked up
    assert scheduler.prefix_hits == 3 * PAGE
    off = LLM(engine, device="cpu", prefix_cache=False)
    off.generate([ids, ids], SamplingParams(max_new_tokens=2))
    assert off.engine.scheduler.prefix_queries == 0 and off.cache.prefix is None


def test_outputs_equal_with_and_without_the_cache_under_the_kernel_path(checkpoint, tmp_path_factory):
    """The GPU launch path on the CPU (aot-check, an engine built for h200; its cubins come from the
    compile cache when the aot-check tests ran first): the attention kernel reads shared pages
    through the page table."""
    engine = make_engine(checkpoint, tmp_path_factory.mktemp("prefix-aot") / "h200", kv_page_size=PAGE,
                         block_length=4, max_seq_len=128, arch="h200", kernels=True)
    turns = [prompt(3 * PAGE, [201]), prompt(2 * PAGE + 2, [204])]  # two shared pages, then mid-page
    plain = LLM(engine, device="cpu", kernels="aot-check", prefix_cache=False, cuda_graphs=False)
    cached = LLM(engine, device="cpu", kernels="aot-check", cuda_graphs=False)
    for mode, extra in MODES.items():
        params = SamplingParams(max_new_tokens=4, ignore_eos=True, mode=mode, **extra)
        got = run_turns(cached, turns, params)
        assert [o.output_ids for o in got] == [o.output_ids for o in run_turns(plain, turns, params)], mode
        assert got[1].cached_prompt_tokens == 2 * PAGE, mode


def test_cache_salt_separates_tenants(engine):
    """Pages are shared only between requests with the same cache_salt; no salt is a tenant of its own."""
    import dataclasses

    llm = LLM(engine, device="cpu")
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    secret = prompt(4 * PAGE, [221])
    salted = {salt: dataclasses.replace(params, cache_salt=salt) for salt in ("alice", "bob")}
    llm.generate(secret, salted["alice"])
    guess = prompt(4 * PAGE, [222])
    assert llm.generate(guess, params)[0].cached_prompt_tokens == 0  # no salt: another tenant
    assert llm.generate(guess, salted["bob"])[0].cached_prompt_tokens == 0
    assert llm.generate(guess, salted["alice"])[0].cached_prompt_tokens == 4 * PAGE
    assert llm.generate(prompt(4 * PAGE, [223]), params)[0].cached_prompt_tokens == 4 * PAGE  # the unsalted one's
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string of at most 1024"):
        llm.generate(guess, dataclasses.replace(params, cache_salt="x" * 1025))
