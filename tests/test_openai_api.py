"""The OpenAI-compatible API of `nemodiff serve --openai-port`, driven by the official `openai` client.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: tested here]

Outputs are checked token for token (as text) against `LLM(engine).generate` in this process;
the chat prompt against the engine tokenizer's own chat template.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import openai  # noqa: E402
import pytest
from triton_helpers import Server

from helpers import penalized_greedy, transformers_model
from nemodiff import SamplingParams


@pytest.fixture(scope="module")
def server(served_engine, tmp_path_factory):
    served = Server(served_engine, tmp_path_factory.mktemp("logs") / "serve.log", "--max-batch-size", "1",
                    "--max-queue", "0", openai=True).start()
    yield served
    assert served.stop() == 0, served.log()[-3000:]
    # errors and hang-ups were quiet: no Triton error line, no traceback, no plain-text 500
    log = served.log()
    assert "HandleCancellation" not in log and "Traceback" not in log and "Exit timeout expired" not in log
    assert "Segfault" not in log  # nor a crash of the backend stub at exit


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["nemodiff"]


def test_completion_equals_llm(client, served_llm):
    reply = client.completions.create(model="nemodiff", prompt="the cat sat", max_tokens=12, temperature=0,
                                      extra_body={"decode_mode": "linear-spec", "block_length": 4, "ignore_eos": True})
    want = served_llm.generate("the cat sat", SamplingParams(max_new_tokens=12, mode="linear-spec", block_length=4,
                                                      ignore_eos=True))[0]
    assert reply.choices[0].text == want.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == len(served_llm.tokenizer.encode("the cat sat"))


def test_streamed_completion_with_stop_and_seed(client, served_llm):
    free = served_llm.generate("the dog", SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    stop = free.text[4:7]
    chunks = list(client.completions.create(model="nemodiff", prompt="the dog", max_tokens=16, stream=True, stop=[stop],
                                            seed=7, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == free.text[: free.text.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    sampled = client.completions.create(model="nemodiff", prompt="the dog", max_tokens=10, temperature=0.8, top_p=0.9,
                                        seed=11, extra_body={"ignore_eos": True})
    want = served_llm.generate("the dog", SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=11,
                                                  ignore_eos=True))[0]
    assert sampled.choices[0].text == want.text


def test_chat_uses_the_engine_chat_template(client, served_llm):
    messages = [{"role": "user", "content": "hello there"}]
    ids = served_llm.tokenizer.encode(served_llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = served_llm.generate([ids], SamplingParams(max_new_tokens=10, ignore_eos=True, mode="quadratic-spec",
                                              block_length=4))[0]
    reply = client.chat.completions.create(model="nemodiff", messages=messages, max_completion_tokens=10,
                                           extra_body={"decode_mode": "quadratic-spec", "block_length": 4,
                                                       "ignore_eos": True})
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="nemodiff", messages=messages, max_tokens=10, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        served_llm.generate([ids], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_have_openai_shape_and_status(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="nemodiff", prompt="hi", max_tokens=4, extra_body={"decode_mode": "bogus"})
    assert "unknown decode mode" in bad.value.body["message"] and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="n must be"):  # above serve's --max-n (16)
        client.completions.create(model="nemodiff", prompt="hi", max_tokens=4, n=17)
    for field in ("temperature", "top_p", "threshold"):  # the openai client cannot send NaN; JSON parsers can
        status, body = raw_post(server, b'{"prompt": "hi", "max_tokens": 4, "%s": NaN}' % field.encode())
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (field, body)
    with socket.create_connection(("127.0.0.1", server.openai_port), timeout=60) as sock:  # refused from its header
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (9 * 2**20))
        reply = b""
        while b"larger than" not in reply:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than" in reply
    with pytest.raises(openai.BadRequestError, match="takes no images"):  # a text-only engine
        client.chat.completions.create(model="nemodiff", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="nemodiff", prompt="hi", max_tokens=2**32 + 8)


def raw_post(server, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.openai_url}/completions", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_overload_is_503_and_disconnect_cancels(client, server):
    # --max-batch-size 1 --max-queue 0: one request at a time, the next is refused at once
    stream = client.completions.create(model="nemodiff", prompt="the cat", max_tokens=240, stream=True,
                                       extra_body={"decode_mode": "quadratic-spec", "block_length": 32,
                                                   "ignore_eos": True})
    next(iter(stream))
    with pytest.raises(openai.APIStatusError) as busy:
        client.completions.create(model="nemodiff", prompt="hi", max_tokens=2)
    assert busy.value.status_code == 503 and "at capacity" in busy.value.body["message"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.metrics()["nemodiff_requests_in_flight"] != 1:
        time.sleep(0.05)  # the gauges have caught up with the running request
    assert server.metrics()["nemodiff_kv_cache_pages_used"] > 0
    stream.close()  # the client goes away: the request is cancelled and its pages freed
    while time.monotonic() < deadline and (server.metrics()["nemodiff_kv_cache_pages_used"]
                                           or server.metrics()["nemodiff_requests_in_flight"]):
        time.sleep(0.05)
    assert server.metrics()["nemodiff_kv_cache_pages_used"] == 0
    assert client.completions.create(model="nemodiff", prompt="hi", max_tokens=2).usage.completion_tokens == 2


HOSTILE = [  # each was a plain-text 500 with a traceback in the log
    (b'{"prompt": "hi", "max_tokens": 2, "timeout": "soon"}', "timeout must be a positive number"),
    (b'{"prompt": "a\\ud800b", "max_tokens": 2}', "lone surrogate"),
    (b'{"prompt": ' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}", "levels deep"),
    (b'{"prompt": "hi", "max_tokens": 2, "decode_mode": ["ar"]}', "decode_mode must be a string"),
    (b'{"prompt": "hi", "max_tokens": 2, "response_format": "json"}', "structured output"),
    (b'{"prompt": "hi", "max_tokens": 2, "stream": "yes"}', "stream must be"),
    (b'{"prompt": "hi", "max_tokens": 2, "ignore_eos": 1}', "ignore_eos must be"),
    (b'{"prompt": [1, 99999999999], "max_tokens": 2}', "prompt must be"),
    (b'{"prompt": "hi", "stop": [1]}', "stop must be"),
    (b'\xff\xfe', "not valid UTF-8"),
    (b'{"prompt": "hi", "max_tokens": 1099511627776}', "max_tokens must be an integer in [1, 256] (got 10995116"),
    (b'{"prompt": "hi", "max_tokens": 257}', "the model's context is 256 tokens, the prompt included"),
]


@pytest.mark.parametrize("body,message", HOSTILE, ids=[m for _, m in HOSTILE])
def test_hostile_bodies_get_400_in_openai_shape(server, body, message):
    status, reply = raw_post(server, body)
    assert status == 400 and message in reply["error"]["message"], reply
    assert reply["error"]["type"] == "invalid_request_error"


def test_hostile_chat_messages_get_400(server, client):
    request = urllib.request.Request(f"{server.openai_url}/chat/completions", method="POST",
                                     data=b'{"messages": [{"role": "user", "content": "a\\udc00"}], "max_tokens": 2}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400 and "lone surrogate" in json.loads(refused.value.read())["error"]["message"]
    for role in ("root", "user\u0000", "", "USER"):
        with pytest.raises(openai.BadRequestError, match=r"messages\[1\].role is .*; it must be one of system, user, "
                                                         "assistant, tool, developer"):
            client.chat.completions.create(model="nemodiff", max_tokens=2, messages=[
                {"role": "system", "content": "x"}, {"role": role, "content": "hi"}])
    for content in ([{"type": "text", "text": 5}], [{"type": "text"}, "x"], 7):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="nemodiff", max_tokens=2,
                                           messages=[{"role": "user", "content": content}])
    assert client.completions.create(model="nemodiff", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_logit_bias_equals_llm(client, served_llm):
    """OpenAI's logit_bias (token-id strings) is applied, in every mode as in LLM.generate."""
    free = served_llm.generate("the cat sat", SamplingParams(max_new_tokens=8, ignore_eos=True))[0].output_ids
    for bias in ({7: 100.0}, {free[0]: -100.0, free[1]: -100.0}):
        want = served_llm.generate("the cat sat", SamplingParams(max_new_tokens=8, ignore_eos=True, logit_bias=bias))[0]
        assert want.output_ids != free
        for mode in ("ar", "linear-spec", "quadratic-spec"):
            reply = client.completions.create(model="nemodiff", prompt="the cat sat", max_tokens=8, temperature=0,
                                              logit_bias={str(t): v for t, v in bias.items()},
                                              extra_body={"decode_mode": mode, "block_length": 4, "ignore_eos": True})
            assert reply.choices[0].text == want.text, (mode, bias)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="nemodiff", prompt="hi", max_tokens=2, logit_bias={"7": 150})
    assert bad.value.body["param"] == "logit_bias"


