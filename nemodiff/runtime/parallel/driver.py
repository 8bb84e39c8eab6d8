"""Rank 0 of a tensor-parallel engine: starts the workers, sends them every step, stops them.

checkpoint ──builder──▶ engine dir ──[runtime: tensor parallelism, rank 0]──▶ Triton

Rank 0 is the process that runs the engine (scheduler, strategies, decider). Its model's
`driver` is a `TensorParallelDriver`: before each forward it sends the workers the packed
batch and the page-table rows that changed, then runs its own shard; the workers run theirs
(`worker.py`) and the forward's collectives line them up. Only rank 0 gets logits.

Workers are child processes (`python -m nemodiff.runtime.parallel.worker`) that start with the
engine and stop with it. A worker that died (checked before every step), a collective that
fails or times out, or any error after a step was sent leaves the ranks out of step, so the
driver stops the workers and every later step raises `TensorParallelError` at once: the
requests get errors, nothing hangs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nemodiff.runtime.model.kv_cache import PagedKVCache

from .comm import Op, TensorParallel, TensorParallelError, control_message, open_store, step_message

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a worker needs to load its shard and join the group (sent as JSON on its command line)."""

    rank: int
    size: int
    store_port: int
    device: str
    step_timeout_s: float
    engine_dir: str | None = None  # an engine's shard ...
    verify: bool = True
    kernels: str = "auto"  # load_kernels mode of every rank
    sm_count: int | None = None  # split plans as on a GPU of this many SMs (None: the device's own)
    # ... or a model made by a factory "module:function" called as f(device, rank, size, **factory_args)
    # (benchmarks build random weights this way; the runtime imports nothing of theirs)
    model_factory: str | None = None
    factory_args: dict = field(default_factory=dict)


