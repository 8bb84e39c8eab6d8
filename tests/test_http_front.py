"""The ports `nemodiff serve` owns, under hostile clients: the API key on every front, bodies of any
shape or depth (a property-based fuzzer), hang-ups, half-sent requests, refusals counted in the metrics.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[HTTP front, OpenAI API: tested here]

One server for the module, with an API key, a 2 s client deadline and room for 2 running + 1
queued requests. After every test the server is still ready and exact.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving_resilience import idle, wait_metrics
from triton_helpers import GrpcStream, Server, ids_of
from tritonclient.utils import InferenceServerException

from helpers import make_checkpoint, make_engine
from nemodiff import LLM, SamplingParams

KEY = "sk-test-0123456789"
IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    return make_engine(make_checkpoint(root / "ckpt"), root / "engine", kv_page_size=4, max_seq_len=256)


@pytest.fixture(scope="module")
def llm(engine_dir):
    return LLM(engine_dir, device="cpu")


@pytest.fixture(scope="module")
def server(engine_dir, llm, tmp_path_factory):
    served = Server(engine_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--max-batch-size", "2",
                    "--max-queue", "1", "--request-timeout", "10", "--idle-timeout", str(IDLE_TIMEOUT),
                    openai=True, api_key=KEY).start()
    yield served
    assert_exact(served, llm)
    idle_stream = GrpcStream(served.grpc, headers=served.grpc_headers)  # Triton's gRPC server waits for it forever
    stopping = time.monotonic()
    assert served.stop() == 0, served.log()[-3000:]  # SIGINT
    assert time.monotonic() - stopping < 10.0  # the default --exit-timeout
    idle_stream.close()
    log = served.log()
    assert "server stopped" in log and "HandleCancellation" not in log and "NVML" not in log


def assert_exact(server, llm) -> None:
    """The server still serves, and serves exactly what LLM.generate gives; nothing is left in the engine."""
    status, body = server.generate({"text_input": "the cat sat", "max_tokens": 6, "ignore_eos": True})
    assert status == 200, body
    want = llm.generate("the cat sat", SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert ids_of(body["output_ids"]) == want.output_ids and body["text_output"] == want.text
    wait_metrics(server, idle)


def get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def scraped_series(url: str) -> set[str]:
    """The names of the nemodiff_* series at a Prometheus URL, fetched without a key."""
    with urllib.request.urlopen(url, timeout=30) as reply:
        return {line.split("{")[0].split(" ")[0] for line in reply.read().decode().splitlines()
                if line.startswith("nemodiff_")}


def openai_post(server, data: bytes, headers: dict | None = None, path: str = "completions") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | (server.headers if headers is None else headers)
    request = urllib.request.Request(f"{server.openai_url}/{path}", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_api_key_guards_every_front(server):
    payload = {"text_input": "the cat", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):  # none, wrong, not Bearer
        status, body = server.post("/v2/models/nemodiff/generate", payload, headers=headers)
        assert status == 401 and "API key" in json.loads(body)["error"], (headers, body)
    assert server.post("/v2/models/nemodiff/generate", payload)[0] == 200
    assert server.post("/v2/models/nemodiff/generate", payload, headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert get(f"{server.http}/v2/models/nemodiff/config") == 401  # model configuration needs the key too
    assert get(f"{server.http}/v2/models/nemodiff/config", server.headers) == 200
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/nemodiff/ready", "/v2/models/nemodiff"):
        assert get(f"{server.http}{path}") == 200, path  # probes and metadata stay open
    assert get(f"http://127.0.0.1:{server.metrics_port}/metrics") == 200
    series = {port: scraped_series(f"http://127.0.0.1:{port}/metrics")  # load tools scrape their base URL
              for port in (server.metrics_port, server.openai_port, server.http_port)}
    assert "nemodiff_requests_in_flight" in series[server.metrics_port]
    assert series[server.openai_port] == series[server.http_port] == series[server.metrics_port]
    for headers in ({}, {"triton-grpc-protocol-authorization": "Bearer wrong"}):
        stream = GrpcStream(server.grpc, headers=headers)
        try:
            try:
                stream.send("x", "the cat", max_tokens=2)
            except InferenceServerException:  # Triton may have refused the stream already
                pass
            _, _, error, _ = stream.next()
            assert error is not None and "requires an API key" in str(error), error
        finally:
            stream.close()
    for value in (f"Bearer {KEY}", f"bearer  {KEY}", f"BEARER {KEY} "):  # the spellings HTTP takes
        stream = GrpcStream(server.grpc, headers={"triton-grpc-protocol-authorization": value})
        try:
            stream.send("ok", "the cat", max_tokens=2)
            _, result, error, final = stream.next()
            assert error is None and final, (value, error)
        finally:
            stream.close()
    wrong = openai.OpenAI(base_url=server.openai_url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model="nemodiff", prompt="hi", max_tokens=2)
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    status, body = openai_post(server, b'{"prompt": "hi", "max_tokens": 2}', headers={})
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "API key" in body["error"]["message"]
    assert get(f"http://127.0.0.1:{server.openai_port}/health") == 200
    client = openai.OpenAI(base_url=server.openai_url, api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="nemodiff", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_deep_or_broken_bodies_get_400_and_the_server_stays_up(server):
    deep = b'{"text_input": ' + b"[" * 50_000 + b'"x"' + b"]" * 50_000 + b', "max_tokens": 2}'  # crashed Triton
    cases = {deep: "levels deep", b'{"text_input": "\xff\xfe", "max_tokens": 2}': "not valid UTF-8",
             b'{"text_input": "the cat", "max_tokens": 2,': "not valid JSON",
             b'{"parameters": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}": "levels deep",
             b'{"text_input": "x", "nemodiff_front_key": "0"}': "reserved",
             b'{"text_input": "x", "nemodiff_front_authorization": "Bearer guess"}': "reserved"}
    # a NUL in a parameters key: Triton's converter answers 500 ("parameter key '' was not found"); found by the fuzzer
    cases[b'{"text_input": "the cat", "max_tokens": 2, "parameters": {"\\u0000k": 1}}'] = "parameter"
    for path in ("generate", "generate_stream"):
        for body, message in cases.items():
            status, reply = server.post(f"/v2/models/nemodiff/{path}", body)
            assert status == 400 and message in json.loads(reply)["error"], (path, message, reply[:200])
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:  # refused from its header
        sock.sendall(b"POST /v2/models/nemodiff/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                     KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (65 * 2**20))
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    assert server.process.poll() is None
    status, _ = server.post("/v2/models/nemodiff/generate", {"text_input": "the cat", "max_tokens": 2})
    assert status == 200


SLOW = {"text_input": "", "max_tokens": 200, "decode_mode": "quadratic-spec", "block_length": 16, "ignore_eos": True}


def send_raw(port: int, path: str, payload: dict) -> socket.socket:
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return sock


def freed_within(server, seconds: float) -> float:
    """Seconds until nothing is in flight and no KV page is used; fails past `seconds`."""
    start = time.monotonic()
    wait_metrics(server, lambda m: m["nemodiff_requests_in_flight"] == 0 and m["nemodiff_kv_cache_pages_used"] == 0,
                 timeout=seconds)
    return time.monotonic() - start


def test_a_hang_up_cancels_the_request_at_once_on_every_front(server):
    """Non-streaming requests too: Triton's HTTP endpoints notice a closed connection only when they next write."""
    fronts = [(server.http_port, "/v2/models/nemodiff/generate", SLOW | {"input_ids": [1, 90, 91]}),
              (server.http_port, "/v2/models/nemodiff/generate_stream", SLOW | {"input_ids": [1, 92, 93]}),
              (server.openai_port, "/v1/completions", {"prompt": [1, 94, 95], "max_tokens": 200, "ignore_eos": True,
                                                      "decode_mode": "quadratic-spec", "block_length": 16})]
    sockets = [send_raw(*front) for front in fronts]  # 2 running + 1 queued: the server is full
    try:
        wait_metrics(server, lambda m: m["nemodiff_requests_in_flight"] == 3 and m["nemodiff_kv_cache_pages_used"])
        time.sleep(0.3)
    finally:
        for sock in sockets:
            sock.close()
    assert freed_within(server, 1.0) < 1.0
    # hang-ups at random moments, queued or running, on each front (a full server refuses the rest with 503)
    rng = random.Random(7)
    for _ in range(6):
        sockets = [send_raw(*fronts[rng.randrange(3)]) for _ in range(3)]
        time.sleep(rng.uniform(0.0, 0.4))
        for sock in sockets:
            sock.close()
    assert freed_within(server, 1.5) < 1.5


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closed the connection (whatever it answered first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_half_sent_and_idle_connections_are_closed(server):
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    partial = [b"",  # nothing at all
               b"POST /v2/models/nemodiff/generate HTTP/1.1\r\nHost: x\r\n" + auth,  # half the head
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 100\r\n\r\n{\"pro"]
    held = []
    for port in (server.http_port, server.openai_port):
        for i in range(30):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(partial[i % len(partial)])
            held.append(sock)
    started = time.monotonic()
    assert server.post("/v2/models/nemodiff/generate", {"text_input": "the cat", "max_tokens": 2})[0] == 200
    time.sleep(IDLE_TIMEOUT)
    still_open = sum(not closed_by_server(sock, max(0.1, started + IDLE_TIMEOUT + 1.0 - time.monotonic()))
                     for sock in held)
    for sock in held:
        sock.close()
    assert still_open == 0


def test_every_refusal_is_counted(server):
    def counts() -> tuple[float, float]:
        metrics = server.metrics()
        return (metrics.get('nemodiff_request_errors_total{kind="invalid"}', 0.0),
                metrics.get('nemodiff_request_errors_total{kind="unauthorized"}', 0.0))

    invalid, unauthorized = counts()
    assert server.generate({"text_input": "hi", "max_tokens": 2, "decode_mode": "bogus"})[0] == 400  # the model's
    assert server.post("/v2/models/nemodiff/generate", b"[" * 100 + b"]" * 100)[0] == 400  # the HTTP front's
    assert server.post("/v2/models/nemodiff/generate", {"text_input": None})[0] == 400  # Triton's own
    assert openai_post(server, b'{"prompt": "hi", "max_tokens": 2, "decode_mode": "bogus"}')[0] == 400  # the model's
    assert openai_post(server, b'{"prompt": "hi", "max_tokens": 2, "best_of": 2}')[0] == 400  # the OpenAI front's
    assert server.post("/v2/models/nemodiff/generate", {"text_input": "hi"}, headers={})[0] == 401
    assert openai_post(server, b'{"prompt": "hi"}', headers={})[0] == 401
    wait_metrics(server, lambda m: counts()[0] - invalid >= 5 and counts()[1] - unauthorized >= 2, timeout=10)


# -- the fuzzer --------------------------------------------------------------------------------------

FIELDS = ["text_input", "max_tokens", "stream", "decode_mode", "block_length", "threshold", "temperature", "top_p",
          "top_k", "random_seed", "seed", "stop_words", "bad_words", "end_id", "input_ids", "timeout", "ignore_eos",
          "image_bytes_input", "min_length", "beam_width", "exclude_input_in_output", "lora_task_id", "id",
          "parameters", "frequency_penalty", "guided_decoding_guide", "pad_id", "max_thinking_tokens", "logit_bias",
          "min_tokens", "cache_salt", "guided_decoding_guide_type"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["", "ar", "linear-spec", "quadratic-spec", "diffusion", "\ud800", "[IMG]",
                                     "regex", "json_schema", "choice", "ebnf_grammar", '["a", "b"]', "[a-z]+"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)


@st.composite
def deep(draw):
    """A value wrapped in many arrays and objects, of any mix."""
    depth = draw(st.one_of(st.integers(0, 40), st.integers(0, 60_000)))
    pattern = draw(st.lists(st.sampled_from(["[", "{"]), min_size=1, max_size=4))
    opening = "".join(pattern[i % len(pattern)] if pattern[i % len(pattern)] == "[" else '{"k":' for i in range(depth))
    closing = "".join("]" if pattern[i % len(pattern)] == "[" else "}" for i in reversed(range(depth)))
    return (opening + json.dumps(draw(SCALARS)) + closing).encode()


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["generate", "generate", "deep", "any", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "any":
        return json.dumps(draw(VALUES)).encode()
    body = {"text_input": "the cat", "max_tokens": draw(st.integers(1, 3)), "timeout": 2.0}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        body[name] = draw(VALUES)
    text = json.dumps(body, allow_nan=True)
    if kind == "deep":  # one field (or the body) nested deep
        field = draw(st.sampled_from([None] + FIELDS))
        nested = draw(deep()).decode()
        text = nested if field is None else text[:-1] + f', "{field}": {nested}}}'
    cut = draw(st.one_of(st.none(), st.integers(0, len(text))))  # sometimes a truncated body
    return (text if cut is None else text[:cut]).encode()


CHAT_FIELDS = ["max_tokens", "max_completion_tokens", "n", "logprobs", "top_logprobs", "stop", "tools", "tool_choice",
               "response_format", "seed", "temperature", "decode_mode"]
ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer", "User", "user\x00", "", "\ud800"]),
                  SCALARS)


@st.composite
def chat_bodies(draw):
    """OpenAI chat bodies: roles, contents and the fields beside them fuzzed (sent to the OpenAI port)."""
    messages = [{"role": draw(ROLES), "content": draw(SCALARS)} for _ in range(draw(st.integers(0, 2)))]
    body = {"messages": messages, "timeout": 2.0,
            "max_tokens": draw(st.one_of(st.integers(1, 3), st.integers(-2**70, 2**70), SCALARS))}
    for name in draw(st.lists(st.sampled_from(CHAT_FIELDS), max_size=2)):
        body[name] = draw(VALUES)
    return json.dumps(body, allow_nan=True).encode()


FUZZ_SECONDS = 15.0
seen: dict[int, list] = {}


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(bodies(), chat_bodies()), path=st.sampled_from(["generate", "generate_stream", "chat"]))
def fuzz_once(server, started, body, path):
    if time.monotonic() - started > FUZZ_SECONDS:
        return  # out of time: the remaining examples pass at once
    if path == "chat":  # an OpenAI error is JSON in OpenAI's shape, or this raises
        status, reply = openai_post(server, body, path="chat/completions")
        assert status == 200 or reply["error"]["message"], reply
        reply = json.dumps(reply).encode()
    else:
        status, reply = server.post(f"/v2/models/nemodiff/{path}", body)
    seen.setdefault(status, []).append((body[:120], reply[:200]))
    assert status in (200, 400, 503), (status, body[:300], reply[:300])


def test_fuzzed_bodies_never_stop_the_server(server, llm):
    started = time.monotonic()
    fuzz_once(server, started)
    print(f"fuzzer: {sum(map(len, seen.values()))} bodies in {time.monotonic() - started:.1f} s, by status "
          f"{ {status: len(cases) for status, cases in sorted(seen.items())} }")
    assert server.process.poll() is None
    assert_exact(server, llm)


# -- stopping a front with requests open ---------------------------------------------------------------

def test_a_stopping_front_answers_every_open_request_with_our_json(caplog):
    """Requests still open when a front stops (Triton never answered them) get our 503 "shutting down" JSON,
    a stream that had begun a last error event; no plain-text 500, no ASGI error, well within a second or two
    of the grace period."""
    import asyncio
    import threading

    from nemodiff.serving.http.server import ServerThread
    from nemodiff.serving.openai.frontend import openai_error

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            if scope["path"] == "/stream":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream")]})
                await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
            await asyncio.sleep(3600)  # Triton never answers
        except asyncio.CancelledError:  # an app that answers on its own while it unwinds: dropped
            await send({"type": "http.response.start", "status": 500, "headers": []})
            raise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    front = ServerThread(app, "127.0.0.1", port, 30.0, "test", error_body=openai_error)
    front.start()
    answers = {}

    def ask(path):
        try:
            with urllib.request.urlopen(f"{front.url}{path}", timeout=30) as reply:
                answers[path] = (reply.status, reply.read())
        except urllib.error.HTTPError as exc:
            answers[path] = (exc.code, exc.read(), exc.headers.get("Retry-After"))

    threads = [threading.Thread(target=ask, args=(path,)) for path in ("/plain", "/stream")]
    for thread in threads:
        thread.start()
    while front.guard.pending() < 2:
        time.sleep(0.01)
    started = time.monotonic()
    front.stop(grace=0.2)
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 3.0
    status, body, retry = answers["/plain"]
    assert status == 503 and retry == "1" and json.loads(body) == openai_error("the server is shutting down")
    assert answers["/stream"][0] == 200
    assert answers["/stream"][1] == b"data: {}\n\ndata: " + json.dumps(openai_error("the server is shutting down")).encode() + b"\n\n"
    assert "Unexpected ASGI message" not in caplog.text and "Exception in ASGI application" not in caplog.text
