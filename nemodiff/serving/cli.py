"""`nemodiff serve ENGINE_DIR`: run an engine behind Triton Inference Server.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: nemodiff serve]

Lays out a model repository (the `nemodiff/model_repo/nemodiff` model with its config filled in,
including where this interpreter finds its packages, so the Python backend runs the
installation `nemodiff` runs from however it was started), finds a tritonserver (NVIDIA's
container first, else the one in the nvidia-pytriton wheel), starts it in a scratch
directory with its HTTP on an internal loopback port, puts the HTTP front on the public HTTP
port (and the OpenAI-compatible API on its own, if asked for), and supervises them
(`nemodiff.serving.process`). With `--api-key`, Triton's restricted-API options ask for the
same key on its side. Exits 0 after a clean SIGINT/SIGTERM shutdown, 3 when the engine failed
(so a supervisor restarts it), else the server's status.

Replicas are Triton model instances: `--gpus 0,1,2,3` gives one engine per GPU (with
`--tp 2`, one per pair of GPUs: 0,1 and 2,3), `--instances N` N engines on the CPU; Triton
spreads requests over them. A tensor-parallel instance is rank 0 of its group and starts
the other ranks itself (see `instance_groups`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path

import click

from nemodiff.engine_format import EngineFormatError
from nemodiff.runtime.request import mode_param
from nemodiff.serving.control import API_KEY_ENV, GRPC_AUTH, Control, FrontErrors
from nemodiff.serving.triton_layout import (
    CONTAINER_BACKENDS,
    MODEL_NAME,
    find_tritonserver,
    prepare_backends,
    write_model_repository,
)

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
# What --api-key guards on Triton's side: all but health and metadata (probes and clients' discovery stay open)
RESTRICTED_APIS = "inference,model-config,model-repository,shared-memory,statistics,trace,logging"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (all held open while choosing)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '4096' -> 4096."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; use bytes or a suffix such as KiB, MiB, GiB, MB, GB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return value


def instance_groups(kind: str, tp: int, gpus: list[int] | None, instances: int) -> tuple[str, str]:
    """The model's instance_group entries and its `tp_gpu_groups` parameter.

    GPU: one instance per tensor-parallel group of `tp` consecutive GPUs of `gpus`, placed on the
    group's first GPU (the instance starts the group's other ranks on the others). CPU: `instances`
    instances. Returns (instance_group text, "0,1;2,3" or "").
    """
    if instances < 1:
        raise ValueError("--instances must be at least 1")
    if kind == "cpu":
        return f"{{ count: {instances}, kind: KIND_CPU }}", ""
    if not gpus:
        return f"{{ count: {instances}, kind: KIND_GPU }}", ""
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"--gpus {','.join(map(str, gpus))}: give distinct GPU indices")
    if len(gpus) % tp:
        raise ValueError(f"--gpus names {len(gpus)} GPUs, not a multiple of --tp {tp}")
    groups = [gpus[i: i + tp] for i in range(0, len(gpus), tp)]
    entries = ", ".join(f"{{ count: 1, kind: KIND_GPU, gpus: [ {group[0]} ] }}" for group in groups)
    return entries, ";".join(",".join(map(str, group)) for group in groups)


def _parse_gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise click.BadParameter("wants comma-separated GPU indices, e.g. 0,1,2,3", param_hint="--gpus") from None


@click.command(context_settings=CONTEXT)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--http-port", type=int, default=8000, help="HTTP/REST port.")
@click.option("--grpc-port", type=int, default=8001, help="gRPC port.")
@click.option("--metrics-port", type=int, default=8002, help="Prometheus metrics port.")
@click.option("--host", type=str, default="0.0.0.0", help="Address HTTP, gRPC and metrics bind to.")
@click.option("--default-mode", type=mode_param(), default="ar",
              help="Decode mode of requests without decode_mode.")
@click.option("--kv-cache-memory", type=str, default=None,
              help="KV-cache pool size in bytes, suffixes allowed (e.g. 2GiB) [default: engine's max batch of "
                   "full-length sequences].")
@click.option("--max-batch-size", type=int, default=None, help="Most sequences running at once [default: engine's].")
@click.option("--max-num-batched-tokens", type=int, default=None, help="Most tokens in one forward.")
@click.option("--instance-kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Triton instance kind [default: gpu if CUDA is available, else cpu].")
@click.option("--device", type=str, default=None, help="torch device for the engine [default: from the instance].")
@click.option("--tp", type=int, default=None,
              help="Tensor-parallel ranks per engine; must match nemodiff-build --tp [default: the engine's].")
@click.option("--gpus", "gpus_text", type=str, default=None,
              help="GPUs to use, e.g. 0,1,2,3: one engine (Triton model instance) per GPU, or per --tp GPUs.")
@click.option("--instances", type=int, default=1, help="Engines (model instances) per GPU group, or on the CPU.")
@click.option("--model-repo", type=click.Path(path_type=Path), default=None,
              help="Where to lay out the model repository [default: a temporary folder removed on exit].")
@click.option("--tritonserver", "server_path", type=click.Path(path_type=Path), default=None,
              help="tritonserver binary [default: /opt/tritonserver, else the nvidia-pytriton wheel's].")
@click.option("--max-queue", type=int, default=256,
              help="Requests that may wait beyond the running batch; past it a request is refused at once "
                   "with UNAVAILABLE (HTTP 503).")
@click.option("--request-timeout", type=float, default=None,
              help="Seconds a request may take from arrival to its last token; past it, it ends with an error "
                   "and frees its pages [default: no limit]. A request's own `timeout` can only shorten it.")
@click.option("--grammar-timeout", type=float, default=10.0,
              help="Seconds a structured-output grammar may take to compile (beside the engine loop); past it "
                   "its request is a 400 naming the limit.")
@click.option("--max-request-bytes", type=str, default="8MiB",
              help="Largest prompt (text_input / input_ids / stop words) a request may carry, and the largest "
                   "OpenAI request body.")
@click.option("--max-n", type=int, default=16,
              help="Most completions per request (OpenAI n, Triton num_return_sequences); more is a 400.")
@click.option("--prefix-cache/--no-prefix-cache", default=True,
              help="Reuse the KV of prompt prefixes shared between requests.")
@click.option("--openai-port", type=int, default=None,
              help="Also serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) "
                   "on this port, in front of the same engine.")
@click.option("--served-model-name", type=str, default="nemodiff", help="Model name of the OpenAI API.")
@click.option("--api-key", type=str, default=None, envvar="NEMODIFF_API_KEY", show_envvar=True,
              help="Require this key: 'Authorization: Bearer KEY' on the HTTP and OpenAI ports, the gRPC metadata "
                   "'triton-grpc-protocol-authorization: Bearer KEY' on Triton's gRPC port (health, metadata and "
                   "metrics stay open).")
@click.option("--idle-timeout", type=float, default=30.0,
              help="Seconds a client of the HTTP or OpenAI port may take to send a complete request, or stay idle "
                   "between requests, before its connection is closed.")
@click.option("--exit-timeout", type=float, default=10.0,
              help="Seconds a SIGTERM/SIGINT stop may take, answering open requests included.")
@click.option("--startup-timeout", type=float, default=600.0, help="Seconds to wait for the server to be ready.")
@click.option("--log-verbose", type=int, default=0, help="Triton's --log-verbose level.")
def serve(engine_dir: Path, http_port: int, grpc_port: int, metrics_port: int, host: str, default_mode: str,
          kv_cache_memory: str | None, max_batch_size: int | None, max_num_batched_tokens: int | None,
          instance_kind: str | None, device: str | None, tp: int | None, gpus_text: str | None, instances: int,
          model_repo: Path | None, server_path: Path | None, max_queue: int, request_timeout: float | None,
          grammar_timeout: float, max_request_bytes: str, max_n: int, prefix_cache: bool, openai_port: int | None, served_model_name: str, api_key: str | None,
          idle_timeout: float, exit_timeout: float, startup_timeout: float, log_verbose: int) -> None:
    """Serve an engine with Triton Inference Server (HTTP, gRPC, metrics; optionally the OpenAI API)."""
    from nemodiff.serving.ports import check_ports
    from nemodiff.serving.process import ServerRun, run_server

    config = check_engine_at_startup(engine_dir, device)
    sizes = {}
    for name, text in (("--kv-cache-memory", kv_cache_memory), ("--max-request-bytes", max_request_bytes)):
        try:
            sizes[name] = parse_bytes(text) if text is not None else 0
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    for name, value in (("--max-batch-size", max_batch_size), ("--max-num-batched-tokens", max_num_batched_tokens)):
        if value is not None and value < 1:
            raise click.BadParameter("must be at least 1", param_hint=name)
    if max_n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-n")
    if max_queue < 0:
        raise click.BadParameter("must be at least 0", param_hint="--max-queue")
    for name, value in (("--request-timeout", request_timeout), ("--idle-timeout", idle_timeout),
                        ("--exit-timeout", exit_timeout), ("--grammar-timeout", grammar_timeout)):
        if value is not None and not value > 0:
            raise click.BadParameter("must be a positive number of seconds", param_hint=name)
    if api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", api_key):
        raise click.BadParameter("must be printable ASCII without spaces (it travels in an HTTP header)",
                                 param_hint="--api-key")
    if tp is not None and tp != config.build.tp:
        raise click.BadParameter(f"the engine was built for {config.build.tp} tensor-parallel rank(s); rebuild it "
                                 f"with nemodiff-build --tp {tp}", param_hint="--tp")
    gpus = _parse_gpus(gpus_text)
    if instance_kind is None:
        from nemodiff.device import default_device, is_cuda

        instance_kind = "gpu" if gpus or is_cuda(default_device()) else "cpu"
    if gpus and instance_kind == "cpu":
        raise click.BadParameter("--gpus needs GPU instances (drop --instance-kind cpu)", param_hint="--gpus")
    if instance_kind == "gpu" and config.build.tp > 1 and not gpus:
        gpus = list(range(config.build.tp))
    try:
        groups, tp_gpu_groups = instance_groups(instance_kind, config.build.tp, gpus, instances if not gpus else 1)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    taken = check_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port,
                               "--openai-port": openai_port})
    if taken:  # before anything starts: no Triton log to read through, no "ready"
        raise click.ClickException(taken)
    binary, wheel_root, libs = find_tritonserver(server_path)
    if wheel_root is None:
        _check_container_python()

    scratch = Path(tempfile.mkdtemp(prefix="nemodiff-serve-"))
    try:
        repo = (model_repo or scratch / "model_repo").resolve()
        control = Control(scratch / "control").create()
        write_model_repository(repo, {
            "engine_dir": str(engine_dir.resolve()), "kv_cache_memory_bytes": str(sizes["--kv-cache-memory"]),
            "max_batch_size": str(max_batch_size or 0), "max_num_batched_tokens": str(max_num_batched_tokens or 0),
            "default_mode": default_mode, "device": device or "", "instance_groups": groups,
            "tp": str(config.build.tp), "tp_gpu_groups": tp_gpu_groups,
            "max_queue": str(max_queue), "request_timeout_s": str(request_timeout or ""),
            "grammar_timeout_s": str(grammar_timeout),
            "max_request_bytes": str(sizes["--max-request-bytes"]), "python_site_dirs": json.dumps(site_dirs()),
            "python_path": json.dumps(import_path()),
            "python_env_path": json.dumps([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            "max_n": str(max_n), "prefix_cache": "true" if prefix_cache else "false",
            "control_dir": str(control.path), "supervisor_pid": str(os.getpid()),
        })
        backends = prepare_backends(wheel_root, scratch / "backends") if wheel_root else CONTAINER_BACKENDS
        env = dict(os.environ)
        if wheel_root is not None:  # the stub loads this interpreter's libpython and the wheel's bundled libs
            paths = [sysconfig.get_config_var("LIBDIR"), str(libs) if libs else None, env.get("LD_LIBRARY_PATH")]
            env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
            # The embedded interpreter finds its standard library (and a venv's pyvenv.cfg) by looking up
            # `python3` on PATH: put this interpreter first, whatever PATH the caller had.
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        shm_prefix = f"nemodiff_{os.getpid()}_"
        triton_http_port = free_ports(1)[0]  # Triton's HTTP, behind the HTTP front that takes --http-port
        command = [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
                   "--http-port", str(triton_http_port), "--grpc-port", str(grpc_port),
                   "--metrics-port", str(metrics_port), "--http-address", "127.0.0.1", "--grpc-address", host,
                   "--metrics-address", host, "--log-verbose", str(log_verbose), "--exit-on-error", "true",
                   "--disable-auto-complete-config", "--model-control-mode", "explicit", "--load-model", MODEL_NAME,
                   "--backend-config", f"python,shm-region-prefix-name={shm_prefix}",
                   "--exit-timeout-secs", str(max(1, round(exit_timeout)))]
        if api_key is not None:  # Triton checks the header too (its HTTP behind the front, its gRPC directly)
            restricted = f"{RESTRICTED_APIS}:authorization=Bearer {api_key}"
            # gRPC inference: the model checks the key (Triton compares it exactly; we take any spelling of Bearer)
            command += ["--http-restricted-api", restricted, "--grpc-restricted-protocol",
                        restricted.replace("inference,", ""), "--grpc-header-forward-pattern", f"^{GRPC_AUTH}$"]
        env.pop(API_KEY_ENV, None)  # the model's copy of the key: this one, or none
        if api_key is not None:
            env[API_KEY_ENV] = api_key
        if instance_kind == "cpu":  # no GPU work: no GPU metrics (NVML) and no pinned staging memory
            command += ["--allow-gpu-metrics", "false", "--pinned-memory-pool-byte-size", "0"]
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where to reach it from here
        local = f"[{local}]" if ":" in local else local
        front_errors = FrontErrors(control)

        def http_front():
            from nemodiff.serving.http.front import TritonFront
            from nemodiff.serving.http.server import ServerThread

            app = TritonFront(f"http://127.0.0.1:{triton_http_port}", api_key, control, front_errors,
                              metrics_url=f"http://{local}:{metrics_port}/metrics")
            return ServerThread(app, host, http_port, idle_timeout, "HTTP")

        fronts = [http_front]
        if openai_port is not None:
            def openai_front():
                from nemodiff.serving.openai.frontend import FrontendThread

                return FrontendThread(engine_dir.resolve(), f"{local}:{grpc_port}", host, openai_port,
                                      served_model_name, sizes["--max-request-bytes"], MODEL_NAME, api_key=api_key,
                                      idle_timeout=idle_timeout, front_errors=front_errors, max_n=max_n,
                                      metrics_url=f"http://{local}:{metrics_port}/metrics")

            fronts.append(openai_front)
        placement = f"GPU groups {tp_gpu_groups}" if tp_gpu_groups else f"{instances} {instance_kind} instance(s)"
        click.echo(f"nemodiff serve: engine {engine_dir} ({config.build.dtype}, max seq {config.build.max_seq_len}, "
                   f"block {config.build.block_length}, tp {config.build.tp}), {placement}, tritonserver {binary}",
                   err=True)
        sys.exit(run_server(ServerRun(
            command=command, env=env, cwd=scratch, control=control, shm_prefix=shm_prefix, local_host=local,
            http_port=http_port, triton_http_port=triton_http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            model_name=MODEL_NAME, exit_timeout_s=exit_timeout, startup_timeout_s=startup_timeout,
            front_factories=fronts, api_key=api_key)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_engine_at_startup(engine_dir: Path, device: str | None):
    """The whole engine checked before Triton starts (config, manifest and hashes, weight headers, tokenizer,
    --device), so that a broken one is refused with one line, the last printed, not deep in Triton's log."""
    from nemodiff.device import DeviceError, resolve_device
    from nemodiff.runtime.model.loader import check_engine
    from nemodiff.runtime.text.tokenizer import EngineTokenizer

    try:
        config = check_engine(engine_dir)
        EngineTokenizer(engine_dir, vocab_size=config.model.vocab_size)
        if device:
            resolve_device(device)
    except (EngineFormatError, DeviceError, OSError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    return config


def site_dirs() -> list[str]:
    """This interpreter's site directories (a venv's, or the system's, and the user site when enabled)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def import_path() -> list[str]:
    """This interpreter's import path, less the working directory (which must not shadow the package)."""
    cwd = os.getcwd()
    return [p for p in sys.path if p and p not in (".", cwd)]


def _check_container_python() -> None:
    """In NVIDIA's container the Python backend runs the container's own python3."""
    if sys.base_prefix != "/usr":
        click.echo(f"nemodiff serve: warning: Triton's Python backend in this container runs /usr/bin/python3, but "
                   f"nemodiff runs under {sys.executable} (Python {sys.version.split()[0]}); install nemodiff for "
                   "the container's Python (as docker/Dockerfile does), or a venv made from it", err=True)
