"""Beyond one engine under Triton: a tensor-parallel engine and two replicas, with a real tritonserver.

checkpoint (models/nld-tiny) ──builder──▶ engine dir ──runtime──▶ [Triton: `nemodiff serve --tp 2`,
`nemodiff serve --instances 2`, driven here]

Outputs are checked token for token against a single-rank `LLM` in this process.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from triton_helpers import Server, ids_of

from nemodiff import LLM, SamplingParams
from nemodiff.builder.build import BuildOptions, build_engine
from nemodiff.serving.cli import instance_groups

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import default_corpus  # noqa: E402

MODES = [("ar", None), ("diffusion", None), ("linear-spec", None), ("quadratic-spec", 4)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model = ROOT / "models" / "nld-tiny"
    built = {}
    for tp in (1, 2):
        built[tp] = root / f"tp{tp}"
        build_engine(model, built[tp], BuildOptions(dtype="fp32", max_seq_len=256, tp=tp, kv_page_size=8))
    return built


@pytest.fixture(scope="module")
def reference(engines):
    return LLM(engines[1], device="cpu")


def want(llm: LLM, prompt: str, mode: str, block: int | None, max_tokens: int):
    params = SamplingParams(max_new_tokens=max_tokens, mode=mode, block_length=block)
    return llm.generate(prompt, params)[0]


def payload(prompt: str, mode: str, block: int | None, max_tokens: int) -> dict:
    body = {"text_input": prompt, "max_tokens": max_tokens, "decode_mode": mode}
    return body | ({"block_length": block} if block else {})


def test_instance_groups_place_one_engine_per_gpu_group():
    assert instance_groups("gpu", 1, [0, 1, 2, 3], 1) == (
        "{ count: 1, kind: KIND_GPU, gpus: [ 0 ] }, { count: 1, kind: KIND_GPU, gpus: [ 1 ] }, "
        "{ count: 1, kind: KIND_GPU, gpus: [ 2 ] }, { count: 1, kind: KIND_GPU, gpus: [ 3 ] }", "0;1;2;3")
    assert instance_groups("gpu", 2, [0, 1, 2, 3], 1) == (
        "{ count: 1, kind: KIND_GPU, gpus: [ 0 ] }, { count: 1, kind: KIND_GPU, gpus: [ 2 ] }", "0,1;2,3")
    assert instance_groups("cpu", 1, None, 2) == ("{ count: 2, kind: KIND_CPU }", "")
    with pytest.raises(ValueError, match="3 GPUs, not a multiple of --tp 2"):
        instance_groups("gpu", 2, [0, 1, 2], 1)
    with pytest.raises(ValueError, match="distinct"):
        instance_groups("gpu", 1, [0, 0], 1)


def test_serve_tp2_gives_exact_outputs(engines, reference, tmp_path):
    server = Server(engines[2], tmp_path / "serve.log", "--tp", "2").start(timeout=240)
    try:
        prompts = default_corpus.held_out_prompts()[:4]
        for i, (mode, block) in enumerate(MODES):
            prompt = prompts[i % len(prompts)]
            status, body = server.generate(payload(prompt, mode, block, 24))
            assert status == 200, body
            expected = want(reference, prompt, mode, block, 24)
            assert ids_of(body["output_ids"]) == expected.output_ids, mode
            assert body["text_output"] == expected.text
        status, events = server.generate_stream(payload(prompts[0], "linear-spec", None, 24) | {"stream": True})
        assert status == 200
        assert "".join(e["text_output"] for e in events) == want(reference, prompts[0], "linear-spec", None, 24).text
        assert "tp 2" in server.log()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert "server stopped" in server.log()


def test_two_instances_both_serve_exact_outputs(engines, reference, tmp_path):
    server = Server(engines[1], tmp_path / "serve.log", "--instances", "2").start(timeout=240)
    try:
        prompts = default_corpus.held_out_prompts()
        jobs = [(prompts[i % len(prompts)], *MODES[i % len(MODES)]) for i in range(24)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda job: server.generate(payload(job[0], job[1], job[2], 16)), jobs))
        for (prompt, mode, block), (status, body) in zip(jobs, replies):
            assert status == 200, body
            assert ids_of(body["output_ids"]) == want(reference, prompt, mode, block, 16).output_ids
        by_instance = server.metrics_by_instance()
        served = {name: sum(v for k, v in series.items() if k.startswith("nemodiff_output_tokens_total"))
                  for name, series in by_instance.items()}
        assert len(served) == 2 and all(count > 0 for count in served.values()), served
        totals = server.metrics()
        assert sum(v for k, v in totals.items() if k.startswith("nemodiff_output_tokens_total")) == \
            sum(served.values())
    finally:
        assert server.stop() == 0, server.log()[-3000:]
