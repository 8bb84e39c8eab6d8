"""The Python API: `LLM(engine_dir).generate(prompts, params)`.

checkpoint ──builder──▶ engine dir ──[runtime: Python API]──▶ Triton

An engine built with `--tp N` runs on N ranks: this process is rank 0 (scheduler,
strategies, decisions and its own shard) and starts N-1 worker processes that live until
`close()` (or until the LLM is garbage-collected, or the interpreter exits).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemodiff.device import rank_devices, resolve_device
from nemodiff.engine_format import EngineConfig, EngineFormatError
from nemodiff.runtime.decoding.strategies.base import StrategyContext
from nemodiff.runtime.engine.loop import Engine
from nemodiff.runtime.engine.scheduler import SchedulerConfig
from nemodiff.runtime.images.feature_cache import VisionFeatureCache
from nemodiff.runtime.images.pipeline import ImagePipeline
from nemodiff.runtime.images.preprocess import ImageLimits
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.loader import load_engine, runtime_dtype
from nemodiff.runtime.parallel.driver import TensorParallelDriver
from nemodiff.runtime.text.tokenizer import EngineTokenizer

from .request import Request, SamplingParams


class EngineInUseError(RuntimeError):
    """generate() was called while another driver (an AsyncEngine) steps this LLM's engine."""


@dataclass
class RequestOutput:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    num_forward_passes: int
    seconds: float
    stats: dict = field(default_factory=dict)
    cached_prompt_tokens: int = 0  # prompt tokens whose KV the prefix cache supplied
    logprobs: list | None = None  # per output token a TokenLogprob (SamplingParams.logprobs), else None
    logprob_source: str | None = None  # "causal" (AR, the spec modes) or "denoise" (diffusion)
    index: int = 0  # which of the prompt's n choices

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else float(sum(e.logprob for e in self.logprobs if e is not None))

    @property
    def tokens_per_forward(self) -> float:
        return len(self.output_ids) / max(self.num_forward_passes, 1)

    def to_dict(self) -> dict:
        return {
            "output_ids": self.output_ids, "text": self.text, "finish_reason": self.finish_reason,
            "num_forward_passes": self.num_forward_passes,
            "tokens_per_forward": round(self.tokens_per_forward, 4), "seconds": round(self.seconds, 6),
            **({"logprobs": [e.to_dict() if e is not None else None for e in self.logprobs],
                "logprob_source": self.logprob_source} if self.logprobs is not None else {}),
            "stats": {"num_forward_passes": self.num_forward_passes,
                      "tokens_per_forward": round(self.tokens_per_forward, 4),
                      "cached_prompt_tokens": self.cached_prompt_tokens} | self.stats,
        }


