"""The thread that runs the OpenAI-compatible API next to tritonserver, for `nemodiff serve --openai-port`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: OpenAI frontend thread] ──▶ clients

It wires the app (app.py) to its way to the engine (backend.py); neither of those imports the other's
internals. The server under it is nemodiff/serving/http/server.py's (with its deadline for slow clients).
"""

from __future__ import annotations

from nemodiff.serving.control import FrontErrors
from nemodiff.serving.http.server import ServerThread
from nemodiff.serving.triton.inputs import DEFAULT_MAX_N

from .app import ERROR_TYPES, create_app
from .backend import TritonBackend


class FrontendThread(ServerThread):
    """The OpenAI API under uvicorn on a thread of `nemodiff serve` (no signal handlers of its own)."""

    def __init__(self, engine_dir, grpc_url: str, host: str, port: int, served_model_name: str,
                 max_body_bytes: int, triton_model: str, api_key: str | None = None, idle_timeout: float = 30.0,
                 front_errors: FrontErrors | None = None, max_n: int = DEFAULT_MAX_N, metrics_url: str | None = None):
        app = create_app(engine_dir, TritonBackend(grpc_url, triton_model, api_key), served_model_name,
                         max_body_bytes, api_key, front_errors, max_n, metrics_url)
        super().__init__(app, host, port, idle_timeout, "OpenAI", error_body=openai_error)


def openai_error(message: str) -> dict:
    """A 503 error in OpenAI's shape (the answers of a stopping front)."""
    return {"error": {"message": message, "type": ERROR_TYPES[503], "param": None, "code": 503}}
