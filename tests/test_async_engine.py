"""The thread-safe serving API: streams, callbacks, async iteration, cancellation, errors."""

import asyncio
import json
import threading
import time

import pytest

from nemodiff import LLM, SamplingParams
from nemodiff.runtime.decoding.guide_limits import GuideLimits
from nemodiff.runtime.llm import EngineInUseError
from nemodiff.runtime.request import Guide
from nemodiff.serving.async_engine import AsyncEngine


@pytest.fixture()
def server(engine_fp32):
    srv = AsyncEngine(LLM(engine_fp32, device="cpu"))
    yield srv
    srv.shutdown()


def reference(engine_fp32, prompt, params):
    return LLM(engine_fp32, device="cpu").generate(prompt, params)[0]


def test_stream_deltas_concatenate_to_the_final_text(server, engine_fp32):
    for mode in ("ar", "diffusion", "linear-spec", "quadratic-spec"):
        params = SamplingParams(max_new_tokens=17, ignore_eos=True, mode=mode, block_length=4)
        updates = list(server.stream([1, 40, 41, 42], params, timeout=60))
        want = reference(engine_fp32, [1, 40, 41, 42], params)
        assert updates[-1].finished and updates[-1].output.output_ids == want.output_ids
        assert "".join(u.text_delta for u in updates) == want.text
        assert [t for u in updates for t in u.token_ids] == want.output_ids
        assert len(updates) > 1


def test_stop_string_never_leaks_into_the_stream(server, engine_fp32):
    free = reference(engine_fp32, [1, 40, 41, 42], SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = free.text[5:8]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop])
    updates = list(server.stream([1, 40, 41, 42], params, timeout=60))
    assert "".join(u.text_delta for u in updates) == free.text[: free.text.index(stop)]
    assert updates[-1].finish_reason == "stop"


def test_concurrent_threads_and_async_iteration(server, engine_fp32):
    jobs = [([1, 50 + i, 60 + i], SamplingParams(max_new_tokens=9 + i, ignore_eos=True,
                                                  mode=["ar", "linear-spec", "quadratic-spec", "diffusion"][i % 4],
                                                  block_length=4)) for i in range(8)]
    results = [None] * len(jobs)

    def run(i):
        results[i] = server.generate(*jobs[i], timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (prompt, params), got in zip(jobs, results):
        assert got.output.output_ids == reference(engine_fp32, prompt, params).output_ids

    async def collect():
        return [u async for u in server.astream(*jobs[1])]

    updates = asyncio.run(collect())
    assert updates[-1].output.output_ids == results[1].output.output_ids


def test_bad_request_fails_alone(server):
    bad = server.generate([1, 2, 3], SamplingParams(max_new_tokens=0), timeout=30)
    assert bad.finished and bad.finish_reason == "error" and "max_new_tokens must be at least 1" in bad.error
    good = server.generate([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True), timeout=30)
    assert good.error is None and len(good.output.output_ids) == 3


def test_cancellation_by_call_and_by_hook_frees_pages(server):
    updates, done = [], threading.Event()

    def on_update(update):
        updates.append(update)
        if update.finished:
            done.set()

    handle = server.submit([1, 2, 3], SamplingParams(max_new_tokens=2000, ignore_eos=True), on_update)
    while not updates:
        time.sleep(0.01)
    server.cancel(handle)
    assert done.wait(30) and updates[-1].finish_reason == "cancelled"

    flag, done2 = threading.Event(), threading.Event()
    server.submit([1, 5, 6], SamplingParams(max_new_tokens=2000, ignore_eos=True),
                  lambda u: done2.set() if u.finished else flag.set(), is_cancelled=flag.is_set)
    assert done2.wait(30)
    deadline = time.time() + 10
    while server.metrics()["kv_cache_pages_used"] and time.time() < deadline:
        time.sleep(0.01)
    metrics = server.metrics()
    assert metrics["kv_cache_pages_used"] == 0 and metrics["requests_running"] == 0


def test_one_driver_at_a_time(engine_fp32):
    """While an AsyncEngine steps the engine, LLM.generate refuses (two threads stepping one engine would
    interleave their steps and every token would come out twice); after shutdown it works again."""
    llm = LLM(engine_fp32, device="cpu")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = llm.generate([1, 40, 41], params)[0]
    server = AsyncEngine(llm)
    try:
        with pytest.raises(EngineInUseError, match="driven by an AsyncEngine"):
            llm.generate([1, 40, 41], params)
        with pytest.raises(EngineInUseError):
            AsyncEngine(llm)  # a second driver is refused as well
        got = server.generate([1, 40, 41], params, timeout=60)
        assert got.output.output_ids == want.output_ids
    finally:
        server.shutdown()
    assert llm.generate([1, 40, 41], params)[0].output_ids == want.output_ids


def schema(properties: int) -> str:
    """A JSON schema of one object with this many optional integer properties."""
    return json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(properties)}})


