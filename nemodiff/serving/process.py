"""Running tritonserver for `nemodiff serve`: start, readiness, the fronts, supervision, shutdown, cleanup.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the server process and its supervisor]

Triton's HTTP endpoints listen on an internal loopback port; the public HTTP port is the HTTP
front (`nemodiff.serving.http.front`), started with the OpenAI API (if asked for) once Triton is
ready. The supervisor talks to the nemodiff model through the control folder
(`nemodiff.serving.control`).

On SIGTERM or SIGINT it asks the model to drain (every open request is answered, new ones are
refused, the engine stops), stops the fronts, then sends Triton SIGTERM, and exits 0 within
`--exit-timeout`, every time. Triton 2.51 does not always get out on its own once the model is
drained: its gRPC server waits, without a deadline, for every client stream to close (one idle
stream kept it up forever), and a client that cancels its stream just after its last response
leaves a request state behind in Triton's gRPC handler that keeps the model "live", so Triton
waits out its exit timeout and exits 1. Nothing of ours is left then (the model was drained and
its engine stopped), so if Triton has not exited a moment after the model was unloaded, or
`UNLOAD_GRACE_S` after SIGTERM, the supervisor stops it and still exits 0.

When the engine loop fails, it unloads the model (Triton then reports it, and itself, not
ready), keeps that state visible for a moment, stops the server and exits with
`ENGINE_FAILED_EXIT` so that systemd, Docker or Kubernetes restarts it. Either way it finally
kills whatever is left in the server's process group and removes the Python backend's
shared-memory regions, which carry a prefix unique to this run.
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

from nemodiff.serving.control import DRAIN, DRAINED, FAILED, FINALIZED, Control

ENGINE_FAILED_EXIT = 3
DRAIN_TIMEOUT_S = 5.0
UNLOAD_GRACE_S = 5.0  # after SIGTERM, for Triton to unload the drained model
GRPC_GRACE_S = 2.5  # after the model is unloaded, for Triton to notice (it looks once a second) and close its endpoints
CANCEL_EXPIRY_S = 30.0  # a hang-up no model instance took up (its request had ended)
FAILURE_LINGER_S = 2.0  # not-ready state kept visible to probes and clients before exiting
POLL_S = 0.1
SHM_DIR = Path("/dev/shm")


@dataclass
class ServerRun:
    command: list[str]
    env: dict
    cwd: Path
    control: Control
    shm_prefix: str
    local_host: str
    http_port: int  # the public one, the HTTP front's
    triton_http_port: int  # Triton's own, on loopback
    grpc_port: int
    metrics_port: int
    model_name: str
    exit_timeout_s: float
    startup_timeout_s: float
    # () -> objects with start() / stop() / url / name, started in order once Triton is ready: the HTTP front first
    front_factories: list = field(default_factory=list)
    api_key: str | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://{self.local_host}:{port or self.http_port}{path}"

    def triton_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.triton_http_port}{path}"

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _set_parent_death_signal() -> None:
    """Child side (Linux): if `nemodiff serve` dies without stopping the server, the server still stops."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _answers(url: str, method: str = "GET", timeout: float = 2.0, headers: dict | None = None) -> bool:
    try:
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                         headers=headers or {})
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
    fronts: list = []
    try:
        status = _wait_ready(run, process, reader, stop)
        if status is not None:
            return status
        for factory in run.front_factories:
            try:
                front = factory()
                front.start()
            except Exception as exc:
                click.echo(f"nemodiff serve: a front could not start: {exc}", err=True)
                _stop_fronts(fronts)
                _shut_down(run, process, [])
                return 1
            fronts.append(front)
        _banner(run, fronts)
        last_expiry = time.monotonic()
        while not stop.wait(POLL_S):
            if process.poll() is not None:
                reader.join(timeout=2)
                click.echo(f"nemodiff serve: tritonserver exited unexpectedly ({process.returncode})", err=True)
                return process.returncode or 1
            if run.control.has(FAILED):
                return _engine_failed(run, process, fronts)
            if time.monotonic() - last_expiry > CANCEL_EXPIRY_S / 3:
                last_expiry = time.monotonic()
                run.control.expire(CANCEL_EXPIRY_S)
        return _shut_down(run, process, fronts)
    finally:
        _stop_fronts(fronts)
        if process.poll() is None:
            process.kill()
            process.wait()
        _clean_up(run, process)
        reader.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_fronts(fronts: list) -> None:
    while fronts:
        try:
            fronts.pop().stop()
        except Exception as exc:
            click.echo(f"nemodiff serve: stopping a front failed: {exc}", err=True)