class LLM:
    """A loaded engine with its tokenizer and KV cache.

    kv_cache_memory_bytes / num_kv_pages size the page pool; by default it holds
    max_batch_size full-length sequences (kv_cache_memory_bytes is per rank under tensor
    parallelism, where each rank caches its share of the KV heads). max_num_batched_tokens
    caps the tokens of one forward (longer prompts are prefilled in chunks).

    kernels: "auto" (the engine's compiled kernels on a matching GPU, else the PyTorch
    reference path), "off", "interpret" (the kernels' real code under Triton's interpreter, on
    the CPU: slow, for verification), "jit" (Triton's compiler on a GPU, for development) or
    "aot" (the compiled kernels, or an error), "aot-check" (on the CPU: the GPU launch path of an
    engine built for a GPU, every launch checked against its cubin, then interpreted).
    cuda_graphs: capture the declared steady step shapes at start (GPU kernel path only).
    sm_count: plan split-K and split-KV grids as on a GPU with that many SMs (132 for an H100 or
    H200): with "aot-check", the CPU runs the plans, split classes and merges that GPU would run.
    None: the device's own count (a small stand-in on the CPU).

    prefix_cache: reuse the KV pages of committed tokens across requests that share a prefix
    (docs/design.md §10); `cached_prompt_tokens` in a RequestOutput says how many prompt tokens
    a request did not compute.

    VLM engines also load the vision tower: `generate(..., images=...)` takes one list of
    images (paths, encoded bytes or PIL images) per prompt. vision_cache_bytes bounds the
    memory of reused vision-tower outputs (0 = no reuse); image_limits bounds what one request
    may send (encoded size, pixels, images per prompt).

    One driver at a time steps the engine: while an `AsyncEngine` (serving) drives it, `generate()`
    raises `EngineInUseError` instead of stepping it from a second thread (submit through the
    AsyncEngine, or shut it down first).

    tp must equal the engine's `--tp` when given. devices: one torch device per rank
    [default: cuda:i, cuda:i+1, ... from `device`, or the CPU for every rank]. A rank that
    fails or stops answering within tp_step_timeout_s fails the engine: every later step
    raises `TensorParallelError`.
    """

    def __init__(self, engine_dir: str | Path, device: str | torch.device | None = None,
                 kv_cache_memory_bytes: int | None = None, num_kv_pages: int | None = None,
                 max_batch_size: int | None = None, max_num_batched_tokens: int | None = None, verify: bool = True,
                 cuda_graphs: bool = True, kernels: str = "auto", vision_cache_bytes: int = 256 << 20,
                 image_limits: ImageLimits | None = None, tp: int | None = None,
                 devices: list[str | torch.device] | None = None, tp_step_timeout_s: float = 300.0,
                 prefix_cache: bool = True, sm_count: int | None = None):
        self.engine_dir = Path(engine_dir)
        if not self.engine_dir.is_dir():
            raise EngineFormatError(f"{engine_dir}: not a directory")
        self.config = EngineConfig.load(self.engine_dir)
        self.tp = _check_tp(self.config, tp)
        device = resolve_device(device)
        self._driver = None
        self._driven_by: str | None = None  # who steps the engine instead of generate(), see claim()
        self._claim_lock = threading.Lock()
        if self.tp > 1:
            ranks = [resolve_device(d) for d in devices] if devices else rank_devices(device, self.tp)
            if len(ranks) != self.tp:
                raise ValueError(f"devices names {len(ranks)} devices for {self.tp} tensor-parallel ranks")
            device = ranks[0]
            self._driver = TensorParallelDriver.launch(ranks, {"engine_dir": str(self.engine_dir.resolve()),
                                                               "verify": verify, "kernels": kernels,
                                                               "sm_count": sm_count},
                                                       tp_step_timeout_s)
        try:
            self._setup(device, kv_cache_memory_bytes, num_kv_pages, max_batch_size, max_num_batched_tokens,
                        verify, cuda_graphs, kernels, vision_cache_bytes, image_limits, prefix_cache, sm_count)
        except BaseException:
            if self._driver is not None:
                self._driver.close()
            raise
        self._finalizer = weakref.finalize(self, self._driver.close) if self._driver is not None else None

    def _setup(self, device, kv_cache_memory_bytes, num_kv_pages, max_batch_size, max_num_batched_tokens, verify,
               cuda_graphs, kernels, vision_cache_bytes, image_limits, prefix_cache, sm_count=None) -> None:
        build, mcfg = self.config.build, self.config.model
        kv_heads = mcfg.num_key_value_heads // self.tp
        self.max_batch_size = max_batch_size or build.max_batch_size
        if num_kv_pages is None:
            if kv_cache_memory_bytes is not None:
                num_kv_pages = PagedKVCache.pages_for_budget(
                    kv_cache_memory_bytes, mcfg.num_hidden_layers, kv_heads, mcfg.head_dim,
                    build.kv_page_size, runtime_dtype(self.config, device))
            else:
                # room for the longest sequence per slot, plus a block of speculative scratch
                per_seq = -(-(build.max_seq_len + 2 * build.block_length) // build.kv_page_size)
                num_kv_pages = self.max_batch_size * per_seq
        self.model = load_engine(self.engine_dir, device=device, verify=verify, kernels=kernels,
                                 sm_count=sm_count).model
        self.platform = self.model.platform
        self.platform.prepare_process()  # on the CPU: steps reuse the memory earlier steps freed
        with self.platform.on_device():  # caches, graphs and the engine on this engine's device
            self._start(build, mcfg, kv_heads, num_kv_pages, cuda_graphs, vision_cache_bytes, image_limits,
                        max_num_batched_tokens, prefix_cache)

    def _start(self, build, mcfg, kv_heads, num_kv_pages, cuda_graphs, vision_cache_bytes, image_limits,
               max_num_batched_tokens, prefix_cache) -> None:
        self.tokenizer = EngineTokenizer(self.engine_dir, vocab_size=mcfg.vocab_size)
        if self._driver is not None:
            self._driver.connect(self.model)
        pages_per_request = -(-(build.max_seq_len + 2 * build.block_length) // build.kv_page_size)
        self.cache = PagedKVCache(mcfg.num_hidden_layers, kv_heads, mcfg.head_dim, build.kv_page_size, num_kv_pages,
                                  self.model.dtype, self.platform, max_pages_per_request=pages_per_request,
                                  max_requests=2 * self.max_batch_size + 8, prefix_cache=prefix_cache)
        if self._driver is not None:
            self._driver.mirror_cache(self.cache)
        if cuda_graphs and self.model.uses_kernels(self.cache) and self.platform.gpu_path:
            from nemodiff.runtime.model.graphs import GraphRunner, declared_shapes

            if self._driver is not None:
                self._driver.capture_graphs(build.max_seq_len, build.block_length, self.model.has_lora,
                                            self.max_batch_size)
            self.model.graphs = GraphRunner(self.model, self.cache, build.max_seq_len, self.max_batch_size)
            self.model.graphs.capture_steady_shapes(declared_shapes(build.block_length, self.model.has_lora))
        eos_ids = list(mcfg.eos_token_ids)
        ctx = StrategyContext(model=mcfg, block_length=build.block_length, has_lora=self.model.has_lora,
                              think_end_id=self.tokenizer.think_end_id())
        # the default budget fits a full QuadraticSpec forward, k * (k + 1) tokens
        budget = max_num_batched_tokens or max(2048, build.block_length * (build.block_length + 1))
        scheduler = SchedulerConfig(max_num_seqs=self.max_batch_size, max_num_batched_tokens=budget)
        if self.model.kernels is not None:  # steps of the largest token budget keep their call plans
            from nemodiff.plugins.ops import PLAN_STEPS

            self.model.kernels.fit_plans(PLAN_STEPS * budget * self.model.plan_bytes_per_token())
        images = None
        if self.config.vision is not None:
            images = ImagePipeline.from_engine(self.engine_dir, self.config, self.model.dtype, self.model.device,
                                               cache_bytes=vision_cache_bytes, limits=image_limits)
        self.engine = Engine(self.model, self.cache, ctx, scheduler, build.max_seq_len, eos_ids,
                             decode=self.tokenizer.decode, images=images, tokenizer=self.tokenizer)

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for a single-rank engine)."""
        if self._finalizer is not None:
            self._finalizer()

    def claim(self, driver: str) -> None:
        """Hand the stepping of the engine to `driver` (e.g. "an AsyncEngine") until `release()`: generate()
        refuses meanwhile, and so does a second claim."""
        with self._claim_lock:
            if self._driven_by is not None:
                raise EngineInUseError(f"this LLM's engine is already driven by {self._driven_by}")
            self._driven_by = driver

    def release(self) -> None:
        """The driver that claimed the engine has stopped stepping it."""
        with self._claim_lock:
            self._driven_by = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        if chat:
            raise ValueError("chat=True needs text prompts, not token ids")
        return list(prompt)

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, images: list | None = None) -> list[RequestOutput]:
        """Generate for one or several prompts (text or token ids), all batched together.

        images: one list of images per prompt (a path, encoded bytes or a PIL image each; an empty
        list or None for a text-only prompt), or for a single prompt simply its list of images.
        An `[IMG]` token in a prompt marks where each image goes; without one the images go first.
        With SamplingParams.n > 1 a prompt gives n outputs, one after the other (`index` 0..n-1), each with
        its own seed derived from the request's; they share the prompt's KV pages (the prefix cache).
        """
        if self._driven_by is not None:  # two threads stepping one engine interleave their steps: refuse
            raise EngineInUseError(
                f"this LLM's engine is driven by {self._driven_by} on its own thread; generate() would step it "
                "from a second thread and corrupt both. Submit through that driver (AsyncEngine.generate or "
                "stream), or shut it down first")
        single = isinstance(prompts, str) or bool(prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        images_list = _images_per_prompt(images, len(prompts), single)
        with self.platform.on_device():  # this engine's device and stream, on the caller's thread
            return self._generate(prompts, params_list, images_list, chat)

    def _generate(self, prompts, params_list, images_list, chat) -> list[RequestOutput]:
        requests: list[Request] = []
        try:
            for prompt, p, prompt_images in zip(prompts, params_list, images_list):
                ids, leader = self.encode_prompt(prompt, chat), None
                for index in range(p.validate().n):
                    request = self.engine.add_request(ids, p.for_choice(index), prompt_images, leader=leader)
                    request.choice_index, leader = index, leader or request
                    requests.append(request)
            while any(not r.finished for r in requests):
                self.engine.step()
        except BaseException:
            for request in requests:  # leave the engine clean for the next call
                self.engine.abort(request)
            raise
        return [self._output(r) for r in requests]

    @property
    def vision_cache(self) -> VisionFeatureCache | None:
        """The cache of vision-tower outputs (None on a text-only engine or with the cache off)."""
        return self.engine.images.cache if self.engine.images is not None else None

    def _output(self, request: Request) -> RequestOutput:
        return RequestOutput(
            prompt_ids=request.prompt_ids, output_ids=list(request.output_ids), text=request.text,
            finish_reason=request.finish_reason, num_forward_passes=request.num_forwards,
            seconds=(request.end_time or time.perf_counter()) - request.start_time, stats=dict(request.stats),
            cached_prompt_tokens=request.cached_prompt_tokens, logprobs=request.logprobs, index=request.choice_index,
            logprob_source=None if request.logprobs is None else
            "denoise" if request.params.mode == "diffusion" else "causal",
        )


def _check_tp(config: EngineConfig, tp: int | None) -> int:
    built = config.build.tp
    if tp is not None and tp != built:
        raise ValueError(f"this engine was built for {built} tensor-parallel rank(s) (nemodiff-build --tp {built}); "
                         f"it cannot run with tp={tp}: rebuild it with --tp {tp}")
    return built


def _images_per_prompt(images: list | None, num_prompts: int, single: bool) -> list[list | None]:
    if images is None:
        return [None] * num_prompts
    if not isinstance(images, (list, tuple)):
        raise ValueError("images must be a list: one list of images per prompt")
    if single and not (len(images) == 1 and isinstance(images[0], (list, tuple))):
        images = [images]  # one prompt, given its images directly
    if len(images) != num_prompts or not all(i is None or isinstance(i, (list, tuple)) for i in images):
        raise ValueError(f"images must hold one list of images per prompt ({num_prompts} prompts, got "
                         f"{len(images)} entries)")
    return [list(i) if i is not None else None for i in images]
