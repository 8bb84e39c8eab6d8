"""Serving under failure and load: isolation, queue limit, deadlines, cancellation, disconnects,
oversized input, engine-loop failure and SIGTERM, against a real `nemodiff serve`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: tested here]

Engine faults are injected into the real server through PYTHONPATH (tests/faults/sitecustomize.py).
The server of this module is started from the repository root with no venv on PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from triton_helpers import REPO_ROOT, GrpcStream, Server, alive, descendants, ids_of, plain_env, shm_regions

from helpers import make_checkpoint, make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.serving.openai.backend import BackendError, TritonBackend, triton_inputs

FAULTS = Path(__file__).parent / "faults"
SLOW_REGEX = "slow-compile [0-9]+"  # faults/sitecustomize.py: its grammar takes a minute to compile
FAIL_ONE = [1, 13, 13, 13]
FAIL_LOOP = [1, 17, 17, 17]
LONG = 200  # tokens of a request that is still running when the test acts on it


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience")
    return make_engine(make_checkpoint(root / "ckpt"), root / "engine", kv_page_size=4, max_seq_len=256)


@pytest.fixture(scope="module")
def llm(engine_dir):
    return LLM(engine_dir, device="cpu")


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    # two running + one queued at most; every request also has a 60 s server-wide deadline; grammars 1 s
    served = Server(engine_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--max-batch-size", "2",
                    "--max-queue", "1", "--request-timeout", "60", "--grammar-timeout", "1", cwd=REPO_ROOT,
                    env=plain_env(PYTHONPATH=str(FAULTS))).start()
    yield served
    if served.process.poll() is None:
        served.stop()


def slow(max_tokens: int = LONG) -> dict:
    """A quadratic-spec request with k = 16: one forward of 272 tokens per token on random weights."""
    return {"max_tokens": max_tokens, "decode_mode": "quadratic-spec", "block_length": 16, "stream": True,
            "ignore_eos": True}


def wait_metrics(server, condition, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if condition(metrics):
            return metrics
        time.sleep(0.05)
    raise AssertionError(f"metrics never satisfied the condition: {server.metrics()}")


def idle(metrics: dict) -> bool:
    return (metrics["nemodiff_kv_cache_pages_used"] == 0 and metrics["nemodiff_requests_running"] == 0
            and metrics["nemodiff_requests_waiting"] == 0 and metrics["nemodiff_requests_in_flight"] == 0)


def first_response(stream: GrpcStream, request_id: str):
    got_id, result, error, final = stream.next()
    assert got_id in (request_id, None), got_id
    return result, error, final


def collect(stream: GrpcStream, timeout: float = 120.0) -> tuple[list[int], object]:
    """ids of one streamed request until its final response or its error."""
    ids = []
    while True:
        _, result, error, final = stream.next(timeout)
        if error is not None:
            return ids, error
        ids += result.as_numpy("output_ids").reshape(-1).tolist()
        if final:
            return ids, None


def test_a_failing_request_fails_alone(server, llm):
    good = GrpcStream(server.grpc)
    bad = GrpcStream(server.grpc)
    try:
        good.send("good", "", input_ids=[1, 40, 41, 42], max_tokens=24, stream=True, ignore_eos=True)
        bad.send("bad", "", input_ids=FAIL_ONE + [40], max_tokens=24, stream=True)
        ids, error = collect(good)
        assert error is None
        _, bad_error = collect(bad)
    finally:
        good.close()
        bad.close()
    want = llm.generate([[1, 40, 41, 42]], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    assert ids == want.output_ids
    assert bad_error is not None and "injected failure in this request" in bad_error.message()
    metrics = wait_metrics(server, idle)
    assert metrics['nemodiff_request_errors_total{kind="internal"}'] >= 1


def test_queue_limit_refuses_at_once_and_a_queued_request_can_be_cancelled(server):
    running = [GrpcStream(server.grpc) for _ in range(2)]
    queued = GrpcStream(server.grpc)
    before = server.metrics()["nemodiff_requests_refused_total"]
    try:
        for i, stream in enumerate(running):
            stream.send(f"run{i}", "", input_ids=[1, 50 + i, 60], **slow())
            _, error, _ = first_response(stream, f"run{i}")
            assert error is None
        queued.send("queued", "", input_ids=[1, 70, 71], **slow())
        wait_metrics(server, lambda m: m["nemodiff_requests_waiting"] == 1)
        # full: 2 running + 1 queued; the next one is refused at once: HTTP 503 with Retry-After (our message
        # kept), a gRPC UNAVAILABLE status (with Triton's triton_grpc_error header), 503 through the OpenAI backend
        for path in ("generate", "generate_stream"):
            status, body, headers = server.post(f"/v2/models/nemodiff/{path}", {"text_input": "the cat",
                                                                                 "max_tokens": 2}, with_headers=True)
            assert status == 503 and headers["Retry-After"] == "1", (status, body)
            assert b"the server is at capacity (2 running + 1 queued requests); retry later" in body
        strict = GrpcStream(server.grpc, headers={"triton_grpc_error": "true"})
        try:
            strict.send("refused", "the cat", max_tokens=2)
            _, _, error, _ = strict.next()
            assert error is not None and error.status() == "StatusCode.UNAVAILABLE" and "at capacity" in str(error)
        finally:
            strict.close()
        refused = asyncio.run(refused_status(server))
        assert refused == (503, True), refused
        queued.close(cancel=True)  # cancel the queued request: it leaves the queue, the running ones go on
        metrics = wait_metrics(server, lambda m: m["nemodiff_requests_waiting"] == 0
                               and m["nemodiff_requests_in_flight"] == 2)
        assert metrics["nemodiff_requests_running"] == 2
        assert metrics["nemodiff_requests_refused_total"] - before == 4
    finally:
        for stream in running:
            stream.close(cancel=True)
    wait_metrics(server, idle)
    status, body = server.generate({"text_input": "the cat", "max_tokens": 3})
    assert status == 200 and body["num_output_tokens"] == 3


async def refused_status(server) -> tuple[int, bool]:
    backend = TritonBackend(server.grpc, "nemodiff")
    try:
        async for _ in backend.generate({"text_input": "the cat", "max_tokens": 2, "stream": True}):
            pass
    except BackendError as exc:
        return exc.status, "at capacity" in exc.message
    return 200, False


def test_deadline_ends_a_request_and_frees_its_pages(server):
    before = server.metrics()["nemodiff_requests_timed_out_total"]
    stream = GrpcStream(server.grpc)
    try:
        stream.send("late", "", input_ids=[1, 80, 81], timeout=0.5, **slow())
        ids, error = collect(stream)
    finally:
        stream.close()
    assert error is not None and "request timeout expired" in error.message()
    assert len(ids) < LONG
    metrics = wait_metrics(server, idle)
    assert metrics["nemodiff_requests_timed_out_total"] - before == 1
    status, body = server.generate({"text_input": "the cat", "max_tokens": 2, "timeout": 30.0})
    assert status == 200 and ids_of(body["output_ids"]) and body["finish_reason"] == "length"


def test_a_compiling_grammar_ends_with_its_deadline_its_client_or_the_compile_limit(server):
    """While a grammar compiles (a fault makes it take a minute) its request is answered at once when its
    deadline passes, when its gRPC stream is cancelled, or (a 400) past `--grammar-timeout`; plain requests
    are served meanwhile."""
    guide = {"guided_decoding_guide_type": "regex", "guided_decoding_guide": SLOW_REGEX}
    started = time.monotonic()
    status, body = server.generate({"text_input": "the cat", "max_tokens": 2, "timeout": 0.5} | guide)
    assert status == 503 and "deadline while its grammar compiled" in body["error"], body
    status, body = server.generate({"text_input": "the cat", "max_tokens": 2} | guide)
    assert status == 400 and "did not compile within the 1 s limit" in body["error"], body
    assert time.monotonic() - started < 8
    stream = GrpcStream(server.grpc)
    try:
        stream.send("g", "the cat", max_tokens=2, **guide)
        wait_metrics(server, lambda m: m["nemodiff_requests_in_flight"] >= 1)
        status, body = server.generate({"text_input": "the dog", "max_tokens": 2})
        assert status == 200 and body["finish_reason"] == "length"
    finally:
        stream.close(cancel=True)
    wait_metrics(server, idle, timeout=10)  # answered and counted out long before the compile's minute


def test_closed_http_stream_frees_pages(server):
    counter = 'nemodiff_output_tokens_total{mode="quadratic-spec"}'
    before = server.metrics()[counter]
    body = json.dumps({"text_input": "", "input_ids": [1, 90, 91]} | slow()).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/nemodiff/generate_stream HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data:") < 2:
            received += sock.recv(65536)
    metrics = wait_metrics(server, idle)  # the socket is closed: Triton cancels, the engine frees the pages
    assert metrics[counter] - before < LONG


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sampling_values_are_refused(server, value):
    for field in ("temperature", "top_p", "threshold"):
        body = ('{"text_input": "hello", "max_tokens": 4, "%s": %s}' % (field, value)).encode()
        status, reply = server.generate(body)
        assert status == 400 and "finite" in reply["error"] or "must be in" in reply["error"], (field, reply)
    status, reply = server.generate({"text_input": "hello", "max_tokens": 4, "temperature": 0.7})
    assert status == 200 and reply["num_output_tokens"] >= 1


def test_huge_prompts_are_refused_before_tokenizing_them(server):
    words = "cat " * 250_000  # 1 MB of words: refused after tokenizing a bounded prefix
    status, reply = server.generate({"text_input": words, "max_tokens": 4})
    assert status == 400 and "max_seq_len is 256" in reply["error"] and "more than" in reply["error"]
    status, reply = server.generate({"text_input": "x" * (9 * 2**20), "max_tokens": 4})  # past --max-request-bytes
    assert status == 400 and "too large" in reply["error"]
    status, reply = server.generate({"text_input": "the cat", "max_tokens": 2})
    assert status == 200


def test_engine_failure_answers_everyone_reports_not_ready_and_exits_nonzero(server):
    """Last in this module: it takes the server down."""
    running = GrpcStream(server.grpc)
    queued = GrpcStream(server.grpc)
    try:
        running.send("run", "", input_ids=[1, 30, 31], **slow())
        _, error, _ = first_response(running, "run")
        assert error is None
        queued.send("queued", "", input_ids=[1, 32, 33], **slow())
        wait_metrics(server, lambda m: m["nemodiff_requests_in_flight"] == 2)
        readiness: list[int | None] = []
        watching = threading.Event()

        def watch():
            while server.process.poll() is None:
                readiness.append(server.model_ready())
                watching.set()
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        watching.wait(10)
        killer = GrpcStream(server.grpc)
        try:
            killer.send("kill", "", input_ids=FAIL_LOOP + [5], max_tokens=4, stream=True)
            _, kill_error = collect(killer)
        finally:
            killer.close()
        _, run_error = collect(running)
        _, queued_error = collect(queued)
    finally:
        running.close()
        queued.close()
    for error in (kill_error, run_error, queued_error):
        assert error is not None and "injected engine failure" in error.message()
    returncode = server.wait_exit(60)
    watcher.join(5)
    assert returncode == 3, server.log()[-3000:]
    assert 400 in readiness or 503 in readiness, readiness  # Triton itself said the model is not ready
    assert readiness[0] == 200
    assert "the engine failed" in server.log()
    assert shm_regions(server.process.pid) == []


async def eight_clients(server) -> list:
    """Eight concurrent clients, all finished before the test goes on: four through the OpenAI frontend's
    backend, four careless ones that cancel their stream the moment its last response arrives (as a gRPC
    call dropped by its owner is cancelled), which races with Triton finishing the stream."""
    import tritonclient.grpc.aio as aioclient

    async def polite(i: int):
        pieces = TritonBackend(server.grpc, "nemodiff").generate({"text_input": f"the cat {i}", "max_tokens": 6,
                                                                   "stream": True})
        return [piece async for piece in pieces][-1].final

    async def careless(i: int):
        client = aioclient.InferenceServerClient(server.grpc)

        async def requests():
            yield {"model_name": "nemodiff", "inputs": triton_inputs({"text_input": f"the dog {i}", "max_tokens": 6})}
            await asyncio.sleep(3600)

        call = client.stream_infer(requests())
        async for result, error in call:
            if error is not None or result.as_numpy("finish_reason") is not None:
                break
        call.cancel()
        await client.close()
        return error is None

    return await asyncio.gather(*(polite(i) for i in range(4)), *(careless(i) for i in range(4)))


def post_in_thread(url: str, body: dict, answers: dict, name: str) -> threading.Thread:
    """POST a JSON body on a thread; answers[name] = (status, body bytes) once it is answered."""
    def run():
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                answers[name] = (reply.status, reply.read())
        except urllib.error.HTTPError as exc:
            answers[name] = (exc.code, exc.read())
        except Exception as exc:  # noqa: BLE001
            answers[name] = (None, repr(exc).encode())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_answers_every_open_stream_and_leaves_nothing_behind(engine_dir, tmp_path):
    """After eight concurrent clients, with an idle gRPC stream open (Triton's gRPC server waits for it
    without a deadline), four streams and an HTTP stream running, and OpenAI requests (a stream, a plain
    one, one whose grammar is compiling): every open request is answered with our "shutting down" (JSON at
    HTTP and OpenAI, a final error at gRPC), no ASGI traceback, and `nemodiff serve` exits 0 within its
    exit timeout."""
    served = Server(engine_dir, tmp_path / "serve.log", "--max-batch-size", "6", openai=True,
                    env=plain_env(PYTHONPATH=str(FAULTS))).start()
    tree = descendants(served.process.pid)
    assert tree and shm_regions(served.process.pid)
    assert asyncio.run(eight_clients(served)) == [True] * 8
    wait_metrics(served, idle)
    idle_stream = GrpcStream(served.grpc)  # opened, never used
    grpc_streams = [GrpcStream(served.grpc) for _ in range(3)]
    http_events: list[bytes] = []
    sock = socket.create_connection(("127.0.0.1", served.http_port), timeout=60)
    try:
        for i, stream in enumerate(grpc_streams):
            stream.send(f"s{i}", "", input_ids=[1, 20 + i, 21], **slow(3000 // 16))
            _, error, _ = first_response(stream, f"s{i}")
            assert error is None
        body = json.dumps({"text_input": "", "input_ids": [1, 25, 26]} | slow(3000 // 16)).encode()
        sock.sendall(b"POST /v2/models/nemodiff/generate_stream HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        first = b""
        while b"data:" not in first:  # the headers may arrive before the first event
            chunk = sock.recv(65536)
            assert chunk, "the HTTP stream closed before its first event"
            first += chunk
        answers: dict = {}
        chat = {"messages": [{"role": "user", "content": "hi"}], "decode_mode": "quadratic-spec", "block_length": 16,
                "max_tokens": 3000 // 16, "ignore_eos": True}
        openai_threads = [post_in_thread(f"{served.openai_url}/chat/completions", chat | {"stream": True}, answers,
                                         "stream"),
                          post_in_thread(f"{served.openai_url}/chat/completions", chat, answers, "plain"),
                          post_in_thread(f"{served.openai_url}/completions", {  # compiles for a minute
                              "prompt": "x", "max_tokens": 4, "guided_regex": SLOW_REGEX}, answers, "guided")]
        wait_metrics(served, lambda m: m["nemodiff_requests_in_flight"] >= 6)
        stopping = time.monotonic()
        os.killpg(served.process.pid, signal.SIGTERM)  # as `kill -TERM -PGID` would
        outcomes = [collect(stream, timeout=30) for stream in grpc_streams]
        received = first
        while not received.endswith(b"0\r\n\r\n"):  # the last chunk of a complete response
            chunk = sock.recv(65536)
            assert chunk, "the HTTP stream was cut before its response completed"
            received += chunk
        http_events = [line for line in received.split(b"\n") if line.startswith(b"data:")]
        returncode = served.wait_exit(60)
        stopped_in = time.monotonic() - stopping
        for thread in openai_threads:
            thread.join(30)
    finally:
        sock.close()
        for stream in grpc_streams + [idle_stream]:
            stream.close()
    assert returncode == 0, served.log()[-3000:]
    assert stopped_in < 10.0, stopped_in  # the default --exit-timeout
    for _ids, error in outcomes:
        assert error is not None and "shutting down" in error.message()
    assert b"shutting down" in http_events[-1]  # the HTTP stream ended with an error event, not a cut connection
    assert answers["plain"][0] == answers["guided"][0] == 503, answers
    assert all(json.loads(answers[n][1])["error"]["message"].startswith("the server is shutting down")
               for n in ("plain", "guided"))
    # a stream that had begun ends with an error event; one still waiting for its first token is a 503
    assert answers["stream"][0] in (200, 503) and b"the server is shutting down" in answers["stream"][1], answers
    assert "Unexpected ASGI message" not in served.log() and "Traceback" not in served.log(), served.log()[-3000:]
    assert alive(tree) == set()
    assert shm_regions(served.process.pid) == []
    assert "Exit timeout expired" not in served.log()
