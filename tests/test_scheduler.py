"""Scheduler: admission, chunked prefill, preemption with exact resume, cancellation, fairness."""

import pytest

from nemodiff import LLM, SamplingParams

MODES = [("ar", None), ("diffusion", 4), ("linear-spec", 4), ("quadratic-spec", 4)]


def prompts(n, length=6):
    return [[1] + [(7 * i + j) % 300 + 20 for j in range(length - 1)] for i in range(n)]


def test_admission_respects_max_num_seqs_and_fifo(engine_fp32):
    llm = LLM(engine_fp32, device="cpu", max_batch_size=3)
    engine = llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts(7)]
    engine.step()
    running = [s.request_id for s in engine.scheduler.running]
    assert running == [reqs[0].request_id, reqs[1].request_id, reqs[2].request_id]
    finish_order = []
    while engine.has_unfinished():
        finish_order += [r.request_id for r in engine.step()]
        assert len(engine.scheduler.running) <= 3
    assert finish_order == sorted(finish_order)  # equal work: first in, first out


def test_token_budget_limits_a_step_and_long_prompts_are_chunked(engine_fp32):
    llm = LLM(engine_fp32, device="cpu", max_num_batched_tokens=16)
    long_prompt = prompts(1, length=50)[0]
    short = prompts(3)
    reference = LLM(engine_fp32, device="cpu")
    want = reference.generate([long_prompt] + short, SamplingParams(max_new_tokens=10, ignore_eos=True))
    engine = llm.engine
    run, step_sizes = engine.model.run, []

    def recording_run(batch, cache):  # observe each step's size, then run the real forward
        step_sizes.append((batch.num_tokens, batch.num_segments))
        return run(batch, cache)

    engine.model.run = recording_run
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in [long_prompt] + short]
    while engine.has_unfinished():
        engine.step()
    assert step_sizes and all(tokens <= 16 for tokens, _ in step_sizes)
    seen_fill = reqs[0].num_forwards > 10  # prefill chunks count as forwards of the long request
    assert seen_fill
    assert [r.output_ids for r in reqs] == [w.output_ids for w in want]
    assert reqs[0].num_forwards > want[0].num_forward_passes  # the prompt took several chunks


@pytest.mark.parametrize("mode, block", MODES)
def test_chunked_prefill_gives_identical_output(engine_fp32, mode, block):
    long_prompt = prompts(1, length=45)[0]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, mode=mode, block_length=block)
    want = LLM(engine_fp32, device="cpu").generate(long_prompt, params)[0]
    got = LLM(engine_fp32, device="cpu", max_num_batched_tokens=20 if mode != "quadratic-spec" else 24)
    out = got.generate(long_prompt, params)[0]
    assert out.output_ids == want.output_ids
    assert out.num_forward_passes > want.num_forward_passes


@pytest.mark.parametrize("mode, block", MODES)
def test_preemption_requeues_and_resumes_exactly(engine_fp32, mode, block):
    many = prompts(6, length=9)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, mode=mode, block_length=block)
    want = LLM(engine_fp32, device="cpu").generate(many, params)
    # 4-token pages: 30 pages cannot hold six 40+-token sequences at once
    small = LLM(engine_fp32, device="cpu", num_kv_pages=30, max_batch_size=6)
    outs = small.generate(many, params)
    assert [o.output_ids for o in outs] == [w.output_ids for w in want]
    assert sum(o.stats.get("preemptions", 0) for o in outs) > 0
    assert small.cache.num_used_pages == 0


def test_newest_request_is_the_one_preempted(engine_fp32):
    llm = LLM(engine_fp32, device="cpu", num_kv_pages=24, max_batch_size=4)
    engine = llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=40, ignore_eos=True)) for p in prompts(4, 10)]
    preempted_order = []
    while engine.has_unfinished():
        before = {s.request_id: s.num_preemptions for s in engine._sequences.values()}
        engine.step()
        for rid, seq in engine._sequences.items():
            if seq.num_preemptions > before.get(rid, 0):
                running = [s.request_id for s in engine.scheduler.running]
                assert all(rid > r for r in running), "an older request was preempted while a newer one ran"
                preempted_order.append(rid)
    assert preempted_order, "the pool was meant to run dry"
    assert reqs[0].request_id not in preempted_order  # the oldest always keeps going


def test_cancellation_frees_pages_at_once(engine_fp32):
    llm = LLM(engine_fp32, device="cpu")
    engine = llm.engine
    keep = engine.add_request(prompts(1)[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
    drop = engine.add_request(prompts(2)[1], SamplingParams(max_new_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used = llm.cache.num_used_pages
    engine.abort(drop)
    assert drop.finished and drop.finish_reason == "cancelled"
    assert llm.cache.num_used_pages < used and not llm.cache.has_request(drop.request_id)
    while engine.has_unfinished():
        engine.step()
    assert keep.finish_reason == "length" and llm.cache.num_used_pages == 0


def test_request_larger_than_the_whole_cache_is_rejected(engine_fp32):
    llm = LLM(engine_fp32, device="cpu", num_kv_pages=8)
    with pytest.raises(ValueError, match="more than the whole cache"):
        llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=100))
    assert llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=3))[0].finish_reason in ("length", "eos")


def test_requests_too_big_to_share_a_step_take_turns(engine_fp32):
    """Two QuadraticSpec k = 32 requests (1056 tokens per forward each) cannot share the default token
    budget; they must alternate rather than one waiting for the other to finish."""
    llm = LLM(engine_fp32, device="cpu")
    engine = llm.engine
    budget = engine.scheduler.config.max_num_batched_tokens
    assert 1056 <= budget < 2 * 1056
    params = SamplingParams(max_new_tokens=120, ignore_eos=True, mode="quadratic-spec", block_length=32)
    first, second = (engine.add_request(p, params) for p in prompts(2))
    schedule, served = engine.scheduler.schedule, []

    def recording_schedule():
        work = schedule()
        served.append({item.sequence.request_id for item in work})
        return work

    engine.scheduler.schedule = recording_schedule
    while not (first.finished or second.finished):
        engine.step()
    for rid in (first.request_id, second.request_id):
        gaps, last = [], None
        for step, ids in enumerate(served):
            if rid in ids:
                if last is not None:
                    gaps.append(step - last)
                last = step
        assert gaps and max(gaps) <= 2, f"request {rid} waited {max(gaps)} steps between forwards"
