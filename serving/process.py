"""Running tritonserver for `nemodiff serve`: start, readiness, supervision, shutdown, cleanup.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the server process and its supervisor]

The supervisor talks to the nemodiff model through a control folder (see
`nemodiff.serving.triton.model`). On SIGTERM or SIGINT it asks the model to drain (every open
request is answered, new ones are refused), stops the OpenAI frontend, then forwards the
signal: Triton finds nothing in flight and exits at once, well inside its exit timeout.
When the engine loop fails, it unloads the model (Triton then reports it, and itself, not
ready), keeps that state visible for a moment, stops the server and exits with
`ENGINE_FAILED_EXIT` so that systemd, Docker or Kubernetes restarts it. Either way it
finally kills whatever is left in the server's process group and removes the
Python backend's shared-memory regions, which carry a prefix unique to this run.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click

ENGINE_FAILED_EXIT = 3
DRAIN_TIMEOUT_S = 5.0
FAILURE_LINGER_S = 2.0  # not-ready state kept visible to probes and clients before exiting
POLL_S = 0.1
SHM_DIR = Path("/dev/shm")


@dataclass
class ServerRun:
    command: list[str]
    env: dict
    cwd: Path
    control_dir: Path
    shm_prefix: str
    local_host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    model_name: str
    exit_timeout_s: float
    startup_timeout_s: float
    frontend_factory: object = None  # () -> object with start() / stop(), started once Triton is ready
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://{self.local_host}:{port or self.http_port}{path}"


def _set_parent_death_signal() -> None:
    """Child side (Linux): if `nemodiff serve` dies without stopping the server, the server still stops."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _answers(url: str, method: str = "GET", timeout: float = 2.0) -> bool:
    try:
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_server(run: ServerRun) -> int:
    process = subprocess.Popen(run.command, env=run.env, cwd=run.cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_set_parent_death_signal)

    def pump() -> None:  # the server's log goes to our stderr; the last lines are kept for failures
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            run.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, name="tritonserver-log", daemon=True)
    reader.start()
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        if len(signals) > 1 and process.poll() is None:  # asked twice: no more waiting
            process.send_signal(signal.SIGTERM)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    frontend = None
    try:
        status = _wait_ready(run, process, reader, stop)
        if status is not None:
            return status
        if run.frontend_factory is not None:
            try:
                frontend = run.frontend_factory()
                frontend.start()
            except Exception as exc:
                click.echo(f"nemodiff serve: the OpenAI frontend could not start: {exc}", err=True)
                frontend = None
                _shut_down(run, process, None)
                return 1
        _banner(run, frontend)
        while not stop.wait(POLL_S):
            if process.poll() is not None:
                reader.join(timeout=2)
                click.echo(f"nemodiff serve: tritonserver exited unexpectedly ({process.returncode})", err=True)
                return process.returncode or 1
            if (run.control_dir / "failed").exists():
                return _engine_failed(run, process, frontend)
        return _shut_down(run, process, frontend)
    finally:
        if frontend is not None:
            frontend.stop()
        if process.poll() is None:
            process.kill()
            process.wait()
        _clean_up(run, process)
        reader.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_ready(run: ServerRun, process, reader, stop: threading.Event) -> int | None:
    deadline = time.monotonic() + run.startup_timeout_s
    while not stop.is_set():
        if process.poll() is not None:
            reader.join(timeout=2)
            click.echo("nemodiff serve: tritonserver exited during startup; its last log lines:", err=True)
            click.echo("\n".join(run.tail), err=True)
            return process.returncode or 1
        if _answers(run.url("/v2/health/ready")) and _answers(run.url("/metrics", run.metrics_port)):
            return None
        if time.monotonic() > deadline:
            click.echo(f"nemodiff serve: not ready after {run.startup_timeout_s:.0f} s; stopping it", err=True)
            process.terminate()
            process.wait()
            return 1
        time.sleep(0.25)
    process.terminate()
    process.wait()
    return 0


def _banner(run: ServerRun, frontend) -> None:
    host = run.local_host
    lines = [f"  HTTP     http://{host}:{run.http_port}", f"  gRPC     {host}:{run.grpc_port}",
             f"  metrics  http://{host}:{run.metrics_port}/metrics",
             f"  generate http://{host}:{run.http_port}/v2/models/{run.model_name}/generate "
             "(streaming: /generate_stream)"]
    if frontend is not None:
        lines.append(f"  OpenAI   {frontend.url}/v1 (completions, chat/completions, models)")
    click.echo("nemodiff serve: ready\n" + "\n".join(lines), err=True)


def _shut_down(run: ServerRun, process, frontend) -> int:
    click.echo("nemodiff serve: stopping: answering open requests", err=True)
    (run.control_dir / "drain").touch()
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not (run.control_dir / "drained").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    if frontend is not None:
        frontend.stop()
    returncode = _stop_server(run, process)
    if returncode in (0, -signal.SIGINT, -signal.SIGTERM):
        click.echo("nemodiff serve: server stopped", err=True)
        return 0
    return returncode if returncode >= 0 else 128 - returncode


def _engine_failed(run: ServerRun, process, frontend) -> int:
    reason = (run.control_dir / "failed").read_text(errors="replace").strip()
    click.echo(f"nemodiff serve: the engine failed ({reason}); every open request was answered with an error. "
               f"Taking the model down and exiting with status {ENGINE_FAILED_EXIT} for a restart.", err=True)
    _answers(run.url(f"/v2/repository/models/{run.model_name}/unload"), method="POST", timeout=30)
    time.sleep(FAILURE_LINGER_S)
    if frontend is not None:
        frontend.stop()
    _stop_server(run, process)
    return ENGINE_FAILED_EXIT


def _stop_server(run: ServerRun, process) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(run.exit_timeout_s + 10)
    except subprocess.TimeoutExpired:
        click.echo("nemodiff serve: tritonserver did not stop; killing it", err=True)
        process.kill()
        return process.wait()


def _clean_up(run: ServerRun, process) -> None:
    """Nothing of this run may outlive it: stray processes of the server's group, shared memory."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if SHM_DIR.is_dir():
        for region in SHM_DIR.glob(f"{run.shm_prefix}*"):
            try:
                region.unlink()
            except OSError:
                pass
