"""nemodiff behind NVIDIA Dynamo: the real frontend (KV router, file discovery) and two `nemodiff worker`s.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: `nemodiff worker` ×2 ▶ Dynamo's frontend] ──▶ HTTP clients

One cluster for the module, on loopback: `python -m dynamo.frontend --discovery-backend file --router-mode
kv` (DYN_FILE_KV in a tmp folder) and two workers on the bundled model. Texts at temperature 0 must
equal `LLM.generate` (what `nemodiff generate` prints); the last test kills one worker and stops the other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dynamo.common.backend  # noqa: F401  (make install brings Dynamo: without it this module fails, not skips)
import pytest

from nemodiff.serving.cli import free_ports

ROOT = Path(__file__).resolve().parents[1]
MODEL = "nld-tiny"
LOOPBACK = {name: "127.0.0.1" for name in ("DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST", "DYN_TCP_RESPONSE_STREAM_HOST",
                                           "DYN_SYSTEM_HOST")}
LONG = " ".join(["Mia and Noah went to the park to play with a red ball."] * 6)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.engine = root / "engine"
        subprocess.run([sys.executable, "-m", "nemodiff.builder.cli", str(ROOT / "models" / "nld-tiny"), "-o",
                        str(self.engine), "--dtype", "fp32", "--arch", "cpu"], check=True, capture_output=True)
        self.http_port, *self.metrics_ports = free_ports(3)
        self.env = dict(os.environ, DYN_FILE_KV=str(root / "kv"), PYTHONPATH=str(ROOT),
                        DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0", **LOOPBACK)
        self.frontend = self._start("frontend", "-m", "dynamo.frontend", "--discovery-backend", "file",
                                    "--router-mode", "kv", "--http-host", "127.0.0.1", "--http-port",
                                    str(self.http_port), "--migration-limit", "3")
        self.workers = [self._start(f"worker{i}", "-m", "nemodiff.cli", "worker", str(self.engine),
                                    "--discovery-backend", "file", "--served-model-name", MODEL,
                                    "--metrics-port", str(port), "--card-dir", str(root / "cards")) for i, port in enumerate(self.metrics_ports)]

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in [("frontend", self.frontend)] + [(f"worker{i}", w) for i, w in enumerate(self.workers)]:
                assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log(name)}"
            instances = list((self.root / "kv").rglob("*generate*"))
            try:
                listed = [m["id"] for m in get(self.url("/v1/models"))["data"]]
                if MODEL in listed and len({p.name for p in instances if "instances" in p.parts}) >= 2 and all(
                        metric(port, "nemodiff_engine_healthy") == 1 for port in self.metrics_ports):
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the cluster did not come up:\n{self.log('frontend')}\n{self.log('worker0')}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def stop(self) -> None:
        for process in [*self.workers, self.frontend]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    found = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.M)
    assert found, f"{name}{selector} not in the worker's metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("dynamo"))
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def reference(cluster):
    """`nemodiff generate` in-process: what the texts through Dynamo must equal."""
    from nemodiff import LLM, SamplingParams

    with LLM(cluster.engine, device="cpu") as llm:
        def generate(prompt: str, mode: str = "ar", chat: bool = False, max_new_tokens: int = 16) -> str:
            params = SamplingParams(max_new_tokens=max_new_tokens, mode=mode)
            return llm.generate([prompt], params, chat=chat)[0].text
        yield generate


def completion(cluster, prompt: str, mode: str | None = None, **fields) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0} | fields
    if mode is not None:
        body["nvext"] = {"annotations": [f"decode_mode:{mode}"]}
    return post(cluster.url("/v1/completions"), body)


def test_models_lists_the_model_and_texts_equal_nemodiff_generate(cluster, reference):
    assert MODEL in [m["id"] for m in get(cluster.url("/v1/models"))["data"]]
    prompt = "Once upon a time"
    assert completion(cluster, prompt)["choices"][0]["text"] == reference(prompt)
    chat = post(cluster.url("/v1/chat/completions"), {"model": MODEL, "max_tokens": 16, "temperature": 0,
                                                       "messages": [{"role": "user", "content": "Say hello"}]})
    assert chat["choices"][0]["message"]["content"] == reference("Say hello", chat=True)


def test_each_decode_mode_per_request_through_the_annotation(cluster, reference):
    prompt = "One, two, three,"
    ar, diffusion = reference(prompt), reference(prompt, mode="diffusion")
    for mode, want in (("ar", ar), ("linear-spec", ar), ("quadratic-spec", ar), ("diffusion", diffusion)):
        before = sum(metric(p, "nemodiff_forward_passes_total", mode=mode) for p in cluster.metrics_ports)
        assert completion(cluster, prompt, mode)["choices"][0]["text"] == want, mode
        after = sum(metric(p, "nemodiff_forward_passes_total", mode=mode) for p in cluster.metrics_ports)
        assert after > before, f"no {mode} forward counted"


def test_streaming_gives_several_chunks(cluster, reference):
    body = {"model": MODEL, "prompt": "The cat sat on the", "max_tokens": 16, "temperature": 0, "stream": True}
    request = urllib.request.Request(cluster.url("/v1/completions"), json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    pieces = []
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += [c["text"] for c in json.loads(line[6:]).get("choices", [])]
    assert len([p for p in pieces if p]) >= 3
    assert "".join(pieces) == reference("The cat sat on the")


def test_fields_reach_the_engine_or_are_refused_by_name(cluster, reference):
    with pytest.raises(urllib.error.HTTPError) as refused:
        completion(cluster, "Hello", frequency_penalty=0.5)
    assert refused.value.code == 400 and "frequency_penalty" in refused.value.read().decode()
    (choice,) = completion(cluster, "Once upon a time", max_tokens=3, logprobs=2)["choices"]
    assert choice["text"] == reference("Once upon a time", max_new_tokens=3)  # still serving
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == 3 and all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert completion(cluster, "Answer:", guided_choice=["yes", "no"])["choices"][0]["text"] in ("yes", "no")
    assert completion(cluster, "Once upon a time", min_tokens=12, ignore_eos=True)["usage"]["completion_tokens"] == 16


def test_a_repeated_long_prompt_is_served_from_one_workers_prefix_cache(cluster):
    before = [metric(p, "nemodiff_prefix_cache_hits_total") for p in cluster.metrics_ports]
    usage = [completion(cluster, LONG, max_tokens=4)["usage"] for _ in range(4)]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    gained = [metric(p, "nemodiff_prefix_cache_hits_total") - b for p, b in zip(cluster.metrics_ports, before)]
    full_pages = (usage[0]["prompt_tokens"] - 1) // 16 * 16  # a prompt keeps its last token to compute
    assert full_pages >= 64 and cached == [0] + [full_pages] * 3, (usage[0]["prompt_tokens"], cached)
    assert sorted(gained) == [0, sum(cached)], gained  # every hit on the one worker that holds the prefix


def test_bench_serve_loads_dynamos_frontend(cluster):
    from click.testing import CliRunner

    from nemodiff.cli import main

    out = CliRunner().invoke(main, ["bench", "--serve", cluster.url(""), "--concurrency", "2", "--duration", "1.5",
                                    "--modes", "ar,diffusion", "--max-new-tokens", "8", "--json", "-"])
    assert out.exit_code == 0, out.output
    (level,) = json.loads(out.output[out.output.index("{"):])["levels"]
    assert level["completed"] >= 2 and level["errors"] == level["refused"] == 0, level
    assert level["output_tokens"] >= 8 * level["completed"] and level["ttft_ms"]["p50"] > 0


def in_flight(cluster) -> float:
    return sum(metric(p, "nemodiff_requests_in_flight") for p in cluster.metrics_ports)


def test_a_client_hang_up_frees_the_workers_pages(cluster):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    request = urllib.request.Request(cluster.url("/v1/completions"), json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    tokens_before = sum(metric(p, "nemodiff_output_tokens_total", mode="ar") for p in cluster.metrics_ports)
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()  # the first chunk: the request runs on a worker
    assert in_flight(cluster) == 1
    response.close()
    deadline = time.monotonic() + 10
    while in_flight(cluster) or sum(metric(p, "nemodiff_kv_cache_pages_used") for p in cluster.metrics_ports):
        assert time.monotonic() < deadline, "the cancelled request still holds pages"
        time.sleep(0.1)
    generated = sum(metric(p, "nemodiff_output_tokens_total", mode="ar") for p in cluster.metrics_ports) - tokens_before
    assert generated < 900


def test_a_killed_worker_costs_no_request_and_sigterm_exits_zero(cluster):
    before = [metric(p, "nemodiff_prefix_cache_hits_total") for p in cluster.metrics_ports]
    completion(cluster, LONG, max_tokens=2)
    completion(cluster, LONG, max_tokens=2)
    gained = [metric(p, "nemodiff_prefix_cache_hits_total") - b for p, b in zip(cluster.metrics_ports, before)]
    holder = gained.index(max(gained))  # the router sends the prompt here: kill it
    cluster.workers[holder].send_signal(signal.SIGKILL)
    cluster.workers[holder].wait(10)
    for prompt in [LONG, "On Monday we plan to", LONG, "Two times three is", LONG]:
        assert completion(cluster, prompt, max_tokens=4)["choices"][0]["finish_reason"] in ("length", "stop")
    survivor = cluster.workers[1 - holder]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(cluster.url("/v1/completions"), json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.readline()  # the request runs: SIGTERM lets it finish
        survivor.send_signal(signal.SIGTERM)
        events = [json.loads(line[6:]) for line in map(bytes.decode, response) if line.startswith("data: {")]
    assert [e["usage"]["completion_tokens"] for e in events if e.get("usage")] == [40]
    assert survivor.wait(30) == 0, cluster.log(f"worker{1 - holder}")
