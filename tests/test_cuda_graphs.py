"""CUDA-graph replay logic, run on the CPU: the static, padded path a captured graph replays.

`GraphRunner(capture=False)` prepares every declared steady shape exactly as at engine start and
then runs the same static buffers eagerly instead of replaying a CUDA graph, with the kernels
under Triton's interpreter. Steps of a declared shape go through it padded to their bucket;
everything else runs eagerly, and nothing new is prepared while requests are served.
"""

import pytest

from helpers import make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.graphs import GraphRunner, declared_shapes

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


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_padded_static_replay_equals_the_reference_path(engine, mode):
    llm, runner = with_static_graphs(engine)
    prepared = set(runner.graphs)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, mode=mode, threshold=0.5)
    got = llm.generate(PROMPTS, params)  # three requests: padded to the bucket of four
    want = LLM(engine, device="cpu", kernels="off").generate(PROMPTS, params)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert runner.replays > 0  # steady steps went through the static path...
    assert sum(o.num_forward_passes for o in got) > runner.replays  # ...prefills did not
    assert set(runner.graphs) == prepared  # nothing was captured while serving


def test_only_declared_shapes_at_bounded_sizes_are_prepared(engine):
    llm, runner = with_static_graphs(engine)
    shapes = {key for key, _ in runner.graphs}
    assert shapes == set(declared_shapes(4, llm.model.has_lora))
    assert {bucket for _, bucket in runner.graphs} == {1, 2, 4}
