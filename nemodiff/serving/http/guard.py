"""Checks on what an HTTP client sends, before anything else reads it: body size, UTF-8, JSON, nesting.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[HTTP fronts: request guard]──▶ clients

Triton's JSON parser recurses once per nesting level: a 100 KB body of 50,000 nested arrays
crashed tritonserver (and with it every request in flight). Python's parser raises RecursionError
around a thousand levels and then says nothing useful. So the nesting depth is measured first,
without parsing (strings blanked out, brackets counted with numpy), and a body deeper than
`MAX_JSON_DEPTH` is refused before any parser sees it. Every check raises `BodyError`, whose
status and message are the answer.
"""

from __future__ import annotations

import json

import numpy as np

from nemodiff.serving.control import bearer_matches

MAX_JSON_DEPTH = 32  # a generate body needs 2, an infer body with a rank-8 tensor 11
_STEP = np.zeros(256, dtype=np.int8)  # +1 opens a level, -1 closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


class BodyError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def too_large(limit: int) -> BodyError:
    return BodyError(413, f"the request body is larger than {limit} bytes")


async def read_body(receive, limit: int, declared: str | None) -> bytes:
    """The whole body of an ASGI request, refused (413) past `limit` bytes, from its header when it says so."""
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away while sending its request")
        body += message.get("body", b"")
        if len(body) > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            return bytes(body)


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text; brackets inside strings do not count.

    Vectorised: a quote opens or closes a string unless an odd run of backslashes precedes it (valid
    JSON has backslashes only inside strings); brackets outside strings step the depth up or down.
    """
    if not data:
        return 0
    raw = np.frombuffer(data, dtype=np.uint8)
    quote = raw == ord('"')
    if b"\\" in data:
        backslash = raw == ord("\\")
        count = np.cumsum(backslash, dtype=np.int32)
        run_start = np.maximum.accumulate(np.where(backslash, 0, count))  # backslashes before the current run
        odd = np.empty_like(quote)  # an odd backslash run ends just before this byte: it is escaped
        odd[0] = False
        odd[1:] = ((count - run_start) % 2 == 1)[:-1]
        quote &= ~odd
    inside = (np.cumsum(quote, dtype=np.int32) & 1).astype(bool)  # from an opening quote to its closing one
    steps = _STEP[raw]
    steps[inside] = 0
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH):
    """The JSON value of a body: valid UTF-8, valid JSON, at most `max_depth` levels deep (else BodyError 400)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the request body is not valid UTF-8 (at byte {exc.start})") from None
    opening = data.count(b"[") + data.count(b"{")  # an upper bound of the depth, counted at C speed
    depth = nesting_depth(data) if opening > max_depth else 0
    if depth > max_depth:
        raise BodyError(400, f"the request body nests arrays and objects {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen within the depth limit; kept as a last guard
        raise BodyError(400, "the request body is nested too deeply") from None
    except ValueError as exc:
        raise BodyError(400, f"the request body is not valid JSON: {exc}") from None


def check_strings(value, where: str = "the request") -> None:
    """Every string of a parsed body is valid Unicode: JSON escapes can make lone surrogates ("\\ud800"),
    which no UTF-8 encoder accepts."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BodyError(400, f"{where} contains a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                                     "which is not valid Unicode") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def bearer_ok(headers: dict[str, str], api_key: str | None) -> bool:
    """`Authorization: Bearer KEY` with the server's key (always True when the server has none)."""
    return bearer_matches(headers.get("authorization", ""), api_key)
