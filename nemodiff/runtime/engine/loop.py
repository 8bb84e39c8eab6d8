"""The engine step loop: schedule, one forward for everyone, one batched decision, one sync.

checkpoint ──builder──▶ engine dir ──[runtime: engine loop]──▶ Triton

`Engine.step()` is one model forward shared by every scheduled request, whatever its
mode, followed by one batched decision pass on the device and one device-to-host copy.
It is split in two so a caller can overlap host work with the device: `launch()` schedules,
builds the batch and enqueues the forward and the decisions; `complete()` waits for the
answers and applies them (tokens, stop rules, cache lengths, retirement).

A failure inside one request (non-finite logits, an exception in its strategy) ends that
request with an error; the others in its step go on.

Images (VLM engines): `prepare_images` preprocesses a request's images and lays out its
prompt (any thread; bad images fail there). Before scheduling, `launch()` encodes in one
vision-tower call the images of every request that can be admitted this step; the features
stay with the request (on the model's device) through preemptions and are dropped when it
ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from nemodiff.runtime.decoding.decision_pass import Decider
from nemodiff.runtime.decoding.grammar import Grammars
from nemodiff.runtime.decoding.guide_limits import DEFAULT_LIMITS, check_guide
from nemodiff.runtime.decoding.strategies import STRATEGIES
from nemodiff.runtime.decoding.strategies.base import StrategyContext
from nemodiff.runtime.images.pipeline import ImageInput, ImagePipeline, PreparedImages, RequestImages
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.transformer import Model
from nemodiff.runtime.request import Request, SamplingParams

from .auto import AutoPolicy, AutoState, decoding
from .scheduler import ScheduledWork, Scheduler, SchedulerConfig, Sequence

log = logging.getLogger(__name__)


@dataclass
class PendingStep:
    work: list[ScheduledWork]
    logit_starts: np.ndarray  # first logit row of each work item
    logit_counts: np.ndarray
    failed: dict[int, str]  # request id -> error raised while registering
    tokens: int = 0  # tokens in the step's forward
    seconds: float = 0.0  # host time of its launch (the auto policy's step costs)


class Engine:
    def __init__(self, model: Model, cache: PagedKVCache, ctx: StrategyContext, scheduler_config: SchedulerConfig,
                 max_seq_len: int, eos_ids: list[int], decode, images: ImagePipeline | None = None,
                 tokenizer=None):
        self.model = model
        self.cache = cache
        self.ctx = ctx
        self.scheduler = Scheduler(scheduler_config, cache)
        self.max_seq_len = max_seq_len
        self.eos_ids = frozenset(eos_ids)
        self.decode = decode
        self.images = images  # the vision tower and preprocessing of a VLM engine, else None
        self.tokenizer = tokenizer  # its vocabulary builds the grammars of structured output
        self._grammars: Grammars | None = None  # made on the first guided request
        self._grammars_lock = threading.Lock()
        self.guide_limits = DEFAULT_LIMITS  # what a guide may be before its grammar is compiled
        self._awaiting_images: dict[int, RequestImages] = {}  # request id -> images not yet encoded
        self.decider = Decider(model.platform, model.config.mask_token_id)
        self._ids = itertools.count()
        self._sequences: dict[int, Sequence] = {}
        self.num_steps = 0
        self.output_tokens = Counter()  # by the mode that ran (an auto request's by the mode of each step)
        self.forward_passes = Counter()  # request-forwards, by mode
        self.auto = AutoPolicy(ctx)  # mode="auto" (auto.py): learns step costs and yields from every step
        self._num_auto = 0  # auto requests in the engine
        self._last_end: float | None = None  # when the last step ended, if work was left for the next one

    # -- requests ----------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise ValueError(f"prompt ids must be in [0, {vocab})")
        if params.logit_bias and not all(0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"engine's max_seq_len ({self.max_seq_len})"
            )
        block = params.block_length or self.ctx.block_length
        if params.mode == "quadratic-spec" and block > self.ctx.block_length:  # (auto then keeps to the others)
            raise ValueError(f"quadratic-spec draft length {block} exceeds the engine's block length "
                             f"{self.ctx.block_length} (each forward carries k*(k+1) tokens)")
        if block > self.max_seq_len:
            raise ValueError(f"block_length {block} exceeds the engine's max_seq_len ({self.max_seq_len})")
        if params.guide is not None:
            check_guide(params.guide, self.guide_limits)  # its size; whether it compiles: add_request
        if params.mode not in STRATEGIES and params.mode != "auto":
            raise ValueError(f"decode mode {params.mode!r} is not available in this build")
        scratch = 0 if params.mode == "ar" else block  # speculative/diffusion writes run ahead by a block
        worst = self.cache.pages_needed(len(prompt_ids) + params.max_new_tokens + scratch)
        if worst > self.cache.num_pages:
            raise ValueError(
                f"request needs up to {worst} KV pages ({len(prompt_ids)} prompt + {params.max_new_tokens} new "
                f"tokens), more than the whole cache ({self.cache.num_pages} pages); give the server more KV memory "
                "or ask for fewer tokens"
            )

    def grammars(self) -> Grammars:
        """The grammar compiler of this engine's vocabulary (structured output)."""
        with self._grammars_lock:  # the servers' request threads check guides too
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs the engine's tokenizer")
                vocab, special, serialized = self.tokenizer.grammar_vocab()
                self._grammars = Grammars(vocab, special, serialized, self.model.config.vocab_size,
                                          sorted(self.eos_ids))
            return self._grammars

    def cached_grammar(self, guide):
        """The guide's compiled grammar if it was compiled already, else None (never compiles)."""
        return self._grammars.cached(guide) if self._grammars is not None else None

    def prepare_images(self, prompt_ids: list[int], images: list[ImageInput] | None,
                       params: SamplingParams) -> PreparedImages | None:
        """Preprocess a request's images and expand its prompt (thread-safe; the vision tower does not
        run here). None for a text-only request on a text-only engine. Raises ValueError (ImageError
        for a bad image) with a message for the caller."""
        params.validate()
        if self.images is None:
            if images:
                raise ValueError("this engine has no vision tower (it was built from a text-only checkpoint); "
                                 "it cannot take images")
            return None
        return self.images.preprocess(list(prompt_ids), list(images or []), self.max_seq_len - params.max_new_tokens)

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    images: list[ImageInput] | PreparedImages | None = None, leader: Request | None = None,
                    grammar=None) -> Request:
        """images: the prompt's images (paths, bytes, PIL images), or what `prepare_images` made of them.
        leader: another choice of the same prompt (n > 1); this one is admitted once the leader's prompt is
        cached, so that it starts from the leader's pages instead of computing them again.
        grammar: the guide's compiled grammar (the servers compile it beside the loop); without it the guide
        is compiled here, on the caller's thread (LLM.generate). A bad guide is a ValueError."""
        prepared = images if isinstance(images, PreparedImages) else self.prepare_images(prompt_ids, images, params)
        if prepared is not None:
            prompt_ids = prepared.token_ids
        self.validate(prompt_ids, params)
        request = Request(next(self._ids), list(prompt_ids), params, self.eos_ids, self.decode)
        if params.guide is not None:
            request.grammar = self.grammars().matcher(params.guide, grammar)
        if prepared is not None and prepared.pixels:
            request.images = RequestImages(request.prompt_ids, prepared.pixels, self.images.image_token_id,
                                           self.images.encode)
            self._awaiting_images[request.request_id] = request.images
        if params.mode == "auto":  # the prompt in AR; the policy picks from the first boundary on
            strategy = STRATEGIES["ar"](request, self.ctx)
            sequence = Sequence(request, strategy, auto=AutoState({"ar": strategy}))
            self._num_auto += 1
        else:
            sequence = Sequence(request, STRATEGIES[params.mode](request, self.ctx))
        if leader is not None and self.cache.prefix is not None:
            sequence.leader = self._sequences.get(leader.request_id)
        self._sequences[request.request_id] = sequence
        self.scheduler.add(sequence)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request: Request, reason: str = "cancelled") -> None:
        sequence = self._sequences.pop(request.request_id, None)
        if sequence is None:
            return
        self.scheduler.remove(sequence)
        self._release_images(request)
        self._num_auto -= sequence.auto is not None
        if not request.finished:
            request._finish(reason)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One forward for the scheduled requests; returns the requests that finished."""
        with torch.inference_mode():  # one context for both halves (entering one costs a few microseconds)
            pending = self._launch()
            return self._complete(pending) if pending is not None else []

    @torch.inference_mode()
    def launch(self) -> PendingStep | None:
        """Schedule, build the batch, enqueue the forward and the batched decisions (no host sync)."""
        return self._launch()

    @torch.inference_mode()
    def complete(self, pending: PendingStep) -> list[Request]:
        """Wait for the step's answers and apply them."""
        return self._complete(pending)

    # inference mode: cheaper tensor operations; the staging buffers are made and reused in it
    def _launch(self) -> PendingStep | None:
        start = time.perf_counter()
        if self.images is not None:
            self._encode_admissible_images()
        if self._num_auto:
            self.auto.assign(self.scheduler.running)
        work = self.scheduler.schedule()
        if not work:
            return None
        segments = [item.segment for item in work]
        batch = self.model.build_batch(segments, self.cache)
        logits = self.model.run(batch, self.cache)
        counts = np.asarray(batch.logit_counts, dtype=np.int64)
        starts = np.cumsum(counts) - counts
        token_starts = batch.token_starts
        decider, failed = self.decider, {}
        decider.begin()
        for item, first_row, token_row in zip(work, starts.tolist(), token_starts.tolist()):
            if item.is_fill:
                continue
            try:
                item.sequence.strategy.register(decider, first_row, token_row)
            except Exception as exc:  # this request's strategy broke: it alone fails
                log.exception("request %d: strategy failed", item.sequence.request_id)
                failed[item.sequence.request_id] = f"internal error in the {item.sequence.request.params.mode} " \
                                                   f"strategy: {exc}"
        decider.run(logits, batch.ids)
        self.num_steps += 1
        return PendingStep(work, starts, counts, failed, sum(item.num_tokens for item in work),
                           time.perf_counter() - start)

    def _complete(self, pending: PendingStep) -> list[Request]:
        start = time.perf_counter()
        decider, auto = self.decider, self.auto
        decider.fetch()
        bad_rows = decider.bad_rows()
        broken = set()
        if len(bad_rows):  # rows -> the work items that own them
            ends = pending.logit_starts + pending.logit_counts
            broken = set(np.searchsorted(ends, bad_rows, side="right").tolist())
        finished, modes, sequences, failed = [], [], self._sequences, pending.failed
        pure = True  # a decode step: no prompt in it (the auto policy learns step costs from these)
        after_forward = self.scheduler.after_forward
        for index, item in enumerate(pending.work):
            sequence = item.sequence
            request = sequence.request
            if sequence.request_id not in sequences:  # aborted while its step was in flight
                continue
            request.num_forwards += 1
            mode = sequence.strategy.mode
            modes.append(mode)
            error = failed.get(sequence.request_id) if failed else None
            if error is None and index in broken:
                error = "numerical error: the model produced non-finite logits for this request"
            pure = pure and not item.is_fill
            if error is None and not item.is_fill:
                try:
                    strategy = sequence.strategy
                    steady = decoding(strategy)
                    pure = pure and steady
                    tokens = strategy.consume(decider)
                    auto.observe(sequence, len(tokens), steady)
                    ended = False
                    if tokens and request.grammar is not None:
                        tokens, ended = follow_grammar(request.grammar, tokens)
                    if tokens:
                        self.output_tokens[mode] += len(request.append(tokens, strategy.pending_logprobs))
                    if ended and request.finish_reason in (None, "eos"):  # the grammar's end is a stop
                        request._finish("stop")
                except Exception as exc:
                    log.exception("request %d: strategy failed", request.request_id)
                    error = f"internal error in the {mode} strategy: {exc}"
            if error is not None:
                request.fail(error)
                finished.append(request)
                continue
            after_forward(item)
            if request.finished:
                finished.append(request)
        self.forward_passes.update(modes)
        for request in finished:
            self._retire(request)
        # a step's cost: from the end of the step before (the host's work between steps included, e.g. a
        # server publishing the answers) while the engine is busy, else its own launch and completion
        now = time.perf_counter()
        if pure:
            auto.observe_step(pending.tokens, now - self._last_end if self._last_end is not None
                              else pending.seconds + now - start, len(pending.work))
        self._last_end = now if self.scheduler.has_work() else None
        return finished

    def _encode_admissible_images(self) -> None:
        """One vision-tower call for the images of the requests the scheduler may admit this step
        (the running ones were encoded when they were admitted)."""
        awaiting, scheduler = self._awaiting_images, self.scheduler
        if not awaiting:
            return
        room = scheduler.config.max_num_seqs - len(scheduler.running)
        chosen = [seq.request_id for seq in scheduler.running if seq.request_id in awaiting]
        if room > 0:  # admission is FIFO: at most `room` waiting requests get in this step
            chosen += [seq.request_id for seq in itertools.islice(scheduler.waiting, room)
                       if seq.request_id in awaiting]
        if not chosen:
            return
        try:
            self.images.encode([awaiting[rid] for rid in chosen])
        except Exception as exc:  # the encoder failed on these images: their requests fail, others go on
            log.exception("vision encoder failed")
            for rid in chosen:
                request = self._sequences[rid].request
                request.fail(f"internal error while encoding the images: {exc}")
                self._retire(request)
        for rid in chosen:
            awaiting.pop(rid, None)

    def image_stats(self) -> dict:
        """Counters of the vision-feature cache (zeros on a text-only engine or with the cache off)."""
        cache = self.images.cache if self.images is not None else None
        stats = cache.stats() if cache is not None else {}
        return {"vision_cache_hits": stats.get("hits", 0), "vision_cache_misses": stats.get("misses", 0),
                "vision_cache_evictions": stats.get("evictions", 0), "vision_cache_bytes": stats.get("bytes", 0)}

    def _release_images(self, request: Request) -> None:
        self._awaiting_images.pop(request.request_id, None)
        if request.images is not None:
            request.images.release()

    def _retire(self, request: Request) -> None:
        self._release_images(request)
        sequence = self._sequences.pop(request.request_id)
        if sequence.auto is not None:
            self._num_auto -= 1
            request.stats |= sequence.auto.stats() | {mode: s.stats() for mode, s in sequence.auto.strategies.items()
                                                      if hasattr(s, "stats") and s.accepted}
        else:
            request.stats |= getattr(sequence.strategy, "stats", dict)()
        if sequence.num_preemptions:
            request.stats["preemptions"] = sequence.num_preemptions
        self.scheduler.remove(sequence)


def follow_grammar(matcher, tokens: list[int]) -> tuple[list[int], bool]:
    """Advance a request's grammar over its new tokens: (the tokens up to the grammar's end, whether it
    ended). The decisions only give tokens the grammar allows; one it refuses is an internal error."""
    took, ended = matcher.advance(tokens)
    if ended:
        return tokens[:took], True
    if took < len(tokens):
        raise RuntimeError(f"token {tokens[took]} does not follow the request's grammar")
    return tokens, False
