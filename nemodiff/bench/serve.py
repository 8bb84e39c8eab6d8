"""`nemodiff bench --serve URL`: load a running server and measure what clients see.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: load on a running server]

Drives the nemodiff model over Triton's gRPC streaming API (`URL` = `grpc://host:8001` or
`host:8001`), or an OpenAI-compatible HTTP API (`URL` = `http://host:8000`: NVIDIA Dynamo's frontend
with nemodiff workers behind it, or `nemodiff serve --openai-port`), one stream per request, like
genai-perf. For each concurrency level, that many clients send requests back to back for a fixed
duration (mixed decode modes by default). Reported per level: requests completed, errors, refused (UNAVAILABLE, the queue
limit), output tokens/s, time to first token and inter-token latency percentiles.

Over HTTP the decode mode travels as nemodiff's own `decode_mode` field (with `ignore_eos`, so every
request generates max_tokens), or as Dynamo's `nvext.annotations` entry `decode_mode:<mode>` when the
server refuses nemodiff's fields (found with one probe request);
output tokens are the usage the server reports, and as a chunk may carry several tokens, the
inter-token latency is (last chunk - first chunk) / (tokens - 1).

`each_mode` runs one level per mode and concurrency (fixed modes side by side, `auto` included) in the
same run against the same server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

import aiohttp

from nemodiff.serving.openai.backend import BackendError, TritonBackend

PROMPTS = ["Noah says the table of four.", "Once upon a time, Mia went to the", "One, two, three,",
           "On Monday we plan to", "The cat sat on the", "Two times three is"]


@dataclass
class StreamResult:
    """One request as the client saw it."""

    ok: bool = False
    status: int | None = None  # HTTP-style status of an error (503 = refused)
    error: str | None = None
    text: str = ""
    num_output_tokens: int = 0
    finish_reason: str | None = None
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one per generated token (a response's tokens share it)
    end: float = 0.0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def itl(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


async def stream_request(backend: TritonBackend, fields: dict, stop_after_tokens: int | None = None) -> StreamResult:
    """Send one streaming request; with stop_after_tokens, hang up once that many tokens arrived."""
    result = StreamResult(start=time.perf_counter())
    pieces = backend.generate(fields | {"stream": True})
    try:
        async for piece in pieces:
            now = time.perf_counter()
            result.text += piece.text
            result.num_output_tokens += piece.num_output_tokens
            result.token_times += [now] * piece.num_output_tokens
            if piece.final:
                result.ok, result.finish_reason = True, piece.finish_reason
                break
            if stop_after_tokens is not None and result.num_output_tokens >= stop_after_tokens:
                break  # closing the generator cancels the stream, as a client that went away
    except BackendError as exc:
        result.status, result.error = exc.status, exc.message
    finally:
        await pieces.aclose()
    result.end = time.perf_counter()
    return result


def percentiles(values: list[float], points=(50, 90, 99)) -> dict[str, float | None]:
    ordered = sorted(values)
    out = {}
    for p in points:
        out[f"p{p}"] = ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else None
    return out


def summarize(results: list[StreamResult], seconds: float) -> dict:
    done = [r for r in results if r.ok]
    refused = [r for r in results if r.status == 503]
    tokens = sum(r.num_output_tokens for r in done)
    ms = lambda values: {k: (None if v is None else round(1e3 * v, 2)) for k, v in percentiles(values).items()}  # noqa: E731
    return {"requests": len(results), "completed": len(done), "errors": len(results) - len(done) - len(refused),
            "refused": len(refused), "seconds": round(seconds, 3), "output_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "requests_per_s": round(len(done) / seconds, 3) if seconds > 0 else None,
            "ttft_ms": ms([r.ttft for r in done if r.ttft is not None]),
            "itl_ms": ms([r.itl for r in done if r.itl is not None]),
            "latency_ms": ms([r.end - r.start for r in done]),
            "error_messages": sorted({r.error for r in results if r.error})[:5]}


async def run_level(backend, concurrency: int, duration_s: float, modes: list[str], max_tokens: int) -> dict:
    """backend: a TritonBackend (gRPC) or an OpenAIStreams (HTTP)."""
    counter = itertools.count()
    deadline = time.perf_counter() + duration_s
    results: list[StreamResult] = []

    async def client() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            fields = {"text_input": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                      "decode_mode": modes[i % len(modes)]}
            if isinstance(backend, TritonBackend):
                results.append(await stream_request(backend, fields))
            else:
                results.append(await backend.stream(fields | {"prompt": fields.pop("text_input")}))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"concurrency": concurrency} | ({"mode": modes[0]} if len(modes) == 1 else {}) | \
        summarize(results, time.perf_counter() - start)


def grpc_address(url: str) -> str:
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


async def bench_server(url: str, concurrencies: list[int], duration_s: float, modes: list[str],
                       max_tokens: int, model: str = "nemodiff", each_mode: bool = False) -> list[dict]:
    """grpc://host:port (or host:port): Triton's gRPC; http(s)://host:port: an OpenAI-compatible API (Dynamo's
    frontend, `nemodiff serve --openai-port`), whose first listed model is loaded. each_mode: a level per
    concurrency and mode (every mode at one concurrency, then the next) instead of the modes mixed."""
    runs = [(c, [m]) for c in concurrencies for m in modes] if each_mode else [(c, modes) for c in concurrencies]
    if url.startswith(("http://", "https://")):
        async with OpenAIStreams(url) as streams:
            if not await streams.ready():
                raise RuntimeError(f"no model listed at {streams.base}/models (OpenAI-compatible HTTP)")
            return [await run_level(streams, c, duration_s, m, max_tokens) for c, m in runs]
    backend = TritonBackend(grpc_address(url), model)
    if not await backend.ready():
        raise RuntimeError(f"no ready {model!r} model at {url} (gRPC)")
    return [await run_level(backend, c, duration_s, m, max_tokens) for c, m in runs]


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'mode':>14s} {'conc':>4s} {'done':>6s} {'err':>4s} {'refused':>7s} {'tok/s':>9s} {'TTFT p50':>9s} "
             f"{'p99':>8s} {'ITL p50':>8s} {'p99':>8s}  (ms)"]
    for r in rows:
        lines.append(f"{r.get('mode', 'mixed'):>14s} {r['concurrency']:4d} {r['completed']:6d} {r['errors']:4d} {r['refused']:7d} "
                     f"{r['tokens_per_s'] or 0:9.1f} {r['ttft_ms']['p50'] or 0:9.1f} {r['ttft_ms']['p99'] or 0:8.1f} "
                     f"{r['itl_ms']['p50'] or 0:8.2f} {r['itl_ms']['p99'] or 0:8.2f}")
    return "\n".join(lines)


class OpenAIStreams:
    """Streaming completions against `url` (http://host:port, with or without /v1)."""

    def __init__(self, url: str, model: str | None = None):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.dialect = "field"  # how the decode mode travels: "field" (nemodiff serve) or "nvext" (Dynamo)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIStreams:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def ready(self) -> bool:
        """The model is listed (the first listed one when none was named); the mode's dialect is known."""
        try:
            async with self._session.get(self.base + "/models") as response:
                listed = [m["id"] for m in (await response.json()).get("data", [])]
        except (aiohttp.ClientError, ValueError, KeyError, TypeError):
            return False
        if not listed or (self.model is not None and self.model not in listed):
            return False
        self.model = self.model or listed[0]
        # nemodiff's own port takes `decode_mode` as a field (and ignores an unknown `nvext`); Dynamo's frontend
        # refuses nemodiff's fields and reads the mode from its annotations
        self.dialect = "field"
        probe = await self.stream({"prompt": "Hi", "max_tokens": 1, "decode_mode": "ar"})
        if not probe.ok:
            self.dialect = "nvext"
        return True

    def body(self, fields: dict) -> dict:
        body = {"model": self.model, "prompt": fields["prompt"], "max_tokens": fields["max_tokens"],
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        mode = fields.get("decode_mode")
        if mode is not None:
            body |= {"nvext": {"annotations": [f"decode_mode:{mode}"]}} if self.dialect == "nvext" else {
                "decode_mode": mode}
        if self.dialect == "field":
            body["ignore_eos"] = True  # nemodiff's own port: every request generates max_tokens
        return body

    async def stream(self, fields: dict) -> StreamResult:
        result = StreamResult(start=time.perf_counter())
        chunk_times: list[float] = []
        try:
            async with self._session.post(self.base + "/completions", json=self.body(fields)) as response:
                if response.status != 200:
                    result.status, result.error = response.status, (await response.text())[:300]
                    return result
                async for raw in response.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        result.status, result.error = 500, str(event["error"])[:300]
                        return result
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            result.text += choice["text"]
                            chunk_times.append(time.perf_counter())
                        result.finish_reason = choice.get("finish_reason") or result.finish_reason
                    if event.get("usage"):
                        result.num_output_tokens = int(event["usage"].get("completion_tokens") or 0)
            result.ok = True
        except (aiohttp.ClientError, ValueError) as exc:
            result.status, result.error = 599, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            result.end = time.perf_counter()
        n = max(result.num_output_tokens, len(chunk_times))
        result.num_output_tokens = n
        if chunk_times:  # the first chunk's time, then the last one's for the remaining tokens
            result.token_times = [chunk_times[0]] + [chunk_times[-1]] * (n - 1)
        return result
