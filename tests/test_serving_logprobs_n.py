"""Log-probabilities, n > 1 and the prefix cache through both serving fronts of one `nemodiff serve`.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI API and Triton gRPC: tested here]

One server (Triton with `--openai-port`, `--max-n 4`) serves every test of this module. Values are
compared with `LLM(engine).generate` in this process: log-probabilities exactly as float32, choices
token for token.
"""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import openai
import pytest
from triton_helpers import GrpcStream, module_server

from nemodiff import SamplingParams

MAX_N = 4
LONG_PROMPT = " ".join("the model token block mask draft verify cache page fast red green blue".split())


@pytest.fixture(scope="module")
def server(served_engine, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    yield from module_server(served_engine, logs, "--max-n", str(MAX_N))
    assert "Traceback" not in (logs / "serve.log").read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


def f32(value: float):
    """A float32 log-probability of LLM.generate, as a server must send it back. Equal to float32 rounding:
    the servers run the engine on the CPU's PyTorch reference path, where a product's last bits depend on how
    many rows it spans (docs/design.md §13.1), and the server and the session's LLM reach a prompt with
    different prefix-cache states (a cached prefix shortens the prompt's products). Tokens are compared exactly."""
    return pytest.approx(float(np.float32(value)), rel=2e-6, abs=2e-6)


def token_text(served_llm, token_id: int) -> str:
    return served_llm.tokenizer.decode([token_id], skip_special_tokens=False)


def test_chat_logprobs_equal_llm(client, served_llm):
    messages = [{"role": "user", "content": "name a colour"}]
    reply = client.chat.completions.create(model="nemodiff", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    want = served_llm.generate(served_llm.tokenizer.encode_chat("name a colour"),
                        SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3))[0]
    content = reply.choices[0].logprobs.content
    assert len(content) == len(want.output_ids) == 6
    for entry, token, lp in zip(content, want.output_ids, want.logprobs):
        assert entry.token == token_text(served_llm, token) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == f32(lp.logprob)
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [(token_text(served_llm, i), f32(v)) for i, v in lp.top]
        assert all(t.bytes == list(t.token.encode()) for t in entry.top_logprobs)
    plain = client.chat.completions.create(model="nemodiff", messages=messages, max_tokens=2, logprobs=True)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []
    assert client.chat.completions.create(model="nemodiff", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_equal_llm_streamed_or_not(client, served_llm):
    """The server's log-probabilities are LLM.generate's, for a prompt seen first and then again (cached)."""
    prompt = "the cat sat still"  # used by no other test on this server or this LLM
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2, mode="linear-spec", block_length=4)
    want = served_llm.generate(prompt, params)[0]
    extra = {"ignore_eos": True, "decode_mode": "linear-spec", "block_length": 4}
    reply = client.completions.create(model="nemodiff", prompt=prompt, max_tokens=8, logprobs=2, extra_body=extra)
    got = reply.choices[0].logprobs
    tokens = [token_text(served_llm, t) for t in want.output_ids]
    assert got.tokens == tokens and got.token_logprobs == [f32(e.logprob) for e in want.logprobs]
    assert got.top_logprobs == [{token_text(served_llm, i): f32(v) for i, v in e.top} for e in want.logprobs]
    assert got.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    again = served_llm.generate(prompt, params)[0]
    chunks = list(client.completions.create(model="nemodiff", prompt=prompt, max_tokens=8, logprobs=2,
                                            stream=True, extra_body=extra))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(streamed) >= 2  # each chunk carries its own tokens' log-probabilities
    assert sum((s.tokens for s in streamed), []) == tokens
    assert sum((s.token_logprobs for s in streamed), []) == [f32(e.logprob) for e in again.logprobs]
    assert sum((s.text_offset for s in streamed), []) == got.text_offset


def test_n_at_temperature_zero_repeats_the_single_answer(client, served_llm):
    want = served_llm.generate("the dog", SamplingParams(max_new_tokens=10))[0]
    reply = client.completions.create(model="nemodiff", prompt="the dog", max_tokens=10, n=3, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [want.text] * 3
    assert reply.usage.prompt_tokens == len(want.prompt_ids)
    assert reply.usage.completion_tokens == 3 * len(want.output_ids)


def test_n_with_a_seed_gives_distinct_reproducible_choices(client, served_llm):
    ask = dict(model="nemodiff", prompt="the river", max_tokens=12, n=3, temperature=1.0, seed=7,
               extra_body={"ignore_eos": True})
    first = [c.text for c in client.completions.create(**ask).choices]
    again = [c.text for c in client.completions.create(**ask).choices]
    want = served_llm.generate("the river", SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, n=3,
                                                    ignore_eos=True))
    assert first == again == [o.text for o in want]
    assert len(set(first)) == 3


def test_stream_with_n_interleaves_choices_by_index(client, served_llm):
    messages = [{"role": "user", "content": "count"}]
    chunks = list(client.chat.completions.create(
        model="nemodiff", messages=messages, max_tokens=16, n=2, temperature=1.0, seed=3, stream=True,
        logprobs=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    assert set(order) == {0, 1} and order != sorted(order)  # interleaved, not one choice after the other
    texts, reasons, lengths = ["", ""], [None, None], [0, 0]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
            lengths[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
    want = served_llm.generate(served_llm.tokenizer.encode_chat("count"), SamplingParams(max_new_tokens=16, temperature=1.0,
                                                                           seed=3, n=2, ignore_eos=True))
    assert texts == [o.text for o in want] and reasons == ["length", "length"] and lengths == [16, 16]
    assert chunks[-1].usage.completion_tokens == 32


def test_best_of_and_n_above_the_cap_are_400(client, server):
    for extra, param in (({"best_of": 2}, "best_of"), ({"n": MAX_N + 1}, "n")):
        body = json.dumps({"model": "nemodiff", "prompt": "hi", "max_tokens": 2} | extra).encode()
        request = urllib.request.Request(f"{server.openai_url}/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        error = json.loads(caught.value.read())["error"]
        assert caught.value.code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       top_logprobs=2)  # without logprobs=true


def test_cached_tokens_on_a_repeated_long_prompt(client):
    ask = dict(model="nemodiff", prompt=LONG_PROMPT + " once", max_tokens=2)
    client.completions.create(**ask)
    again = client.completions.create(**ask)
    assert again.usage.prompt_tokens_details.cached_tokens >= 40
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    chat = [{"role": "user", "content": LONG_PROMPT}]
    client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=2)
    assert client.chat.completions.create(model="nemodiff", messages=chat,
                                          max_tokens=2).usage.prompt_tokens_details.cached_tokens >= 40


def grpc_run(server, prompt: str, **fields) -> list:
    """Every response of one gRPC request, in order."""
    stream = GrpcStream(server.grpc)
    results = []
    try:
        stream.send("r", prompt, **fields)
        while True:
            _, result, error, final = stream.next()
            assert error is None, error
            if result is not None and result.as_numpy("text_output") is not None:
                results.append(result)
            if final:
                return results
    finally:
        stream.close()


def values(result, name: str) -> list:
    array = result.as_numpy(name)
    return [] if array is None else array.reshape(-1).tolist()


@pytest.mark.parametrize("stream", [False, True])
def test_triton_log_probs_equal_llm(server, served_llm, stream):
    want = served_llm.generate("the blue tree", SamplingParams(max_new_tokens=8, mode="diffusion", block_length=4,
                                                       ignore_eos=True, logprobs=2))[0]
    results = grpc_run(server, "the blue tree", max_tokens=8, decode_mode="diffusion", block_length=4,
                       ignore_eos=True, return_log_probs=True, top_logprobs=2, stream=stream)
    assert sum((values(r, "output_ids") for r in results), []) == want.output_ids
    got = sum((values(r, "output_log_probs") for r in results), [])
    assert got == [f32(e.logprob) for e in want.logprobs]
    assert values(results[-1], "cum_log_probs") == [f32(want.cumulative_logprob)]
    top_ids = sum((r.as_numpy("output_top_token_ids").reshape(-1, 2).tolist() for r in results), [])
    assert top_ids == [[i for i, _ in e.top] for e in want.logprobs]
    assert results[-1].as_numpy("sequence_index") is None  # one sequence: no index
    plain = grpc_run(server, "the blue tree", max_tokens=4)
    assert plain[-1].as_numpy("output_log_probs") is None


@pytest.mark.parametrize("stream", [False, True])
def test_triton_num_return_sequences(server, served_llm, stream):
    want = served_llm.generate("green stone", SamplingParams(max_new_tokens=6, temperature=1.0, seed=11, n=3,
                                                     ignore_eos=True))
    results = grpc_run(server, "green stone", max_tokens=6, temperature=1.0, random_seed=11, ignore_eos=True,
                       num_return_sequences=3, stream=stream)
    ids = {0: [], 1: [], 2: []}
    for result in results:
        ids[values(result, "sequence_index")[0]] += values(result, "output_ids")
    assert [ids[i] for i in range(3)] == [o.output_ids for o in want]
    if not stream:
        assert len(results) == 3
    too_many = GrpcStream(server.grpc)
    try:
        too_many.send("r", "green stone", max_tokens=2, num_return_sequences=MAX_N + 1)
        _, _, error, _ = too_many.next()
        assert error is not None and "num_return_sequences" in str(error)
    finally:
        too_many.close()


def test_cache_salt_separates_tenants_on_both_ports(client, server):
    """A secret prompt sent with one salt is found again only with the same salt: a guess with another salt
    or none gets cached_tokens 0 (OpenAI usage and Triton's num_cached_tokens alike)."""
    secret = "salted secret " + LONG_PROMPT

    def cached(salt=None, prompt=secret):
        extra = {} if salt is None else {"cache_salt": salt}
        return client.completions.create(model="nemodiff", prompt=prompt, max_tokens=1,
                                         extra_body=extra).usage.prompt_tokens_details.cached_tokens

    assert cached("alice") == 0
    assert cached("bob") == 0 and cached() == 0
    assert cached("alice") >= 40
    assert values(grpc_run(server, secret, max_tokens=1, cache_salt="mallory")[-1], "num_cached_tokens") == [0]
    assert values(grpc_run(server, secret, max_tokens=1, cache_salt="alice")[-1], "num_cached_tokens")[0] >= 40
    for bad in ("", "x" * 1025, 7):
        with pytest.raises(openai.BadRequestError, match="cache_salt must be a non-empty string"):
            client.completions.create(model="nemodiff", prompt="hi", max_tokens=1, extra_body={"cache_salt": bad})
    stream = GrpcStream(server.grpc)
    try:
        stream.send("r", "hi", max_tokens=1, cache_salt="")
        _, _, error, _ = stream.next()
        assert error is not None and "cache_salt must be a non-empty string" in str(error)
    finally:
        stream.close()


def test_triton_num_cached_tokens_and_prefix_metrics(server):
    before = server.metrics()
    first = grpc_run(server, "twice " + LONG_PROMPT, max_tokens=2)
    second = grpc_run(server, "twice " + LONG_PROMPT, max_tokens=2)
    assert values(first[-1], "num_cached_tokens") == [0]
    assert values(second[-1], "num_cached_tokens")[0] >= 40
    queries = hits = 0.0
    for _ in range(50):
        after = server.metrics()
        queries = after["nemodiff_prefix_cache_queries_total"] - before.get("nemodiff_prefix_cache_queries_total", 0)
        hits = after["nemodiff_prefix_cache_hits_total"] - before.get("nemodiff_prefix_cache_hits_total", 0)
        if hits >= 40:
            break
        time.sleep(0.1)
    assert queries >= 2 * values(first[-1], "num_input_tokens")[0] and hits >= values(second[-1],
                                                                                      "num_cached_tokens")[0]


def test_triton_logit_bias_min_tokens_and_min_length(server, served_llm):
    eos = min(served_llm.engine.eos_ids)
    bias = json.dumps({str(eos): 100})
    for mode in ("ar", "linear-spec"):
        want = served_llm.generate("the blue tree", SamplingParams(max_new_tokens=8, logit_bias={eos: 100}, min_tokens=3,
                                                           mode=mode, block_length=4))[0]
        results = grpc_run(server, "the blue tree", max_tokens=8, logit_bias=bias, min_tokens=3, decode_mode=mode,
                           block_length=4)
        assert sum((values(r, "output_ids") for r in results), []) == want.output_ids and len(want.output_ids) == 4
    for min_length in (8, 20):  # min_length >= max_tokens: exactly max_tokens, end-of-sequence held back
        results = grpc_run(server, "the blue tree", max_tokens=8, logit_bias=bias, min_length=min_length)
        ids = sum((values(r, "output_ids") for r in results), [])
        assert len(ids) == 8 and eos not in ids
    for fields, message in ((dict(logit_bias='{"x": 1}'), "logit_bias keys"),
                            (dict(logit_bias='{"3": 101}'), "logit_bias values"),
                            (dict(min_tokens=9), "exceeds max_tokens"),
                            (dict(embedding_bias_words=["a"]), "embedding_bias_words is not supported")):
        stream = GrpcStream(server.grpc)
        try:
            stream.send("r", "hi", max_tokens=8, **fields)
            _, _, error, _ = stream.next()
            assert error is not None and message in str(error), (fields, error)
        finally:
            stream.close()