def test_min_tokens_holds_back_eos_and_stop(client, served_llm):
    eos = min(served_llm.engine.eos_ids)
    forced = {str(eos): 100}
    short = client.completions.create(model="nemodiff", prompt="hi", max_tokens=12, logit_bias=forced)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "stop"
    held = client.completions.create(model="nemodiff", prompt="hi", max_tokens=12, logit_bias=forced,
                                     extra_body={"min_tokens": 5, "decode_mode": "quadratic-spec"})
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"
    free = served_llm.generate("the cat sat", SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = served_llm.tokenizer.decode(free.output_ids[:2])[-1]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop], min_tokens=6)
    want = served_llm.generate("the cat sat", params)[0]
    assert len(want.output_ids) >= 6
    reply = client.completions.create(model="nemodiff", prompt="the cat sat", max_tokens=12, stop=[stop],
                                      extra_body={"min_tokens": 6, "ignore_eos": True})
    assert reply.choices[0].text == want.text and reply.usage.completion_tokens == len(want.output_ids)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="nemodiff", prompt="hi", max_tokens=2, extra_body={"min_tokens": 3})
    assert bad.value.body["param"] == "min_tokens"


def test_penalties_equal_the_oracle_and_auto_equals_ar(client, served_llm, served_engine):
    """frequency_penalty, presence_penalty and repetition_penalty: greedy output equals transformers' logits with
    vLLM's penalty rules, in AR, both spec modes and auto (decode_mode "auto")."""
    prompt = "the cat sat on the mat and the cat"
    ids = served_llm.tokenizer.encode(prompt)
    want = penalized_greedy(transformers_model(served_engine.parent / "ckpt"), ids, 20, 1.3, 0.4, 0.3)
    for mode in ("ar", "linear-spec", "quadratic-spec", "auto"):
        reply = client.completions.create(model="nemodiff", prompt=prompt, max_tokens=20, temperature=0,
                                          frequency_penalty=0.4, presence_penalty=0.3,
                                          extra_body={"repetition_penalty": 1.3, "decode_mode": mode,
                                                      "block_length": 4, "ignore_eos": True})
        assert reply.choices[0].text == served_llm.tokenizer.decode(want), mode
    plain = served_llm.generate(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    reply = client.completions.create(model="nemodiff", prompt=prompt, max_tokens=20,
                                      extra_body={"decode_mode": "auto", "ignore_eos": True})
    assert reply.choices[0].text == plain.text and plain.output_ids != want


def test_suffix_and_output_changing_fields_are_400(client):
    for kwargs, param in ((dict(suffix="end"), "suffix"), (dict(frequency_penalty=2.5), "frequency_penalty"),
                          (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
                          (dict(extra_body={"min_p": 0.1}), "min_p"),
                          (dict(extra_body={"bad_words": ["x"]}), "bad_words"),
                          (dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
                          (dict(echo=True, logprobs=1), "echo")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="nemodiff", prompt="hi", max_tokens=2, **kwargs)
        assert bad.value.body["param"] == param, kwargs
    reply = client.completions.create(model="nemodiff", prompt="hi", max_tokens=2, frequency_penalty=0,
                                      presence_penalty=0, user="u1", extra_body={"repetition_penalty": 1})
    assert reply.usage.completion_tokens >= 1


def test_unknown_fields_are_logged_once(client, server):
    for _ in range(3):
        client.chat.completions.create(model="nemodiff", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
                                       user="u1", metadata={"a": "b"}, store=False,
                                       extra_body={"some_future_field": 1})
    deadline = time.time() + 10
    while "some_future_field" not in server.log() and time.time() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert log.count("'some_future_field'") == 1
    assert "'user'" not in log and "'metadata'" not in log and "'store'" not in log


def test_continuous_usage_stats_on_every_chunk(client):
    chunks = list(client.chat.completions.create(
        model="nemodiff", max_tokens=6, stream=True, messages=[{"role": "user", "content": "hi"}],
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and chunks[0].usage.prompt_tokens > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    plain = list(client.completions.create(model="nemodiff", prompt="hi", max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_models_retrieve(client):
    assert client.models.retrieve("nemodiff").id == "nemodiff"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.body["type"] == "not_found_error" and "gpt-4" in missing.value.body["message"]


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("POST", "/v1/models", 405),
                                                  ("GET", "/v1/completions", 405), ("DELETE", "/health", 405)])
def test_unknown_routes_and_methods_answer_json(server, method, path, status):
    base = server.openai_url.removesuffix("/v1")
    request = urllib.request.Request(base + path, data=b"{}" if method == "POST" else None, method=method)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == status
    body = json.loads(error.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}
