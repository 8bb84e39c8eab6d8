"""The public HTTP port of `nemodiff serve`: Triton's HTTP endpoints behind a guard (an ASGI app).

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[HTTP front]──▶ clients

Triton's HTTP server listens on an internal loopback port; this front takes the public one and
forwards every request to it, after:
- the API key (`--api-key`): everything but health, metadata and `/metrics` (the metrics port's,
  passed through, for load tools that scrape their base URL) needs `Authorization: Bearer KEY`
  (401 otherwise); Triton checks the same header again behind us;
- the body: at most `max_body_bytes`, valid UTF-8 and JSON, at most `MAX_JSON_DEPTH` levels deep
  (guard.py; Triton's parser crashed the server on deep bodies), else 400/413 and Triton never
  sees it;
- generate requests carry the server's key to the model, which checks every request's
  (`control.FRONT_AUTH`), and are tagged with a key (the request parameter `control.FRONT_KEY`): when the
  client hangs up, the front names that key in the control folder and the model cancels the
  request at once (Triton itself notices a closed connection only when it next writes to it).

Answers come back unchanged (streams chunk by chunk), except that a generate error Triton sent
with status 400 gets the status of its kind (nemodiff/serving/errors.py): 503 with `Retry-After` for a
refusal (full, draining, restarting) or an expired deadline, 500 for an internal error.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp

from nemodiff.serving import errors
from nemodiff.serving.control import FRONT_AUTH, FRONT_KEY, Control, FrontErrors
from nemodiff.serving.http.guard import BodyError, bearer_ok, parse_json, read_body

MAX_BODY_BYTES = 64 * 2**20  # Triton's own default (--http-max-input-size): images travel in generate bodies
THREAD_PARSE_BYTES = 256 * 2**10  # larger bodies are checked on a worker thread, not the event loop
GENERATE = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/generate(?:_stream)?")
OPEN = re.compile(r"/v2(?:/health/(?:live|ready)|/models/(?!stats/?$)[^/]+(?:/versions/[^/]+)?(?:/ready)?)?/?"
                  r"|/metrics")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
# Triton answers a generate input it cannot convert to its declared type with status 500; it is a bad request
TRITON_BAD_INPUT = ("Unable to parse", "failed to parse", "attempt to access JSON", "The schema can not convert",
                    "Expected JSON", "parameter key", "Converting keyword")
NO_KEY = "this server requires an API key: send the header 'Authorization: Bearer <key>'"
WRONG_KEY = "the API key is not valid"


def _error_of(body: bytes) -> str | None:
    """The message of a Triton error answer: `{"error": ...}`, or the first server-sent event carrying one."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("data:"):
        text = text[5:].split("\n", 1)[0].strip()
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value.get("error") if isinstance(value, dict) and isinstance(value.get("error"), str) else None


def tag(body: bytes, value: dict, key: str, api_key: str | None = None) -> bytes:
    """The body with `FRONT_KEY: key` (and, with an API key, `FRONT_AUTH: "Bearer KEY"`, which the model checks)
    added as the first members of its top-level object (the rest unchanged)."""
    for reserved in (FRONT_KEY, FRONT_AUTH):
        if reserved in value:
            raise BodyError(400, f"{reserved} is reserved for the server")
    start = body.index(b"{") + 1
    members = {FRONT_KEY: key} | ({FRONT_AUTH: f"Bearer {api_key}"} if api_key is not None else {})
    member = json.dumps(members)[1:-1].encode() + (b"," if value else b"")
    return body[:start] + member + body[start:]