def python_executable() -> str:
    """This interpreter (an embedding host such as Triton's Python stub is not one: use its prefix's python)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for name in (version, "python3"):
        candidate = Path(sys.prefix) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return sys.executable


class TensorParallelDriver:
    def __init__(self, store, workers: list[subprocess.Popen], devices: list[torch.device],
                 step_timeout_s: float, startup_timeout_s: float):
        self.store, self.workers, self.devices = store, workers, devices
        self.step_timeout_s, self.startup_timeout_s = step_timeout_s, startup_timeout_s
        self.size = len(devices)
        self.tp: TensorParallel | None = None
        self.broken: str | None = None
        self._cache: PagedKVCache | None = None
        self._closed = False
        self.builder = self.dtype = None  # rank 0's batch builder and model dtype, once connected

    # -- start -------------------------------------------------------------------------------
    @classmethod
    def launch(cls, devices: list[torch.device], source: dict, step_timeout_s: float = 300.0,
               startup_timeout_s: float = 600.0) -> "TensorParallelDriver":
        """Start ranks 1..N-1 (they load their shards while the caller loads rank 0's).

        source: {"engine_dir": ..., "verify": ...} or {"model_factory": "module:function", "factory_args": {...}}.
        """
        store = open_store(None, startup_timeout_s)
        workers = []
        try:
            for rank in range(1, len(devices)):
                spec = WorkerSpec(rank=rank, size=len(devices), store_port=store.port, device=str(devices[rank]),
                                  step_timeout_s=step_timeout_s, **source)
                workers.append(subprocess.Popen([python_executable(), "-m", "nemodiff.runtime.parallel.worker",
                                                 json.dumps(asdict(spec))], stdin=subprocess.DEVNULL))
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        return cls(store, workers, devices, step_timeout_s, startup_timeout_s)

    def connect(self, model) -> None:
        """Wait until every worker has loaded its shard, then join the group; `model` is rank 0's."""
        deadline = time.monotonic() + self.startup_timeout_s
        waiting = set(range(1, self.size))
        while waiting:
            for rank in sorted(waiting):
                exited = self.workers[rank - 1].poll() is not None  # before the check: its reason is stored first
                if self.store.check([f"failed/{rank}"]):
                    reason = self.store.get(f"failed/{rank}").decode(errors="replace")
                    self.close()
                    raise TensorParallelError(f"tensor-parallel rank {rank} failed to start: {reason}")
                if self.store.check([f"ready/{rank}"]):
                    waiting.discard(rank)
                elif exited:
                    self._check_workers(starting=True)
            if waiting and time.monotonic() > deadline:
                self.close()
                raise TensorParallelError(f"tensor-parallel ranks {sorted(waiting)} not ready after "
                                          f"{self.startup_timeout_s:.0f} s")
            if waiting:
                time.sleep(0.05)
        self._check_workers(starting=True)
        self.tp = TensorParallel.connect(self.store, 0, self.size, self.devices[0], model.config.vocab_size,
                                         self.step_timeout_s)
        self.builder, self.dtype = model.builder, model.dtype
        model.tp, model.driver = self.tp, self

    # -- steps -------------------------------------------------------------------------------
    def run_step(self, batch, cache: PagedKVCache | None, run_local):
        """Send the step to the workers, then run rank 0's shard; returns the logits."""
        if self.broken is not None:
            raise TensorParallelError(self.broken)
        self._check_workers()
        try:
            if cache is not None and cache is not self._cache:
                self._send_cache(cache)
            rows = cache.sync_tables() if cache is not None else []
            sizes, flat64, flat32, image_rows = self.builder.packed()
            self.tp.send(step_message(sizes, flat64, flat32, image_rows, rows, cache, batch.shape_key))
            if batch.image_embeds is not None:
                self.tp.broadcast_tensor(batch.image_embeds.to(self.dtype).contiguous())
            return run_local(batch, cache)
        except Exception as exc:
            self._fail(f"tensor-parallel step failed: {exc}")
            raise TensorParallelError(self.broken) from exc

    def mirror_cache(self, cache: PagedKVCache) -> None:
        """Allocate the workers' KV caches for their heads with `cache`'s geometry (fails early on no memory)."""
        if self.broken is not None:
            raise TensorParallelError(self.broken)
        try:
            self._send_cache(cache)
        except Exception as exc:
            self._fail(f"tensor-parallel cache setup failed: {exc}")
            raise TensorParallelError(self.broken) from exc

    def capture_graphs(self, max_seq_len: int, block_length: int, lora: bool, max_batch_size: int) -> None:
        """Workers capture the same CUDA graphs as rank 0, in the same order (their collectives pair up)."""
        self.tp.send(control_message(Op.GRAPHS, max_seq_len, block_length, int(lora), max_batch_size))

    def _send_cache(self, cache: PagedKVCache) -> None:
        self.tp.send(control_message(Op.CACHE, cache.num_pages, cache.page_size, cache.max_pages_per_request,
                                     cache.tables_host.shape[0] - 1))
        cache.mark_tables_changed()  # the workers' new cache gets every row with the next step
        self._cache = cache

    # -- liveness and shutdown ---------------------------------------------------------------
    def _check_workers(self, starting: bool = False) -> None:
        for rank, worker in enumerate(self.workers, start=1):
            code = worker.poll()
            if code is not None:
                message = f"tensor-parallel rank {rank} (pid {worker.pid}) exited with status {code}"
                self._fail(message)
                raise TensorParallelError(message + (" while starting" if starting else ""))

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("nemodiff: %s; stopping the tensor-parallel workers", reason)
        self._stop_workers(graceful=False)

    def close(self) -> None:
        """Stop the workers (a STOP message when the group is healthy, else a kill)."""
        if self._closed:
            return
        self._closed = True
        graceful = self.broken is None and self.tp is not None
        if graceful:
            try:
                self.tp.send(control_message(Op.STOP))
            except Exception:
                graceful = False
        self.broken = self.broken or "the engine was closed"
        self._stop_workers(graceful)

    def _stop_workers(self, graceful: bool) -> None:
        for worker in self.workers:
            if worker.poll() is None and not graceful:
                worker.kill()
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