@pytest.mark.parametrize("guide, limit", [
    (Guide("json_schema", schema(10_000)), "an object of its schema has 10000 properties; the limit is 1024 "
                                           "(max_properties)"),
    (Guide("json_schema", json.dumps({"type": "object", "properties": {"a": json.loads(schema(300)), "b": json.loads(
        schema(300))}})), "more than 512 optional properties; the limit is 512 (max_optional_properties)"),
    (Guide("choice", choices=tuple(f"c{i}" for i in range(100_000))), "it has 100000 choices; the limit is 4096"),
    (Guide("json_schema", json.dumps({"anyOf": [{"const": i} for i in range(5000)]})), "an anyOf of its schema has "
                                                                                       "5000 entries"),
    (Guide("ebnf_grammar", "\n".join(f'r{i}::=r' for i in range(2500))), "2500 rules; the limit is 2048"),
    (Guide("regex", "a" * 40_000), "its text has 40000 bytes; the limit is 32768 (max_text_bytes)"),
    (Guide("json_schema", json.dumps({"description": "x" * 2**20})), "the limit is 1048576 (max_schema_bytes)"),
])
def test_a_guide_over_a_size_limit_is_refused_before_any_compile(server, guide, limit):
    started = time.monotonic()
    got = server.generate([1, 2, 3], SamplingParams(max_new_tokens=3, guide=guide), timeout=30)
    assert got.error_kind == "invalid" and got.error.startswith("the guide is too large to compile") and limit in got.error
    assert time.monotonic() - started < 2 and server.engine.cached_grammar(guide) is None


def test_a_slow_grammar_compiles_beside_the_loop(engine_fp32):
    """A guide whose grammar takes seconds to compile stalls nobody: three plain requests each finish in under
    3 s meanwhile; the guided requests waiting for it are answered by their hang-up, their deadline and the
    compile time limit (a 400 naming it), whichever comes first. The compile is xgrammar's real one, held back
    by 2 s first: how long a schema takes to compile depends on the machine and its load."""
    llm = LLM(engine_fp32, device="cpu")
    llm.engine.guide_limits = GuideLimits(max_properties=2000, max_optional_properties=2000, compile_timeout_s=0.5)
    grammars = llm.engine.grammars()
    compile_now = grammars.compile
    grammars.compile = lambda guide: time.sleep(2.0) or compile_now(guide)
    server = AsyncEngine(llm)
    try:
        guided = SamplingParams(max_new_tokens=3, guide=Guide("json_schema", schema(800)))
        finals, gone = {}, threading.Event()
        for name, hook, timeout in (("limit", None, None), ("hang-up", gone.is_set, None), ("deadline", None, 0.25)):
            server.submit([1, 2, 3], guided, lambda u, n=name: finals.setdefault(n, u) if u.finished else None,
                          is_cancelled=hook, timeout_s=timeout)
        time.sleep(0.1)
        gone.set()
        for i in range(3):
            started = time.monotonic()
            plain = server.generate([1, 40 + i], SamplingParams(max_new_tokens=4, ignore_eos=True), timeout=30)
            assert plain.error is None and time.monotonic() - started < 3.0
        deadline = time.monotonic() + 30
        while len(finals) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert finals["hang-up"].finish_reason == "cancelled"
        assert finals["deadline"].error_kind == "timeout" and "0.25 s deadline" in finals["deadline"].error
        assert finals["limit"].error_kind == "invalid" and "did not compile within the 0.5 s limit" in finals["limit"].error
        assert server.metrics()["requests_in_flight"] == 0
        assert server._compiles.wait_idle(120)  # the abandoned compile ends (and stops taking a core) here
    finally:
        server.shutdown()