def _wait_ready(run: ServerRun, process, reader, stop: threading.Event) -> int | None:
    deadline = time.monotonic() + run.startup_timeout_s
    while not stop.is_set():
        if process.poll() is not None:
            reader.join(timeout=2)
            click.echo("nemodiff serve: tritonserver exited during startup; its last log lines:", err=True)
            click.echo("\n".join(run.tail), err=True)
            return process.returncode or 1
        if _answers(run.triton_url("/v2/health/ready")) and _answers(run.url("/metrics", run.metrics_port)):
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


def _banner(run: ServerRun, fronts: list) -> None:
    host = run.local_host
    lines = [f"  HTTP     http://{host}:{run.http_port}", f"  gRPC     {host}:{run.grpc_port}",
             f"  metrics  http://{host}:{run.metrics_port}/metrics",
             f"  generate http://{host}:{run.http_port}/v2/models/{run.model_name}/generate "
             "(streaming: /generate_stream)"]
    lines += [f"  {front.name:<8} {front.url}/v1 (completions, chat/completions, models)" for front in fronts
              if front.name == "OpenAI"]
    click.echo("nemodiff serve: ready\n" + "\n".join(lines), err=True)


def _shut_down(run: ServerRun, process, fronts: list) -> int:
    """Drain, stop the fronts, stop Triton: exit 0 within the exit timeout (see the module docstring)."""
    deadline = time.monotonic() + run.exit_timeout_s
    click.echo("nemodiff serve: stopping: answering open requests", err=True)
    run.control.set(DRAIN)
    drain_until = min(deadline, time.monotonic() + DRAIN_TIMEOUT_S)
    while not run.control.has(DRAINED) and time.monotonic() < drain_until and process.poll() is None:
        time.sleep(0.02)
    drained = run.control.has(DRAINED)
    _stop_fronts(fronts)
    returncode = _stop_server(run, process, deadline, drained)
    if returncode in (0, -signal.SIGINT, -signal.SIGTERM) or (drained and returncode == 1):
        click.echo("nemodiff serve: server stopped", err=True)
        return 0
    return returncode if returncode >= 0 else 128 - returncode


def _engine_failed(run: ServerRun, process, fronts: list) -> int:
    reason = run.control.read(FAILED)
    click.echo(f"nemodiff serve: the engine failed ({reason}); every open request was answered with an error. "
               f"Taking the model down and exiting with status {ENGINE_FAILED_EXIT} for a restart.", err=True)
    _answers(run.triton_url(f"/v2/repository/models/{run.model_name}/unload"), method="POST", timeout=30,
             headers=run.auth())
    time.sleep(FAILURE_LINGER_S)
    _stop_fronts(fronts)
    _stop_server(run, process, time.monotonic() + run.exit_timeout_s, True)
    return ENGINE_FAILED_EXIT


def _stop_server(run: ServerRun, process, deadline: float, drained: bool) -> int:
    """SIGTERM, then wait for Triton, which may never get out once the model is drained (module docstring)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    unloaded_at = None
    while process.poll() is None:
        now = time.monotonic()
        if unloaded_at is None and run.control.has(FINALIZED):
            unloaded_at = now
        if unloaded_at is not None and now - unloaded_at > GRPC_GRACE_S:
            reason = "it was waiting for gRPC clients to close their streams"
        elif drained and unloaded_at is None and now - sent > UNLOAD_GRACE_S:
            reason = ("Triton could not unload the drained model (Triton 2.51 keeps a request of a gRPC stream that "
                      "was cancelled just as it finished)")
        elif now > deadline:
            reason = f"it was still running after the exit timeout ({run.exit_timeout_s:g} s)"
        else:
            time.sleep(0.05)
            continue
        click.echo(f"nemodiff serve: stopping tritonserver: {reason}; every request was answered", err=True)
        process.kill()
        process.wait()
        return 0 if drained else -signal.SIGKILL
    return process.returncode


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
