"""The thread that runs the OpenAI-compatible API next to tritonserver, for `nemodiff serve --openai-port`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: OpenAI frontend thread] ──▶ clients

It wires the app (app.py) to its way to the engine (backend.py); neither of those imports the other.
"""

from __future__ import annotations

import threading

import uvicorn

from .app import create_app
from .backend import TritonBackend


class FrontendThread:
    """The OpenAI API under uvicorn on a thread of `nemodiff serve` (no signal handlers of its own)."""

    def __init__(self, engine_dir, grpc_url: str, host: str, port: int, served_model_name: str,
                 max_body_bytes: int, triton_model: str):
        app = create_app(engine_dir, TritonBackend(grpc_url, triton_model), served_model_name, max_body_bytes)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{local}:{port}"
        self._thread = threading.Thread(target=self.server.run, name="openai-frontend", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started:
                return
            if not self._thread.is_alive():
                break
            self._thread.join(0.05)
        raise RuntimeError(f"the OpenAI frontend did not start on {self.url}")

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
