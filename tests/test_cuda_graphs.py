"""CUDA-graph planning, run on the CPU: which shapes, buckets and split classes are prepared.

`GraphRunner(capture=False)` prepares every declared steady shape exactly as at engine start and
runs the same static buffers eagerly instead of replaying a CUDA graph. The padded replay of every
mode, against the reference path, is in tests/test_aot_check.py (the GPU path run on the CPU).
"""

import pytest

from helpers import make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.graphs import GraphRunner, declared_shapes
from nemodiff.runtime.model.kv_cache import KVCacheFullError

PROMPTS = [[1, 200, 201, 202], [1, 150, 151, 152, 153], [1, 30, 31]]


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    return make_engine(checkpoint, tmp_path_factory.mktemp("graphs") / "fp32", kv_page_size=4, block_length=4,
                       max_seq_len=256)


def with_static_graphs(engine):
    llm = LLM(engine, device="cpu", kernels="interpret", max_batch_size=4)
    runner = GraphRunner(llm.model, llm.cache, llm.config.build.max_seq_len, buckets=(1, 2, 4), capture=False)
    runner.capture_steady_shapes(declared_shapes(llm.config.build.block_length, llm.model.has_lora))
    llm.model.graphs = runner
    return llm, runner


def test_only_declared_shapes_at_bounded_sizes_are_prepared(engine):
    llm, runner = with_static_graphs(engine)
    shapes = {key for key, _, _ in runner.graphs}
    assert shapes == set(declared_shapes(4, llm.model.has_lora))
    assert {bucket for _, bucket, _ in runner.graphs} == {1, 2, 4}
    splits = {s for _, _, s in runner.graphs}
    assert 1 in splits and all(s & (s - 1) == 0 for s in splits)  # split-KV classes: powers of two


def test_a_growing_cache_never_recaptures(engine):
    """The page table is sized once at its maximum: steps that add requests and pages reuse the graphs
    prepared at start, and a request beyond the table's rows is refused instead of growing it."""
    llm, runner = with_static_graphs(engine)
    cache, table, prepared = llm.cache, llm.cache.block_tables, runner.captures
    assert prepared == len(runner.graphs) > 0
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    llm.generate(PROMPTS[:1], params)
    got = llm.generate(PROMPTS, params)  # more requests and pages than any step before
    assert runner.replays > 0 and runner.captures == prepared and cache.block_tables is table
    assert [o.output_ids for o in got] == \
        [o.output_ids for o in LLM(engine, device="cpu", kernels="off").generate(PROMPTS, params)]
    assert cache.tables_host.shape[0] == cache.max_requests + 1
    ids = range(10_000, 10_000 + cache.max_requests)
    for rid in ids:
        cache.add_request(rid)
    with pytest.raises(KVCacheFullError, match=rf"page table full: {cache.max_requests} requests .*max_requests"):
        cache.add_request(99_999)
    for rid in ids:
        cache.free(rid)
    assert cache.block_tables is table and runner.captures == prepared
