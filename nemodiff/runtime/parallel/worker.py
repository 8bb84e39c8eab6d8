"""A tensor-parallel worker (rank 1..N-1): loads its shard, then runs every forward rank 0 sends.

checkpoint ──builder──▶ engine dir ──[runtime: tensor parallelism, worker]──▶ Triton

`python -m nemodiff.runtime.parallel.worker SPEC_JSON`, started by `TensorParallelDriver.launch`.
The worker keeps its own paged KV cache for its KV heads; its page tables follow rank 0's
row by row. It runs the same `Model.run` as rank 0 (reference path, kernels or CUDA graphs
alike), so the collectives inside line up. It exits on STOP, and on any error (including a
vanished rank 0, which closes the group's connections), which rank 0 sees as a failed group.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time

import torch

from nemodiff.runtime.model.kv_cache import PagedKVCache

from .comm import Op, TensorParallel, open_store, read_step
from .driver import WorkerSpec

log = logging.getLogger(__name__)


def _load_model(spec: WorkerSpec, device: torch.device):
    if spec.engine_dir is not None:
        from nemodiff.runtime.model.loader import load_engine

        return load_engine(spec.engine_dir, device=device, verify=spec.verify, rank=spec.rank,
                           kernels=spec.kernels, sm_count=spec.sm_count).model
    module, name = spec.model_factory.split(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(device, spec.rank, spec.size, **spec.factory_args)


def _exit_when_orphaned(parent: int) -> None:
    """Rank 0 is gone (killed before it could stop us): leave, whatever the group is doing."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.device = torch.device(spec.device)
        self.store = open_store(spec.store_port, spec.step_timeout_s)
        try:
            self.model = _load_model(spec, self.device)
        except Exception as exc:
            self.store.set(f"failed/{spec.rank}", f"{type(exc).__name__}: {exc}")
            raise
        self.model.platform.prepare_process()
        self.model.platform.bind_thread()  # this process's main thread runs the rank: its device and stream
        self.store.set(f"ready/{spec.rank}", "1")
        self.tp = TensorParallel.connect(self.store, spec.rank, spec.size, self.device,
                                         self.model.config.vocab_size, spec.step_timeout_s)
        self.model.tp = self.tp
        self.cache: PagedKVCache | None = None

    def serve(self) -> None:
        while True:
            message = self.tp.receive()
            op = int(message[0])
            if op == Op.STOP:
                return
            if op == Op.STEP:
                self._step(message)
            elif op == Op.CACHE:
                self._new_cache(*(int(v) for v in message[2:6]))
            elif op == Op.GRAPHS:
                self._capture_graphs(*(int(v) for v in message[2:6]))
            else:
                raise RuntimeError(f"unknown tensor-parallel message {op}")

    @torch.inference_mode()
    def _step(self, message) -> None:
        plan = read_step(message)
        cache = self.cache if plan.has_cache else None
        if cache is not None:
            cache.mirror_rows(plan.table_shape[0], plan.table_rows, plan.table_values)
        embeds = None
        if plan.image_rows is not None:
            embeds = torch.empty(len(plan.image_rows), self.model.config.hidden_size, dtype=self.model.dtype,
                                 device=self.device)
            self.tp.broadcast_tensor(embeds)
        batch = self.model.builder.unpack(plan.sizes, plan.flat64, plan.flat32,
                                          plan.image_rows, embeds, plan.shape_key)
        self.model.run(batch, cache)

    def _new_cache(self, num_pages: int, page_size: int, max_pages: int, max_requests: int) -> None:
        self.cache = None  # free the old pool first
        model, cfg = self.model, self.model.config
        self.cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, page_size, num_pages,
                                  model.dtype, model.platform, max_pages_per_request=max_pages,
                                  max_requests=max_requests)

    def _capture_graphs(self, max_seq_len: int, block_length: int, lora: int, max_batch_size: int) -> None:
        from nemodiff.runtime.model.graphs import GraphRunner, declared_shapes

        self.model.graphs = GraphRunner(self.model, self.cache, max_seq_len, max_batch_size)
        self.model.graphs.capture_steady_shapes(declared_shapes(block_length, bool(lora)))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = WorkerSpec(**json.loads(argv[0]))
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        worker = Worker(spec)
        worker.serve()
    except Exception as exc:
        log.error("rank %d: %s: %s", spec.rank, type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
