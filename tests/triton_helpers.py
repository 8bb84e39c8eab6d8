"""Test helpers for serving: a real `nemodiff serve` process and plain HTTP/gRPC clients for it.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: served by `nemodiff serve`, driven here]
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from nemodiff.serving.cli import free_ports

MODEL = "nemodiff"
NEMODIFF = Path(sys.executable).parent / "nemodiff"
REPO_ROOT = Path(__file__).resolve().parent.parent


def plain_env(**extra: str) -> dict:
    """The environment of a systemd unit or a cron job: no activated venv, and its bin not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve()) or "/usr/bin:/bin"
    # a checkout put on PYTHONPATH in front of an installed copy (a second worktree) is what the server must run
    if str(REPO_ROOT) in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        extra["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), str(REPO_ROOT)) if p)
    return env | extra


class Server:
    """`nemodiff serve ENGINE_DIR` started by the console script's path, on loopback ports, its log in a file.

    cwd: where it is started (default: a neutral folder); env: its environment (default: `plain_env()`).
    """

    def __init__(self, engine_dir: Path, log_path: Path, *extra: str, cwd: Path | None = None,
                 env: dict | None = None, openai: bool = False, api_key: str | None = None):
        ports = free_ports(4)
        self.api_key = api_key
        self.http_port, self.grpc_port, self.metrics_port, self.openai_port = ports
        self.log_path = log_path
        self.cwd = cwd or log_path.parent
        self.env = env or plain_env()
        self.command = [str(NEMODIFF), "serve", str(engine_dir), "--host", "127.0.0.1",
                        "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                        "--metrics-port", str(self.metrics_port), "--instance-kind", "cpu", *extra]
        self.openai = openai
        if openai:
            self.command += ["--openai-port", str(self.openai_port)]
        if api_key is not None:
            self.command += ["--api-key", api_key]
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 120.0) -> "Server":
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=self.cwd,
                                        env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nemodiff serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"nemodiff serve not ready after {timeout} s:\n{self.log()[-4000:]}")

    def ready(self) -> bool:
        """HTTP says ready and the metrics endpoint (which Triton starts last) answers."""
        urls = [f"{self.http}/v2/health/ready", f"http://127.0.0.1:{self.metrics_port}/metrics"]
        if self.openai:
            urls.append(f"http://127.0.0.1:{self.openai_port}/health")
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}/v1"

    def model_ready(self) -> int | None:
        """HTTP status of /v2/models/nemodiff/ready, None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.http}/v2/models/{MODEL}/ready", timeout=2) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGINT) -> int:
        """SIGINT, as a terminal's Ctrl-C would (or `sig`); returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait_exit(timeout)

    @property
    def headers(self) -> dict:
        """What an authorised HTTP client sends."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def grpc_headers(self) -> dict:
        """What an authorised gRPC client sends (Triton's restricted-protocol header)."""
        return {"triton-grpc-protocol-authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- HTTP --------------------------------------------------------------------------------
    def post(self, path: str, payload: dict | bytes, headers: dict | None = None,
             with_headers: bool = False) -> tuple:
        """(status, body), or (status, body, reply headers) with with_headers."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} | (self.headers if headers is None else headers)
        request = urllib.request.Request(f"{self.http}{path}", data=data, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                status, body, got = reply.status, reply.read(), reply.headers
        except urllib.error.HTTPError as exc:
            status, body, got = exc.code, exc.read(), exc.headers
        return (status, body, got) if with_headers else (status, body)

    def generate(self, payload: dict | bytes) -> tuple[int, dict]:
        status, body = self.post(f"/v2/models/{MODEL}/generate", payload)
        return status, json.loads(body)

    def generate_stream(self, payload: dict) -> tuple[int, list[dict]]:
        """Server-sent events of /generate_stream, one dict per event."""
        status, body = self.post(f"/v2/models/{MODEL}/generate_stream", payload)
        events = [json.loads(line[len("data:"):]) for line in body.decode().splitlines() if line.startswith("data:")]
        return status, events

    def metrics(self) -> dict[str, float]:
        """Prometheus text as {'name{labels}': value} for the nemodiff_* series, summed over model instances."""
        totals: dict[str, float] = {}
        for (name, labels, _instance), value in self.series().items():
            key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            totals[key] = totals.get(key, 0.0) + value
        return totals

    def metrics_by_instance(self) -> dict[str, dict[str, float]]:
        """{instance: {'name{labels}': value}} for the nemodiff_* series."""
        out: dict[str, dict[str, float]] = {}
        for (name, labels, instance), value in self.series().items():
            key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            out.setdefault(instance, {})[key] = value
        return out

    def series(self) -> dict[tuple[str, tuple, str], float]:
        """(name, labels other than instance, instance) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("nemodiff_"):
                series, value = line.rsplit(" ", 1)
                name, _, rest = series.partition("{")
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
                instance = labels.pop("instance", "")
                values[name, tuple(sorted(labels.items())), instance] = float(value)
        return values


def module_server(engine_dir: Path, log_dir: Path, *extra: str, openai: bool = True):
    """A started `nemodiff serve` for a test module (a generator for a fixture): it must stop with exit 0."""
    served = Server(engine_dir, log_dir / "serve.log", *extra, openai=openai).start()
    yield served
    assert served.stop() == 0, served.log()[-3000:]
    assert "Segfault" not in served.log(), served.log()[-3000:]  # the backend stub's exit is clean too


def ids_of(value) -> list[int]:
    """output_ids as JSON gives them (a one-element tensor comes back as a bare number)."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


# -- gRPC ------------------------------------------------------------------------------------
def grpc_inputs(prompt: str, **fields) -> list:
    """tritonclient gRPC inputs shaped like tensorrt_llm_bls's ([1, 1], or [1, n] for lists)."""
    import tritonclient.grpc as grpcclient

    types = {"max_tokens": np.int32, "top_k": np.int32, "end_id": np.int32, "pad_id": np.int32,
             "block_length": np.int32, "max_thinking_tokens": np.int32, "input_ids": np.int32,
             "temperature": np.float32, "top_p": np.float32, "threshold": np.float32, "random_seed": np.uint64,
             "stream": np.bool_, "ignore_eos": np.bool_, "timeout": np.float32, "return_log_probs": np.bool_,
             "top_logprobs": np.int32, "num_return_sequences": np.int32, "min_length": np.int32,
             "min_tokens": np.int32}
    arrays = {"text_input": np.array([[prompt.encode()]], dtype=np.object_)}
    for name, value in fields.items():
        if name in types:
            arrays[name] = np.array(value if isinstance(value, list) else [value], dtype=types[name]).reshape(1, -1)
        else:
            values = value if isinstance(value, list) else [value]
            arrays[name] = np.array([[v if isinstance(v, bytes) else v.encode() for v in values]], dtype=np.object_)
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), _triton_type(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _triton_type(array: np.ndarray) -> str:
    return {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64",
            np.dtype(np.bool_): "BOOL"}.get(array.dtype, "BYTES")


class GrpcStream:
    """One gRPC bidirectional stream; responses and errors are collected per request id."""

    def __init__(self, url: str, headers: dict | None = None):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)), headers=headers)

    def send(self, request_id: str, prompt: str, **fields) -> None:
        self.client.async_stream_infer(MODEL, grpc_inputs(prompt, **fields), request_id=request_id,
                                       enable_empty_final_response=True)

    def next(self, timeout: float = 60.0):
        """(request id, result or None, error or None, final flag)."""
        result, error = self.results.get(timeout=timeout)
        if error is not None:
            return None, None, error, True
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        return response.id, result, None, final

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


# -- processes and shared memory -------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.add(pid)
    return live


def shm_regions(serve_pid: int) -> list[str]:
    """The Python backend's shared-memory regions of one `nemodiff serve` run."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"nemodiff_{serve_pid}_*"))
