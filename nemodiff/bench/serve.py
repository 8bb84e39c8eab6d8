"""`nemodiff bench --serve URL`: load a running server and measure what clients see.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: load on a running server]

Drives the nemodiff model over Triton's gRPC streaming API (`URL` = `grpc://host:8001` or
`host:8001`), one stream per request, like genai-perf, or over the OpenAI API (`URL` =
`http://host:port/v1`: streamed completions at temperature 0 past end-of-sequence, so every request
generates max_tokens). For each concurrency level, that many clients send requests back to back for a
fixed duration (mixed decode modes by default; `each_mode`: one level per mode and concurrency, in the
same run against the same server). Reported per level: requests completed, errors, refused
(UNAVAILABLE, the queue limit), output tokens/s, time to first token and inter-token latency
percentiles.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

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


class OpenAIClient:
    """The OpenAI port of `nemodiff serve` (streamed completions with usage on every chunk)."""

    def __init__(self, url: str, model: str):
        import openai  # the benchmark's dependency only

        self.client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        self.errors = (openai.APIError,)
        self.model = model

    async def ready(self) -> bool:
        try:
            return any(m.id == self.model for m in (await self.client.models.list()).data)
        except Exception:
            return False

    async def stream(self, fields: dict) -> StreamResult:
        result = StreamResult(start=time.perf_counter())
        try:
            chunks = await self.client.completions.create(
                model=self.model, prompt=fields["text_input"], max_tokens=fields["max_tokens"], temperature=0,
                stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"decode_mode": fields["decode_mode"], "ignore_eos": True})
            seen = 0
            async for chunk in chunks:
                now = time.perf_counter()
                count = chunk.usage.completion_tokens if chunk.usage is not None else seen
                result.token_times += [now] * (count - seen)
                seen = result.num_output_tokens = count
                if chunk.choices:
                    result.text += chunk.choices[0].text
                    result.finish_reason = chunk.choices[0].finish_reason or result.finish_reason
            result.ok = True
        except self.errors as exc:
            result.status, result.error = getattr(exc, "status_code", None) or 500, str(exc)
        result.end = time.perf_counter()
        return result


async def run_level(backend, concurrency: int, duration_s: float, modes: list[str], max_tokens: int) -> dict:
    counter = itertools.count()
    deadline = time.perf_counter() + duration_s
    results: list[StreamResult] = []

    async def client() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            fields = {"text_input": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                      "decode_mode": modes[i % len(modes)]}
            results.append(await (backend.stream(fields) if isinstance(backend, OpenAIClient)
                                  else stream_request(backend, fields)))

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
    """each_mode: a level per concurrency and mode (every mode at one concurrency, then the next)."""
    openai_port = url.startswith(("http://", "https://"))
    backend = OpenAIClient(url, model) if openai_port else TritonBackend(grpc_address(url), model)
    if not await backend.ready():
        raise RuntimeError(f"no ready {model!r} model at {url} ({'OpenAI API' if openai_port else 'gRPC'})")
    runs = [(c, [m]) for c in concurrencies for m in modes] if each_mode else [(c, modes) for c in concurrencies]
    return [await run_level(backend, c, duration_s, m, max_tokens) for c, m in runs]


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'mode':>14s} {'conc':>4s} {'done':>6s} {'err':>4s} {'refused':>7s} {'tok/s':>9s} {'TTFT p50':>9s} "
             f"{'p99':>8s} {'ITL p50':>8s} {'p99':>8s}  (ms)"]
    for r in rows:
        lines.append(f"{r.get('mode', 'mixed'):>14s} {r['concurrency']:4d} {r['completed']:6d} {r['errors']:4d} {r['refused']:7d} "
                     f"{r['tokens_per_s'] or 0:9.1f} {r['ttft_ms']['p50'] or 0:9.1f} {r['ttft_ms']['p99'] or 0:8.1f} "
                     f"{r['itl_ms']['p50'] or 0:8.2f} {r['itl_ms']['p99'] or 0:8.2f}")
    return "\n".join(lines)
