"""`nemodiff worker ENGINE_DIR`: serve an engine as a worker of NVIDIA Dynamo (docs/dynamo.md).

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: `nemodiff worker`] ──▶ Dynamo's frontend

The worker takes no client connections of its own: it registers the model with Dynamo's discovery
(a folder with `--discovery-backend file`, etcd, or Kubernetes) and Dynamo's frontend sends it
requests. Dynamo (`pip install 'nemodiff[dynamo]'`) is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from nemodiff.runtime.request import mode_param

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
DISCOVERY_BACKENDS = ("file", "etcd", "kubernetes")
KERNEL_MODES = ["auto", "off", "interpret", "aot-check", "jit", "aot"]


@click.command(context_settings=CONTEXT)
@click.argument("engine_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--discovery-backend", type=click.Choice(DISCOVERY_BACKENDS), default="etcd",
              help="Where the worker registers: file (a folder named by DYN_FILE_KV; one machine), etcd (ETCD_ENDPOINTS), "
                   "kubernetes (the pod's namespace, under Dynamo's operator).")
@click.option("--namespace", default="dynamo", help="Dynamo namespace (the frontend's --namespace).")
@click.option("--component", default="nemodiff", help="Dynamo component name of the workers.")
@click.option("--served-model-name", default=None, help="Model name clients ask for [default: the engine folder's name].")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve the nemodiff_* Prometheus series on this port (/metrics).")
@click.option("--mode", type=mode_param(), default="ar",
              help="Decode mode of requests without a decode_mode:<mode> annotation.")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--kernels", type=click.Choice(KERNEL_MODES), default="auto", help="Kernel mode (see nemodiff generate).")
@click.option("--max-queue", type=click.IntRange(0, None), default=None,
              help="Requests allowed to wait beyond the running batch; past it a request is refused [default: no limit].")
@click.option("--request-timeout", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Deadline of every request in seconds [default: none].")
@click.option("--request-plane", type=click.Choice(["tcp", "nats"]), default="tcp",
              help="How the frontend reaches the worker (tcp needs no NATS).")
@click.option("--card-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the Hugging Face model card for Dynamo's frontend is written [default: ~/.cache/nemodiff/"
                   "dynamo-cards]; every worker of one engine must use the same.")
@click.option("--drain-timeout", type=click.FloatRange(0, None), default=30.0,
              help="On SIGTERM: seconds the requests in flight may take to finish before they are ended.")
def worker(**options) -> None:
    """Serve ENGINE_DIR as a worker of NVIDIA Dynamo (its frontend is the front door)."""
    try:
        from dynamo.common.backend.run import run
    except ImportError as exc:
        raise click.ClickException(f"NVIDIA Dynamo is not installed ({exc}); pip install 'nemodiff[dynamo]'") from None
    from .engine import NemodiffEngine, WorkerOptions

    engine, config = NemodiffEngine.create(WorkerOptions(**options))

    async def factory(argv):
        return engine, config

    run(NemodiffEngine, engine_factory=factory)
