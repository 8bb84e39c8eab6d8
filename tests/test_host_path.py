"""The engine's host path: one device-to-host transfer per step whatever the number of requests,
and decisions that never mix devices (the strategies run here on logits that live on `meta`)."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from nemodiff import LLM, SamplingParams
from nemodiff.runtime.decoding.decision_pass import Decider

HOST_TRANSFERS = {"item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__", "__iter__",
                  "unbind"}
MODES = [("ar", {}), ("diffusion", {"block_length": 8}), ("linear-spec", {"block_length": 8}),
         ("quadratic-spec", {"block_length": 4})]


class CountHostTransfers(TorchFunctionMode):
    """Counts every tensor operation that brings values to the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_TRANSFERS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def transfers_per_step(engine_dir, mode, extra, requests, temperature):
    llm = LLM(engine_dir, device="cpu", max_batch_size=32)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True, mode=mode, temperature=temperature, seed=3,
                            **extra)
    for i in range(requests):
        llm.engine.add_request([1, 40 + i, 41, 42, 43], params)
    for _ in range(4):  # past the prefills: every request is in its decode loop
        llm.engine.step()
    counts = []
    for _ in range(6):
        with CountHostTransfers() as counter:
            llm.engine.step()
        counts.append(sum(counter.calls.values()))
    return counts


@pytest.mark.parametrize("mode, extra", MODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_host_transfers_do_not_grow_with_the_number_of_requests(engine_fp32, mode, extra, temperature):
    one = transfers_per_step(engine_fp32, mode, extra, 1, temperature)
    many = transfers_per_step(engine_fp32, mode, extra, 12, temperature)
    assert one == many, f"{mode}: host transfers per step grow with the batch: {one} vs {many}"
    # a small constant: the builder's two staging views, the decisions' one copy and, on the CPU only,
    # zero-copy numpy views for the row argmax (on a GPU those are device reductions)
    assert max(many) <= 5


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decisions_stay_on_the_logits_device(engine_fp32, temperature):
    """Every kind of decision, for every mode and phase, computed on `meta` logits: any tensor a
    strategy or the decider made on another device (a CPU generator's noise, draft distributions
    kept on the host) would raise a device-mismatch error here."""
    llm = LLM(engine_fp32, device="cpu")
    vocab = llm.config.model.vocab_size
    params = {mode: SamplingParams(max_new_tokens=50, temperature=temperature, top_k=5, top_p=0.9, mode=mode, **extra)
              for mode, extra in MODES}
    params["diffusion-none"] = SamplingParams(max_new_tokens=50, temperature=temperature, mode="diffusion",
                                              threshold=None, block_length=8)
    strategies = {}
    for name, p in params.items():
        request = llm.engine.add_request([1, 50, 51, 52], p)
        strategies[name] = llm.engine._sequences[request.request_id].strategy
    phases = [("ar", None), ("diffusion", "prefill"), ("diffusion", "denoise"), ("diffusion-none", "denoise"),
              ("diffusion", "commit"), ("linear-spec", "prefill"), ("linear-spec", "draft"),
              ("linear-spec", "verify"), ("quadratic-spec", "first"), ("quadratic-spec", "cycle")]
    decider = Decider(torch.device("meta"), llm.config.model.mask_token_id)
    for name, phase in phases:
        strategy = strategies[name]
        if phase in ("denoise", "commit"):
            strategy._new_block(50)  # every position after the seed masked
            strategy.steps = strategy.B - 1  # the last step also picks the best non-mask candidates
        if name == "linear-spec" and phase in ("draft", "verify"):
            strategy._start_cycle(50)
        if phase is not None:
            strategy.phase = phase
        segment = strategy.next_segment()
        decider.begin()
        strategy.register(decider, 0, 0)
        rows = len(segment.rows())
        logits = torch.empty(rows, vocab, device="meta")
        ids = torch.empty(len(segment), dtype=torch.int64, device="meta")
        decider.run(logits, ids)
        assert decider._packed.device.type == "meta"
        if strategy.draft_probs is not None:
            assert strategy.draft_probs.device.type == "meta"


@pytest.mark.parametrize("mode, extra", MODES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_logits_fail_only_their_request(engine_fp32, mode, extra, poison):
    """One request's logits turn non-finite in one element of one row: it ends with a numerical
    error, and the requests sharing its steps finish exactly as they do without it."""
    llm = LLM(engine_fp32, device="cpu", max_batch_size=8)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, mode=mode, **extra)
    prompts = [[1, 40 + i, 41, 42, 43] for i in range(3)]
    want = [out.output_ids for out in llm.generate(prompts, params)]
    requests = [llm.engine.add_request(prompt, params) for prompt in prompts]
    victim, forward, steps = requests[1], llm.model._run, [0]

    def poisoned(batch, cache, meta):
        logits = forward(batch, cache, meta)
        steps[0] += 1
        if steps[0] == 4:  # every request is decoding: its segment has logit rows
            segment = batch.table_rows.index(llm.cache.row(victim.request_id))
            logits[sum(batch.logit_counts[:segment]), 7] = poison
        return logits

    llm.model._run = poisoned
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert victim.finish_reason == "error" and "non-finite logits" in victim.error
    assert [requests[0].output_ids, requests[2].output_ids] == [want[0], want[2]]


def test_positions_from_offsets_match_explicit_positions():
    """Segments that keep position offsets (steady QuadraticSpec) are packed with the positions and
    KV slots explicit segments would give: alone, all alike, or mixed with others."""
    from nemodiff.runtime.model.batch import BatchBuilder
    from nemodiff.runtime.model.kv_cache import PagedKVCache
    from nemodiff.runtime.model.segments import Pattern, Segment

    offsets = np.array([0, 1, 2, 1, 2, 3])
    writes = np.array([True, True, True, False, False, False])
    for array in (offsets, writes):
        array.flags.writeable = False

    def segment(rid: int, prefix: int, relative: bool) -> Segment:
        positions = None if relative else offsets + prefix
        return Segment(rid, np.zeros(6, dtype=np.int64), positions, prefix, Pattern.FULL, write_kv=writes,
                       position_offsets=offsets if relative else None)

    cache = PagedKVCache(1, 1, 4, 4, 32, torch.float32)
    for rid in range(3):
        cache.add_request(rid)
        cache.reserve(rid, 24)
    builder = BatchBuilder(torch.device("cpu"))
    for prefixes, kinds in [((0,), "r"), ((3, 10, 7), "rrr"), ((3, 10, 7), "rer"), ((5, 2), "er")]:
        batch = builder.build([segment(rid, p, k == "r") for rid, (p, k) in enumerate(zip(prefixes, kinds))], cache)
        same = builder.build([segment(rid, p, False) for rid, p in enumerate(prefixes)], cache)
        assert batch.positions.tolist() == np.concatenate([offsets + p for p in prefixes]).tolist()
        assert batch.token_slots.tolist() == same.token_slots.tolist()
        assert batch.write_slots.tolist() == same.write_slots.tolist()
    with pytest.raises(ValueError, match="positions or position offsets"):
        Segment(0, [1, 2], None, 0)
    assert segment(0, 4, True).write_end() == 7
