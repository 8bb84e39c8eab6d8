"""Bounded soak of a real server on the bundled model: 64 concurrent mixed-mode streams, clients that
hang up mid-stream, bad requests; then `nemodiff bench --serve` against the same server, and the OpenAI
examples of docs/openai.md run as written on its OpenAI port.

checkpoint (models/nld-tiny) ──builder──▶ engine dir ──runtime──▶ Triton ──[soak clients: here]

Expected: no error for a good request, every completed output equal to `LLM.generate`, the KV pool
back to empty. The figures (requests, errors, TTFT percentiles, tokens/s) are printed.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from triton_helpers import NEMODIFF, Server

from nemodiff import LLM, SamplingParams
from nemodiff.bench.serve import PROMPTS, stream_request, summarize
from nemodiff.builder.build import BuildOptions, build_engine
from nemodiff.serving.openai.backend import TritonBackend

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "nld-tiny"
MODES = {"ar": None, "diffusion": 8, "linear-spec": 8, "quadratic-spec": 8}
CLIENTS = 64
ROUNDS = 2
MAX_TOKENS = 32
# Half the requests open with the same story (several KV pages of 16 tokens): the prefix cache serves them
PREAMBLE = ("Once upon a time there was a little fox named Max. Max lived in a valley near the mountain. "
            "Max had a black book. Every morning Max took the black book to the mountain. ")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "engine"
    build_engine(BUNDLED, out, BuildOptions(dtype="fp32", kernels=False, kv_page_size=16))
    return out


def case(i: int) -> tuple[str, str, dict]:
    mode = list(MODES)[i % len(MODES)]
    prompt = PROMPTS[(i // len(MODES)) % len(PROMPTS)]
    if i % 2:
        prompt = PREAMBLE + prompt
    fields = {"text_input": prompt, "max_tokens": MAX_TOKENS, "decode_mode": mode}
    if MODES[mode]:
        fields["block_length"] = MODES[mode]
    return prompt, mode, fields


async def soak(server) -> tuple[list, list, list, float]:
    backend = TritonBackend(server.grpc, "nemodiff")
    good, hung_up, bad = [], [], []

    async def client(c: int) -> None:
        for r in range(ROUNDS):
            i = c * ROUNDS + r
            _, _, fields = case(i)
            if i % 9 == 4:  # a client that goes away after a few tokens
                hung_up.append(await stream_request(backend, fields, stop_after_tokens=3))
            else:
                good.append((i, await stream_request(backend, fields)))
        if c % 16 == 0:
            bad.append(await stream_request(backend, {"text_input": "hi", "max_tokens": 4, "decode_mode": "bogus"}))

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return good, hung_up, bad, time.perf_counter() - start


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    served = Server(engine_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--max-batch-size", "32",
                    "--max-queue", "256", openai=True).start()
    yield served
    assert served.stop() == 0, served.log()[-3000:]  # SIGINT after 64 clients, some of which hung up mid-stream
    assert "HandleCancellation" not in served.log() and "Segfault" not in served.log()


def test_soak_64_concurrent_streams(server, engine_dir, tmp_path):
    good, hung_up, bad, seconds = asyncio.run(soak(server))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics["nemodiff_kv_cache_pages_used"] == 0 and metrics["nemodiff_requests_in_flight"] == 0:
            break
        time.sleep(0.1)
    bench = subprocess.run([str(NEMODIFF), "bench", "--serve", f"grpc://{server.grpc}", "--concurrency", "1,8",
                            "--duration", "2", "--max-new-tokens", "16", "--json", str(tmp_path / "bench.json"),
                            "--plot", str(tmp_path / "bench.png")],
                           capture_output=True, text=True, timeout=120)
    llm = LLM(engine_dir, device="cpu")
    unique = sorted({case(i)[:2] for i, _ in good})
    outputs = llm.generate([p for p, _ in unique], [SamplingParams(max_new_tokens=MAX_TOKENS, mode=m,
                                                                   block_length=MODES[m]) for _, m in unique])
    want = dict(zip(unique, outputs))
    errors = [r.error for _, r in good if not r.ok]
    assert errors == []
    for i, result in good:
        assert result.text == want[case(i)[:2]].text, case(i)
    assert all(r.status == 400 and "unknown decode mode" in r.error for r in bad) and bad
    assert hung_up and all(not r.ok and r.error is None for r in hung_up)
    assert metrics["nemodiff_kv_cache_pages_used"] == 0 and metrics["nemodiff_requests_in_flight"] == 0
    figures = summarize([r for _, r in good], seconds)
    queries, hits = metrics["nemodiff_prefix_cache_queries_total"], metrics["nemodiff_prefix_cache_hits_total"]
    assert queries > 0 and 0 < hits <= queries
    print(f"\nsoak: {len(good)} good requests, {len(errors)} errors, {len(hung_up)} clients hung up, {len(bad)} bad "
          f"requests refused; TTFT p50 {figures['ttft_ms']['p50']} ms, p99 {figures['ttft_ms']['p99']} ms; "
          f"{figures['tokens_per_s']} tokens/s over {seconds:.1f} s; prefix cache: {hits:.0f} of {queries:.0f} "
          f"prompt tokens hit ({100 * hits / queries:.0f} %)")
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert [r["concurrency"] for r in rows] == [1, 8]
    assert all(r["completed"] > 0 and r["errors"] == 0 and r["ttft_ms"]["p50"] is not None for r in rows)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --serve --plot draws
    print(bench.stdout)


def run_python_blocks(page: str, url: str) -> dict:
    """A page's python blocks, in order, in one namespace, with the docs' server URL replaced by `url`."""
    text = (Path(__file__).resolve().parent.parent / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks and "http://localhost:9000/v1" in blocks[0], page
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("http://localhost:9000/v1", url), page, "exec"), namespace)
    return namespace


def test_the_openai_examples_of_the_docs_run_as_written(server, capsys):
    """The README's and docs/openai.md's python blocks against this server on the bundled model: each runs, and
    the structured-output example prints JSON of its schema, the tool call arguments that parse."""
    assert run_python_blocks("README.md", server.openai_url)["reply"].choices[0].text
    capsys.readouterr()
    namespace = run_python_blocks("docs/openai.md", server.openai_url)
    printed = capsys.readouterr().out
    objects = re.findall(r'\{"city": ?"[^"]*"\}', printed)  # the json_schema reply, then the call's arguments
    assert len(objects) == 2 and all(len(json.loads(o)["city"]) <= 16 for o in objects), printed
    call = namespace["call"]
    assert call.function.name == "get_weather" and namespace["reply"].choices[0].finish_reason == "tool_calls"
    assert "city" in json.loads(call.function.arguments)
