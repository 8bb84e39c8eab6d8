"""Test helpers for serving: a real `nemodiff serve` process and plain HTTP/gRPC clients for it.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: served by `nemodiff serve`, driven here]
"""

from __future__ import annotations

import json
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

from nemodiff.serve import free_ports

MODEL = "nemodiff"
NEMODIFF = Path(sys.executable).parent / "nemodiff"


class Server:
    """`nemodiff serve ENGINE_DIR` on loopback ports, its log in a file."""

    def __init__(self, engine_dir: Path, log_path: Path, *extra: str):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log_path = log_path
        self.command = [str(NEMODIFF), "serve", str(engine_dir), "--host", "127.0.0.1",
                        "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                        "--metrics-port", str(self.metrics_port), "--instance-kind", "cpu", *extra]
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
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT)
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
        for url in (f"{self.http}/v2/health/ready", f"http://127.0.0.1:{self.metrics_port}/metrics"):
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT, as a terminal's Ctrl-C would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    # -- HTTP --------------------------------------------------------------------------------
    def post(self, path: str, payload: dict | bytes) -> tuple[int, bytes]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.http}{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

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
             "stream": np.bool_}
    arrays = {"text_input": np.array([[prompt.encode()]], dtype=np.object_)}
    for name, value in fields.items():
        if name in types:
            arrays[name] = np.array(value if isinstance(value, list) else [value], dtype=types[name]).reshape(1, -1)
        else:
            values = value if isinstance(value, list) else [value]
            arrays[name] = np.array([[v.encode() for v in values]], dtype=np.object_)
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

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

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