class TritonFront:
    def __init__(self, upstream: str, api_key: str | None, control: Control | None, front_errors: FrontErrors,
                 max_body_bytes: int = MAX_BODY_BYTES, metrics_url: str | None = None):
        self.upstream = upstream.rstrip("/")
        self.metrics_url = metrics_url
        self.api_key = api_key
        self.control = control
        self.errors = front_errors
        self.max_body_bytes = max_body_bytes
        self._client: aiohttp.ClientSession | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def client(self) -> aiohttp.ClientSession:
        if self._client is None:  # made on the serving event loop
            self._client = aiohttp.ClientSession(
                auto_decompress=False, connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=10), skip_auto_headers=("User-Agent",))
        return self._client

    async def _http(self, scope, receive, send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        if not (method in ("GET", "HEAD") and OPEN.fullmatch(path)) and not bearer_ok(headers, self.api_key):
            self.errors.count("unauthorized")
            message = WRONG_KEY if "authorization" in headers else NO_KEY
            await _reply(send, 401, {"error": message}, [(b"www-authenticate", b"Bearer")])
            return
        generate = method == "POST" and GENERATE.fullmatch(path) is not None
        key = None
        try:
            body = await read_body(receive, self.max_body_bytes, headers.get("content-length"))
            value = await self._checked(body, headers) if body else None
            if generate:
                if not isinstance(value, dict):
                    raise BodyError(400, "a generate request's body must be a JSON object of inputs")
                key = uuid.uuid4().hex
                body = tag(body, value, key, self.api_key)
        except ConnectionError:
            return
        except BodyError as exc:
            self.errors.count("invalid")
            await _reply(send, exc.status, {"error": exc.message})
            return
        forwarded = [(k, v) for k, v in headers.items() if k not in HOP_BY_HOP and k != "authorization"]
        if self.api_key is not None:  # Triton compares the header exactly; we accepted any spelling of Bearer
            forwarded.append(("authorization", f"Bearer {self.api_key}"))
        elif "authorization" in headers:
            forwarded.append(("authorization", headers["authorization"]))
        url = self.upstream + scope["raw_path"].decode("latin-1")
        if path == "/metrics" and self.metrics_url:  # the metrics port's, where load tools look for it
            url = self.metrics_url
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        answered = asyncio.Event()  # set just before the last send: uvicorn then says "disconnect" to a reader
        await self._unless_hung_up(receive, self._exchange(send, method, url, body, forwarded, generate, answered),
                                   key, answered)

    async def _exchange(self, send, method: str, url: str, body: bytes, headers: list, generate: bool,
                        answered: asyncio.Event) -> None:
        try:
            response = await self.client().request(method, url, data=body or None, headers=headers,
                                                   allow_redirects=False)
        except aiohttp.ClientError as exc:
            answered.set()
            await _reply(send, 503, {"error": f"{errors.SHUTTING_DOWN} or not yet ready: {exc}"},
                         [(b"retry-after", str(errors.RETRY_AFTER_S).encode())])
            return
        started = []
        try:
            await self._answer(response, send, generate, answered, started)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # Triton went away mid-answer
            if not started:
                await _reply(send, 503, {"error": f"{errors.SHUTTING_DOWN}: {exc}"})
            else:  # a stream cut short: it ends without its final event
                await send({"type": "http.response.body", "body": b""})
        finally:
            response.close()

    async def _checked(self, body: bytes, headers: dict):
        """The body's JSON value (its JSON header only, for KServe's binary tensor extension)."""
        declared = headers.get("inference-header-content-length", "").strip()
        if declared:
            if not declared.isdigit() or int(declared) > len(body):
                raise BodyError(400, "Inference-Header-Content-Length does not fit the body")
            body = body[:int(declared)]
        if len(body) > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(parse_json, body)
        return parse_json(body)

    async def _answer(self, response: aiohttp.ClientResponse, send, generate: bool, answered: asyncio.Event,
                      started: list) -> None:
        if response.status == 200 and response.content_type == "text/event-stream":
            await send(_start(response.status, response, [], None))
            started.append(True)
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            answered.set()
            await send({"type": "http.response.body", "body": b""})
            return
        body = await response.read()
        status, extra = response.status, []
        message = _error_of(body) if generate and response.status in (400, 500) else None
        if message is not None and response.status == 400:  # the model's error: its kind says the status
            status = errors.HTTP_STATUS[errors.kind_of(message)]
            if errors.is_refusal(message):
                extra.append((b"retry-after", str(errors.RETRY_AFTER_S).encode()))
        elif message is not None and any(part in message for part in TRITON_BAD_INPUT):
            status = 400
            self.errors.count("invalid")
        await send(_start(status, response, extra, len(body)))
        answered.set()
        await send({"type": "http.response.body", "body": body})

    async def _unless_hung_up(self, receive, work, key: str | None, answered: asyncio.Event) -> None:
        """Run `work` (the exchange with Triton); if the client hangs up first, stop it and cancel the request."""
        task = asyncio.ensure_future(work)
        hangup = asyncio.ensure_future(_disconnected(receive))
        done, _ = await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if task in done or answered.is_set():
            hangup.cancel()
            await task
            return
        if key is not None and self.control is not None:
            self.control.cancel(key)
        task.cancel()  # closes the connection to Triton
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _start(status: int, response: aiohttp.ClientResponse, extra: list, length: int | None) -> dict:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
               if k.lower() not in HOP_BY_HOP]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers + extra}


async def _reply(send, status: int, payload: dict, extra: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (extra or [])})
    await send({"type": "http.response.body", "body": body})
