"""The control folder: how `nemodiff serve` (its supervisor and HTTP fronts) and the Triton model talk.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: supervisor ⇄ model]

They run in different processes (the model in Triton's Python-backend stub), so they share a
folder that `nemodiff serve` creates for the run and names in the model's config:

| entry | written by | meaning |
| --- | --- | --- |
| `drain` | supervisor | answer every open request, refuse new ones, stop the engine (SIGTERM/SIGINT) |
| `drained` | model | done: every answer has left and the engine is stopped |
| `failed` | model | the engine loop died (the text says why); the supervisor exits 3 |
| `finalized` | model | Triton unloaded the model (its `finalize()` returned) |
| `cancel/KEY` | HTTP front | the client of the request tagged KEY hung up: cancel it |
| `front_errors.json` | fronts | requests the fronts refused themselves, by error kind (for the metrics) |
| `front_metrics.owner` | model | which model instance reports the fronts' refusals |

A request reaches the model with its KEY as the request parameter `FRONT_KEY` (the HTTP front
adds it to every generate body): Triton's HTTP endpoints notice a closed connection only when
they next write to it, which for a request that streams nothing could be minutes away.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import threading
import time
from pathlib import Path

DRAIN, DRAINED, FAILED, FINALIZED = "drain", "drained", "failed", "finalized"
FRONT_KEY = "nemodiff_front_key"
# With --api-key, the HTTP front passes the key to the model as this request parameter, and Triton forwards a
# gRPC client's GRPC_AUTH metadata as one: the model checks inference requests itself (see `bearer_matches`).
FRONT_AUTH = "nemodiff_front_authorization"
GRPC_AUTH = "triton-grpc-protocol-authorization"
API_KEY_ENV = "NEMODIFF_API_KEY"
FRONT_KINDS = ("invalid", "unauthorized")  # what a front refuses on its own (bad body, wrong or no API key)
_KEY = re.compile(r"[0-9a-f]{32}")


def valid_key(key) -> bool:
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def bearer_matches(value, api_key: str | None) -> bool:
    """`Bearer KEY` with the server's key, the scheme in any case and any spacing, as HTTP allows (always True
    when the server has none)."""
    if api_key is None:
        return True
    if not isinstance(value, str):
        return False
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Control:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cancel_dir = self.path / "cancel"

    def create(self) -> "Control":
        self.cancel_dir.mkdir(parents=True, exist_ok=True)
        return self

    # -- flags -------------------------------------------------------------------------------
    def set(self, name: str, text: str = "") -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def read(self, name: str) -> str:
        return (self.path / name).read_text(errors="replace").strip()

    def claim(self, name: str) -> bool:
        """True for the first caller only (an exclusive create)."""
        try:
            os.close(os.open(self.path / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    # -- cancellations -----------------------------------------------------------------------
    def cancel(self, key: str) -> None:
        if valid_key(key):
            (self.cancel_dir / key).touch()

    def cancellations(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.cancel_dir) if valid_key(entry.name)]
        except FileNotFoundError:
            return []

    def forget(self, key: str) -> None:
        if valid_key(key):
            try:
                (self.cancel_dir / key).unlink()
            except FileNotFoundError:
                pass

    def expire(self, older_than_s: float) -> None:
        """Drop cancellations nobody took up (their request had already ended)."""
        limit = time.time() - older_than_s
        try:
            for entry in os.scandir(self.cancel_dir):
                try:
                    if entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass

    # -- the fronts' own refusals ------------------------------------------------------------
    def front_errors(self) -> dict[str, int]:
        try:
            counts = json.loads((self.path / "front_errors.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in counts.items() if k in FRONT_KINDS} if isinstance(counts, dict) else {}


class FrontErrors:
    """Counts the requests a front refused before they reached the model; kept in the control folder."""

    def __init__(self, control: Control | None):
        self.control = control
        self.counts = dict.fromkeys(FRONT_KINDS, 0)
        self._lock = threading.Lock()

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if self.control is not None:
                try:
                    self.control.set("front_errors.json", json.dumps(self.counts))
                except OSError:
                    pass
