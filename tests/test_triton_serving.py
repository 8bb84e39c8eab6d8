"""Serving: a real `nemodiff serve` (tritonserver + the nemodiff Python model) driven by HTTP and gRPC.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: tested here]

Every output is checked token for token against `LLM(engine).generate` in this process.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from triton_helpers import NEMODIFF, GrpcStream, Server, grpc_inputs, ids_of

from helpers import make_checkpoint, make_engine, penalized_greedy, transformers_model
from nemodiff import LLM, SamplingParams
from nemodiff.serving.cli import parse_bytes

MAX_SEQ_LEN = 256
WORDS = "the model token block mask draft verify cache page fast red green blue cat dog tree river stone".split()


def prompt_text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 5))


def params_for(mode: str, max_tokens: int, block_length: int | None = None, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, mode=mode, block_length=block_length, **extra)


def payload_for(prompt: str, params: SamplingParams, **extra) -> dict:
    payload = {"text_input": prompt, "max_tokens": params.max_new_tokens, "decode_mode": params.mode}
    if params.block_length is not None:
        payload["block_length"] = params.block_length
    return payload | extra


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    checkpoint = make_checkpoint(root / "ckpt", lora_rank=4)
    return make_engine(checkpoint, root / "engine", kv_page_size=4, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def llm(engine_dir):
    return LLM(engine_dir, device="cpu")


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    served = Server(engine_dir, tmp_path_factory.mktemp("logs") / "serve.log").start()
    yield served
    assert served.stop() == 0, served.log()[-3000:]
    assert "server stopped" in served.log()


def expect(llm, prompt: str, params: SamplingParams):
    return llm.generate(prompt, SamplingParams(**vars(params)))[0]


def check_http(body: dict, want) -> None:
    assert ids_of(body["output_ids"]) == want.output_ids
    assert body["text_output"] == want.text
    assert body["num_output_tokens"] == len(want.output_ids)


MODE_CASES = [("ar", None), ("diffusion", None), ("linear-spec", None), ("quadratic-spec", 4)]


@pytest.mark.parametrize("mode,block", MODE_CASES)
def test_http_generate_equals_llm(server, llm, mode, block):
    prompt = prompt_text(3)
    params = params_for(mode, 24, block)
    status, body = server.generate(payload_for(prompt, params))
    assert status == 200, body
    want = expect(llm, prompt, params)
    check_http(body, want)
    assert body["num_forward_passes"] == want.num_forward_passes


def test_http_generate_sampling_and_stops(server, llm):
    prompt = prompt_text(5)
    params = params_for("ar", 32, temperature=0.8, top_k=40, top_p=0.95, seed=1234)
    status, body = server.generate(payload_for(prompt, params, temperature=0.8, top_k=40, top_p=0.95,
                                               random_seed=1234))
    assert status == 200, body
    check_http(body, expect(llm, prompt, params))
    # the frontend's text and the ids it stopped at: end_id and stop_words end generation exactly
    greedy = expect(llm, prompt, params_for("linear-spec", 32))
    end_id = greedy.output_ids[5]
    params = params_for("linear-spec", 32, stop_token_ids=[end_id])
    status, body = server.generate(payload_for(prompt, params, end_id=end_id))
    assert status == 200, body
    check_http(body, expect(llm, prompt, params))
    assert ids_of(body["output_ids"])[-1] == end_id
    stop = greedy.text[3:5] if len(greedy.text) >= 5 else None
    if stop and stop.strip():
        params = params_for("ar", 32, stop=[stop])
        status, body = server.generate(payload_for(prompt, params, stop_words=[stop]))
        assert status == 200, body
        check_http(body, expect(llm, prompt, params))


def test_http_input_ids(server, llm):
    ids = [1, 40, 50, 60, 70]
    params = params_for("quadratic-spec", 12, 4)
    status, body = server.generate(payload_for("ignored", params, input_ids=ids))
    assert status == 200, body
    check_http(body, llm.generate([ids], SamplingParams(**vars(params)))[0])


@pytest.mark.parametrize("mode,block", [("ar", None), ("linear-spec", 4)])
def test_http_stream_deltas(server, llm, mode, block):
    prompt = prompt_text(1)
    params = params_for(mode, 40, block)
    status, events = server.generate_stream(payload_for(prompt, params, stream=True))
    assert status == 200, events
    want = expect(llm, prompt, params)
    assert len(events) >= 3
    assert all("error" not in e for e in events)
    assert "".join(e["text_output"] for e in events) == want.text
    assert [i for e in events for i in ids_of(e.get("output_ids"))] == want.output_ids
    # per-response counts, as Triton's OpenAI frontend sums them
    assert sum(e["num_output_tokens"] for e in events) == len(want.output_ids)
    assert [e["num_input_tokens"] for e in events] == [len(llm.tokenizer.encode(prompt))] + [0] * (len(events) - 1)
    assert events[-1]["finish_reason"] == want.finish_reason
    assert all(e["text_output"] for e in events[:-1])  # only the final response may carry no text


def test_grpc_stream_deltas(server, llm):
    prompt = prompt_text(2)
    params = params_for("diffusion", 48, 8)
    stream = GrpcStream(server.grpc)
    try:
        stream.send("r1", prompt, max_tokens=48, decode_mode="diffusion", block_length=8, stream=True)
        texts, ids, finals, counted = [], [], 0, 0
        for _ in range(200):
            request_id, result, error, final = stream.next()
            assert error is None, error
            assert request_id == "r1"
            texts.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            ids += result.as_numpy("output_ids").reshape(-1).tolist()
            counted += int(result.as_numpy("num_output_tokens").reshape(-1)[0])
            if final:
                finals += 1
                assert counted == len(ids)
                break
    finally:
        stream.close()
    want = expect(llm, prompt, params)
    assert finals == 1
    assert len(texts) >= 3
    assert "".join(texts) == want.text
    assert ids == want.output_ids


MIXED_BLOCKS = {"ar": None, "diffusion": 4, "linear-spec": 4, "quadratic-spec": 4}


def mixed_cases(n: int, max_tokens: int, blocks: dict[str, int | None]):
    modes = list(blocks)
    cases = []
    for i in range(n):
        mode = modes[i % len(modes)]
        cases.append((prompt_text(i), params_for(mode, max_tokens - (i % 3) * 4, blocks[mode])))
    return cases


_REFERENCES: dict[tuple, object] = {}


def references(llm, cases):
    """`LLM.generate` outputs for (prompt, params) cases, batched, each computed once per session."""
    def key(case):
        return case[0], repr(case[1])

    todo = list({key(c): c for c in cases if key(c) not in _REFERENCES}.values())
    if todo:
        outputs = llm.generate([p for p, _ in todo], [SamplingParams(**vars(q)) for _, q in todo])
        _REFERENCES.update({key(c): out for c, out in zip(todo, outputs)})
    return [_REFERENCES[key(c)] for c in cases]


def run_concurrently(server, llm, cases) -> None:
    wants = references(llm, cases)
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: server.generate(payload_for(*case)), cases))
    for (status, body), want, case in zip(replies, wants, cases):
        assert status == 200, (case, body)
        assert ids_of(body["output_ids"]) == want.output_ids, case
        assert body["text_output"] == want.text, case


def test_32_concurrent_mixed_modes(server, llm):
    cases = mixed_cases(32, 24, MIXED_BLOCKS)
    run_concurrently(server, llm, cases)
    wait_idle(server)


def wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics["nemodiff_kv_cache_pages_used"] == 0 and metrics["nemodiff_requests_running"] == 0 \
                and metrics["nemodiff_requests_waiting"] == 0:
            return metrics
        time.sleep(0.1)
    raise AssertionError(f"the engine did not go idle: {server.metrics()}")


def test_preemption_keeps_outputs_exact(engine_dir, llm, tmp_path):
    # 48 KiB = 24 pages of 4 tokens (2 KiB each in fp32): room for about two of these sequences at once
    small = Server(engine_dir, tmp_path / "serve.log", "--kv-cache-memory", "48KiB", "--max-batch-size", "8").start()
    try:
        assert small.metrics()["nemodiff_kv_cache_pages_total"] == 24
        cases = mixed_cases(8, 24, MIXED_BLOCKS)  # the first 8 of the 32 above: same references
        run_concurrently(small, llm, cases)
        metrics = wait_idle(small)
        assert metrics["nemodiff_preemptions_total"] > 0
    finally:
        assert small.stop() == 0, small.log()[-3000:]


def long_prompt(llm, max_tokens: int) -> str:
    """A prompt whose greedy AR output runs to max_tokens (random weights may say EOS early)."""
    for i in range(1, 7):
        if expect(llm, prompt_text(i), params_for("ar", max_tokens)).finish_reason == "length":
            return prompt_text(i)
    pytest.fail("no candidate prompt runs to the length limit on this fixture checkpoint")


def test_grpc_cancel_frees_pages(server, llm):
    # quadratic-spec with k=16 returns AR's tokens at one forward of 272 tokens per token on these random
    # weights: slow enough (about 0.1 s a token on CPU) that the cancel always lands mid-generation
    max_tokens = 160
    prompt = long_prompt(llm, max_tokens)
    counter = 'nemodiff_output_tokens_total{mode="quadratic-spec"}'
    before = server.metrics()[counter]
    stream = GrpcStream(server.grpc)
    try:
        stream.send("long", prompt, max_tokens=max_tokens, decode_mode="quadratic-spec", block_length=16,
                    stream=True)
        for _ in range(2):
            _, _, error, final = stream.next()
            assert error is None and not final
    finally:
        stream.close(cancel=True)
    metrics = wait_idle(server)
    assert metrics[counter] - before < max_tokens  # it stopped early
    status, body = server.generate({"text_input": prompt, "max_tokens": 4})
    assert status == 200 and body["num_output_tokens"] == 4


BAD_INPUTS = [
    ({"decode_mode": "bogus"}, "unknown decode mode"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"max_tokens": MAX_SEQ_LEN + 1}, "max_seq_len"),
    ({"threshold": 1.5}, "threshold must be in (0, 1]"),
    ({"threshold": 0.0}, "threshold must be in (0, 1]"),
    ({"text_input": "cat " * (MAX_SEQ_LEN + 8)}, "max_seq_len"),
    ({"end_id": 100000}, "outside the vocabulary"),
    ({"bad_words": ["cat"]}, "bad_words is not supported"),
    ({"decode_mode": "quadratic-spec", "block_length": 64}, "exceeds the engine's block length"),
    ({"input_ids": [1, 99999]}, "prompt ids must be in"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"image_bytes_input": ["iVBORw0KGgo="]}, "no vision tower"),  # a text-only engine refuses images
]


@pytest.mark.parametrize("fields,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_http_bad_input_is_invalid_arg(server, fields, message):
    status, body = server.generate({"text_input": "the cat", "max_tokens": 8} | fields)
    assert status == 400, body
    assert message in body["error"]
    status, body = server.generate({"text_input": "the cat", "max_tokens": 3})
    assert status == 200 and body["num_output_tokens"] == 3


def test_grpc_bad_input_is_an_error_response(server):
    # A gRPC stream carries an error as its message only (ModelStreamInferResponse has no status code);
    # the INVALID_ARG code itself shows as HTTP 400 above.
    stream = GrpcStream(server.grpc)
    try:
        for fields, message in BAD_INPUTS:
            fields = {"max_tokens": 8} | fields
            stream.send("bad", fields.pop("text_input", "the cat"), **fields)
            _, _, error, _ = stream.next()
            assert error is not None and message in error.message(), (fields, error)
        stream.send("good", "the cat", max_tokens=3)
        request_id, result, error, final = stream.next()
        assert error is None and final and request_id == "good"
        assert result.as_numpy("num_output_tokens").reshape(-1)[0] == 3
    finally:
        stream.close()


def test_wrong_dtype_is_an_error_and_serving_goes_on(server):
    status, body = server.generate({"text_input": "the cat", "max_tokens": "16"})
    assert status >= 400 and "error" in body
    status, body = server.generate(b"{not json")
    assert status >= 400
    import tritonclient.grpc as grpcclient

    stream = GrpcStream(server.grpc)
    try:
        inputs = grpc_inputs("the cat")
        wrong = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
        wrong.set_data_from_numpy(np.array([[8.0]], dtype=np.float32))
        stream.client.async_stream_infer("nemodiff", inputs + [wrong], request_id="wrong")
        _, _, error, _ = stream.next()
        assert error is not None and "max_tokens" in error.message()
    finally:
        stream.close()
    status, body = server.generate({"text_input": "the cat", "max_tokens": 2})
    assert status == 200 and body["num_output_tokens"] == 2


def test_penalties_equal_the_oracle_and_auto_is_counted(server, llm, engine_dir):
    """TensorRT-LLM's repetition_penalty, frequency_penalty and presence_penalty: greedy output equals
    transformers' logits with vLLM's penalty rules in AR, both spec modes and auto; refusals name the field."""
    prompt = "the cat sat on the mat and the cat"
    want = penalized_greedy(transformers_model(engine_dir.parent / "ckpt"), llm.tokenizer.encode(prompt), 16,
                            1.3, 0.4, 0.3)
    for mode in ("ar", "linear-spec", "quadratic-spec", "auto"):
        status, body = server.generate({"text_input": prompt, "max_tokens": 16, "decode_mode": mode, "block_length": 4,
                                        "ignore_eos": True, "repetition_penalty": 1.3, "frequency_penalty": 0.4,
                                        "presence_penalty": 0.3})
        assert status == 200 and ids_of(body["output_ids"]) == want, (mode, body)
    forwards = body["num_forward_passes"]  # the auto request's
    for name, value in (("repetition_penalty", -1.0), ("presence_penalty", 3.0)):
        status, body = server.generate({"text_input": "hi", "max_tokens": 2, name: value})
        assert status == 400 and f"{name} must be a number in" in body["error"], body
    deadline, names = time.monotonic() + 30, {f'nemodiff_auto_mode_steps_total{{mode="{m}"}}'
                                              for m in ("ar", "linear-spec", "quadratic-spec")}
    while sum(server.metrics().get(name, 0) for name in names) < forwards and time.monotonic() < deadline:
        time.sleep(0.1)  # the counters are refreshed by the model's watcher
    assert sum(server.metrics()[name] for name in names) >= forwards


def test_metrics_are_exported(server):
    status, _ = server.generate({"text_input": "the cat", "max_tokens": 8, "decode_mode": "linear-spec",
                                 "block_length": 4})
    assert status == 200
    metrics = server.metrics()
    names = {key.split("{")[0] for key in metrics}
    for name in ("nemodiff_kv_cache_pages_used", "nemodiff_kv_cache_pages_total", "nemodiff_requests_running",
                 "nemodiff_requests_waiting", "nemodiff_output_tokens_total", "nemodiff_forward_passes_total",
                 "nemodiff_time_to_first_token_seconds_count", "nemodiff_accepted_length_count"):
        assert name in names, name
    assert metrics['nemodiff_output_tokens_total{mode="linear-spec"}'] >= 8
    assert metrics['nemodiff_accepted_length_count{mode="linear-spec"}'] >= 1
    assert metrics['nemodiff_time_to_first_token_seconds_count{mode="linear-spec"}'] >= 1


def test_serve_rejects_bad_arguments(tmp_path, engine_dir):
    missing = subprocess.run([str(NEMODIFF), "serve", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode != 0 and "Error" in missing.stderr
    size = subprocess.run([str(NEMODIFF), "serve", str(engine_dir), "--kv-cache-memory", "lots"],
                          capture_output=True, text=True)
    assert size.returncode != 0 and "--kv-cache-memory" in size.stderr
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("30KiB") == 30720 and parse_bytes("512") == 512


def test_serve_refuses_a_corrupt_engine_before_starting_triton(engine_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    (broken / "weights.safetensors").write_bytes(b"not weights")
    result = subprocess.run([str(NEMODIFF), "serve", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "weights.safetensors" in result.stderr and "manifest" in result.stderr
    assert "tritonserver" not in result.stderr


def test_serve_reports_a_server_that_dies_at_startup(engine_dir, tmp_path):
    # The engine is sound but its KV cache cannot hold one page: the backend fails to load it inside Triton.
    server = Server(engine_dir, tmp_path / "serve.log", "--kv-cache-memory", "1KiB", "--model-repo",
                    str(tmp_path / "repo"), "--no-prefix-cache", "--max-n", "3")
    with pytest.raises(RuntimeError, match="exited"):
        server.start(timeout=120)
    assert server.process.returncode != 0
    assert "exited during startup" in server.log()
    config = (tmp_path / "repo" / "nemodiff" / "config.pbtxt").read_text()  # what the model was given
    assert 'key: "prefix_cache", value: { string_value: "false" }' in config
    assert 'key: "max_n", value: { string_value: "3" }' in config
