"""Images through every interface: the CLI's --image, Triton's image_bytes_input over HTTP and gRPC with a
real `nemodiff serve`, and OpenAI image_url parts with the official client; bad images get clear errors
and the server keeps serving.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton / OpenAI / CLI with images: tested here]

Every output is checked token for token against `LLM(engine).generate` in this process.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai  # noqa: E402
import pytest
from PIL import Image
from test_serving_resilience import wait_metrics
from triton_helpers import NEMODIFF, GrpcStream, Server, ids_of

from helpers import make_engine, make_vlm_checkpoint, png_bytes
from nemodiff import LLM, SamplingParams

RED, BLUE, WIDE = png_bytes(40, 24, seed=1), png_bytes(100, 75, seed=2), png_bytes(9, 30, seed=3)
PROMPT = "the cat [IMG] and the dog"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{b64(data)}"


def greedy(max_new_tokens: int = 8, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **extra)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-serving")
    return make_engine(make_vlm_checkpoint(root / "ckpt"), root / "engine", kv_page_size=4, max_seq_len=256)


@pytest.fixture(scope="module")
def llm(engine_dir):
    return LLM(engine_dir, device="cpu")


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    # requests that name no mode run "auto": at temperature 0 they must equal the LLM's AR output
    served = Server(engine_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--default-mode", "auto",
                    openai=True).start()
    yield served
    assert served.stop() == 0, served.log()[-3000:]


def test_cli_image_flag(engine_dir, llm, engine_fp32, tmp_path):
    (tmp_path / "red.png").write_bytes(RED)
    (tmp_path / "blue.png").write_bytes(BLUE)
    (tmp_path / "bad.png").write_bytes(b"this is no image")

    def generate(engine, *args):
        return subprocess.run([str(NEMODIFF), "generate", str(engine), "--max-new-tokens", "8", "--json", *args],
                              capture_output=True, text=True)

    both = generate(engine_dir, "--prompt-ids", "1,3,10,150,10,4", "--image", tmp_path / "red.png",
                    "--image", tmp_path / "blue.png", "--mode", "linear-spec", "--block-length", "4")
    assert both.returncode == 0, both.stderr
    want = llm.generate([1, 3, 10, 150, 10, 4], SamplingParams(max_new_tokens=8), images=[RED, BLUE])[0]
    assert json.loads(both.stdout)["output_ids"] == want.output_ids
    bad = generate(engine_dir, "--prompt", PROMPT, "--image", tmp_path / "bad.png")
    assert bad.returncode != 0 and "image 0: not a decodable image" in bad.stderr
    text_only = generate(engine_fp32, "--prompt", "hi", "--image", tmp_path / "red.png")
    assert text_only.returncode != 0 and "no vision tower" in text_only.stderr


def test_triton_http_and_grpc_take_encoded_images(server, llm):
    want = llm.generate(PROMPT, greedy(), images=[RED])[0]
    status, body = server.generate({"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True,
                                    "image_bytes_input": [b64(RED)]})  # JSON carries base64
    assert status == 200, body
    assert ids_of(body["output_ids"]) == want.output_ids and body["text_output"] == want.text
    assert body["num_input_tokens"] == len(want.prompt_ids)
    deadline = time.monotonic() + 30  # --default-mode auto: it ran as auto (counters refresh in the background)
    while not any(v for k, v in server.metrics().items() if k.startswith("nemodiff_auto_mode_steps_total")):
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.1)
    status, events = server.generate_stream({"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True,
                                             "stream": True, "decode_mode": "quadratic-spec", "block_length": 4,
                                             "image_bytes_input": [data_url(RED)]})
    assert status == 200 and sum((ids_of(e.get("output_ids")) for e in events), []) == want.output_ids

    two = llm.generate("[IMG] red [IMG] blue", greedy(6, mode="diffusion", block_length=4), images=[RED, BLUE])[0]
    stream = GrpcStream(server.grpc)
    try:
        stream.send("a", "[IMG] red [IMG] blue", max_tokens=6, ignore_eos=True, decode_mode="diffusion",
                    block_length=4, image_bytes_input=[RED, BLUE])  # gRPC carries the files' bytes
        request_id, result, error, final = stream.next()
        assert error is None and final and request_id == "a"
        assert result.as_numpy("output_ids").reshape(-1).tolist() == two.output_ids
    finally:
        stream.close()


def test_triton_bad_images_are_invalid_and_the_server_keeps_serving(server, llm):
    hits = server.metrics().get("nemodiff_vision_cache_hits_total", 0.0)
    cases = [([b64(b"\x89PNG\r\n\x1a\n garbage")], "not a decodable image"),
             (["data:image/png;base64,@@@"], "invalid base64"),
             ([b64(RED)] * 3, "1 image placeholders for 3 images"),  # the prompt has one [IMG]
             ([b64(png_bytes(64, 64, seed=i)) for i in range(4)], "more than the context leaves")]
    for images, message in cases:
        text = PROMPT if len(images) != 4 else "the cat"
        status, body = server.generate({"text_input": text, "max_tokens": 8, "image_bytes_input": images})
        assert status == 400 and message in body["error"], (message, body)
    stream = GrpcStream(server.grpc)
    try:
        stream.send("bad", PROMPT, max_tokens=4, image_bytes_input=[b"GIF89a and nothing else"])
        _, _, error, final = stream.next()
        assert error is not None and final and "not a decodable image" in error.message()  # INVALID_ARG: HTTP 400 above
    finally:
        stream.close()
    want = llm.generate(PROMPT, greedy(), images=[RED])[0]
    status, body = server.generate({"text_input": PROMPT, "max_tokens": 8, "ignore_eos": True,
                                    "image_bytes_input": [b64(RED)]})
    assert status == 200 and ids_of(body["output_ids"]) == want.output_ids
    # the same image again: no tower run (the model refreshes its metrics a few times a second)
    wait_metrics(server, lambda m: m.get("nemodiff_vision_cache_hits_total", 0.0) > hits)


def test_openai_image_url_parts(server, llm):
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)
    content = [{"type": "text", "text": "what is "}, {"type": "image_url", "image_url": {"url": data_url(BLUE)}},
               {"type": "text", "text": " here"}]
    want = llm.generate("what is [IMG] here", greedy(10), chat=True, images=[BLUE])[0]
    reply = client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": content}],
                                           max_tokens=10, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == len(want.prompt_ids) and reply.usage.completion_tokens == 10
    chunks = client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": content}],
                                            max_tokens=10, stream=True,
                                            extra_body={"ignore_eos": True, "decode_mode": "linear-spec"})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text

    def refused(url: str) -> str:
        part = {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="nemodiff", max_tokens=4,
                                           messages=[{"role": "user", "content": [part]}])
        return bad.value.body["message"]

    assert "does not fetch remote images" in refused("https://example.com/cat.png")
    assert "not a decodable image" in refused("data:image/png;base64," + b64(b"nope"))
    assert "must be base64-encoded" in refused("data:image/png,rawdata")
    huge = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 64, seed=i))}} for i in range(4)]
    with pytest.raises(openai.BadRequestError, match="4 image"):
        client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": huge}])
    again = client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": content}],
                                           max_tokens=10, extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == want.text


def big_png(side: int = 5000) -> bytes:
    """A PNG of side x side RGBA pixels, small to send (110 KB) and about a second to decode and resize."""
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(out, "PNG")
    return out.getvalue()


def test_image_decoding_never_delays_a_text_request(server, llm):
    big = b64(big_png())
    # pixels are bounded per request too, from the image headers, before anything is decoded
    status, body = server.generate({"text_input": "[IMG] [IMG] [IMG]", "max_tokens": 2, "image_bytes_input": [big] * 3})
    assert status == 400 and "too many pixels" in body["error"], body
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{big}"}}
    with pytest.raises(openai.BadRequestError, match="too many pixels"):  # the real reason, on the OpenAI port too
        client.chat.completions.create(model="nemodiff", max_tokens=2, messages=[{"role": "user", "content": [part] * 3}])

    def timed(payload: dict) -> tuple[int, float]:
        status, _ = server.generate(payload)
        return status, time.monotonic()

    with ThreadPoolExecutor(2) as pool:  # two requests whose images take about a second each to decode
        heavy = [pool.submit(timed, {"text_input": PROMPT, "max_tokens": 2, "image_bytes_input": [big]})
                 for _ in range(2)]
        time.sleep(0.2)
        sent = time.monotonic()
        status, done = timed({"text_input": "the cat", "max_tokens": 2})  # sent after them, answered before them
        heavy = [future.result() for future in heavy]
    assert status == 200 and all(s == 200 for s, _ in heavy)
    assert done < min(t for _, t in heavy) and done - sent < 1.0, (done - sent, [t - sent for _, t in heavy])
