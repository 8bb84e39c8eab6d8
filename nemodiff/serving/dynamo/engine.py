"""nemodiff as a Dynamo backend: an `LLMEngine` (Dynamo's Python backend API) on an `AsyncEngine`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: the Dynamo worker's engine] ──▶ Dynamo's frontend

Dynamo's `Worker` drives the lifecycle: `start()` loads the engine and returns what is registered
(the model card, the context length, the KV block size = our page size); `generate()` is called
concurrently, one call per request, with token ids in and chunks of token ids out (a chunk may carry
several tokens: a diffusion block or an accepted draft); `abort()` comes when the client hangs up;
`cleanup()` at shutdown (SIGTERM: Dynamo unregisters the worker, lets the requests in flight finish,
then calls it). Requests of any decode mode share the engine's batch, as under `nemodiff serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from dynamo.common.backend import EngineConfig, LLMEngine, LlmRegistration, WorkerConfig
from dynamo.common.backend.publisher import ComponentSnapshot, PushSource
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument, Unknown

from nemodiff.engine_format import EngineConfig as NemodiffConfig
from nemodiff.serving.async_engine import AsyncEngine

from .card import ensure_card
from .kv_events import KvEventRelay
from .metrics import WorkerMetrics
from .requests import RequestError, chunk, final_fields, leading_special_ids, prompt_ids, sampling_params

log = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """What `nemodiff worker` was asked for."""

    engine_dir: Path
    discovery_backend: str = "etcd"
    namespace: str = "dynamo"
    component: str = "nemodiff"
    served_model_name: str | None = None
    metrics_port: int | None = None
    mode: str = "ar"
    device: str | None = None
    kernels: str = "auto"
    max_queue: int | None = None
    request_timeout: float | None = None
    request_plane: str = "tcp"
    card_dir: Path | None = None
    drain_timeout: float = 30.0

    @classmethod
    def parse(cls, argv: list[str]) -> WorkerOptions:
        """ENGINE_DIR and `--field-name value` for the other fields (what `nemodiff worker` passes on)."""
        parser = argparse.ArgumentParser(prog="nemodiff worker")
        parser.add_argument("engine_dir", type=Path)
        for item in fields(cls)[1:]:
            kind = {"int | None": int, "float | None": float, "float": float, "Path | None": Path}.get(str(item.type), str)
            parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, type=kind, default=item.default)
        return cls(**vars(parser.parse_args(argv)))

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.engine_dir).resolve().name

    def worker_config(self, card: Path) -> WorkerConfig:
        return WorkerConfig(namespace=self.namespace, component=self.component, endpoint="generate",
                            model_name=str(card), served_model_name=self.model_name,
                            endpoint_types="chat,completions", discovery_backend=self.discovery_backend,
                            request_plane=self.request_plane)


class NemodiffEngine(LLMEngine):
    """One engine directory served to Dynamo."""

    def __init__(self, options: WorkerOptions, card: Path):
        self.options = options
        self.card = card
        self.config = NemodiffConfig.load(Path(options.engine_dir))
        self.llm = None
        self.engine: AsyncEngine | None = None
        self.metrics: WorkerMetrics | None = None
        self.relay: KvEventRelay | None = None
        self.leading: list[int] = []
        self._handles: dict[str, object] = {}  # Dynamo request id -> our Handle

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple[NemodiffEngine, WorkerConfig]:
        """Dynamo's factory: `argv` as `nemodiff worker` takes them (ENGINE_DIR [--option value ...])."""
        return cls.create(WorkerOptions.parse(list(sys.argv[1:] if argv is None else argv)))

    @classmethod
    def create(cls, options: WorkerOptions) -> tuple[NemodiffEngine, WorkerConfig]:
        config = NemodiffConfig.load(Path(options.engine_dir))
        card = ensure_card(Path(options.engine_dir), config, options.card_dir)
        return cls(options, card), options.worker_config(card)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, worker_id: int) -> EngineConfig:
        from nemodiff.runtime.llm import LLM

        options = self.options
        self.llm = await asyncio.to_thread(LLM, options.engine_dir, device=options.device, kernels=options.kernels)
        self.engine = AsyncEngine(self.llm, max_queue=options.max_queue, request_timeout_s=options.request_timeout)
        self.leading = leading_special_ids(self.llm.tokenizer)
        cache = self.llm.engine.cache
        self.relay = KvEventRelay(cache.page_size, self.leading[0] if len(self.leading) == 1 else None,
                                  snapshot=self._load_snapshot)
        if cache.prefix is not None:
            cache.prefix.listener = self.relay.listen
        self.metrics = WorkerMetrics(self.engine)
        if options.metrics_port is not None:
            self.metrics.serve(options.metrics_port)
        build = self.config.build
        log.info("nemodiff worker %s: serving %s as %r (pages of %d tokens, %d pages)", worker_id,
                 options.engine_dir, options.model_name, cache.page_size, cache.num_pages)
        return EngineConfig(model=str(self.card), served_model_name=options.model_name,
                            llm=LlmRegistration(context_length=build.max_seq_len, kv_cache_block_size=cache.page_size,
                                                total_kv_blocks=cache.num_pages,
                                                max_num_seqs=self.llm.max_batch_size))

    async def kv_event_sources(self):
        if self.relay is None or self.llm is None or self.llm.engine.cache.prefix is None:
            return []
        return [PushSource(on_ready=self.relay.attach, dp_rank=0)]

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher) -> None:
        if self.relay is not None:
            self.relay.snapshot_publisher = publisher

    def _load_snapshot(self) -> ComponentSnapshot:
        snap = self.engine.metrics()
        used, total = snap["kv_cache_pages_used"], max(snap["kv_cache_pages_total"], 1)
        queries = snap["prefix_cache_queries"]
        return ComponentSnapshot(kv_used_blocks=used, kv_total_blocks=total, gpu_cache_usage=used / total, dp_rank=0,
                                 kv_cache_hit_rate=snap["prefix_cache_hits"] / queries if queries else None)

    async def cleanup(self) -> None:
        """Dynamo calls this once the worker left discovery (no new requests come): the requests in flight
        finish (up to --drain-timeout seconds), the rest get an "unavailable" answer, then the engine stops."""
        if self.engine is not None:
            deadline = time.monotonic() + self.options.drain_timeout
            while self.engine.metrics()["requests_in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.relay is not None:  # the load snapshots read the engine: stop them before it goes
                self.relay.close()
                self.relay = None
            done = self.engine.drain()
            await asyncio.to_thread(done.wait, 10.0)
            await asyncio.to_thread(self.engine.shutdown)
            self.engine = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, request, context):
        engine = self.engine
        if engine is None:
            raise EngineShutdown("the nemodiff worker is shutting down")
        prompt = prompt_ids(request.get("token_ids") or [], self.leading)
        try:
            params = sampling_params(request, self.options.mode, self.config.build.max_seq_len, len(prompt),
                                     list(self.config.model.eos_token_ids))
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        started = time.monotonic()
        handle = engine.submit(prompt, params, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        key = context.id()
        self._handles[key] = handle
        first = True
        try:
            while True:
                update = await updates.get()
                if update.token_ids and first:
                    first = False
                    self.metrics.observe_ttft(params.mode, time.monotonic() - started)
                if update.finished:
                    self.metrics.observe_final(params.mode, update)
                    if update.error is not None:
                        raise _error(update)
                    yield chunk(update, self.llm.tokenizer) | final_fields(update, len(prompt))
                    return
                if update.token_ids:
                    yield chunk(update, self.llm.tokenizer)
        finally:
            self._handles.pop(key, None)
            engine.cancel(handle)  # a stream Dynamo stopped reading frees its pages

    async def abort(self, context) -> None:
        handle = self._handles.pop(context.id(), None)
        if handle is not None and self.engine is not None:
            self.engine.cancel(handle)


def _error(update) -> Exception:
    if update.error_kind == "invalid":
        return InvalidArgument(update.error)
    if update.error_kind == "unavailable":
        return EngineShutdown(update.error)
    return Unknown(update.error)
