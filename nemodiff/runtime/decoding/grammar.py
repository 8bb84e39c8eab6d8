"""Structured output: grammars compiled once, one matcher per request, token bitmasks (docs/design.md §12).

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ grammar masks]──▶ Triton

The grammar engine is xgrammar. `Grammars` turns a request's `Guide` into a compiled grammar
(cached per distinct guide, least recently used first out) and a `GuideMatcher`. A bad schema,
regular expression or grammar is a ValueError naming the problem, raised when the request is
admitted. The matcher always stands after the request's output tokens: every look-ahead (the
drafts a verification checks, the tokens a draft or a denoising step builds) is rolled back before
the method returns, so rejected drafts and preemption never leave a trace in it.

A bitmask row has one bit per vocabulary id (int32 words, bit i of word w is id 32w+i); a row of
all ones leaves the logits as they are. `apply_masks` sets the logits of disallowed ids to -inf on
the logits' device, for the rows of every guided request of a step at once; `apply_only` leaves each row one
allowed token (rows whose decision a grammar walk already knows).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from nemodiff.device import on_host
from nemodiff.runtime.request import Guide

CACHE_SIZE = 64  # compiled grammars kept (distinct guides)
_NOISE = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " prefix


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _clean(exc: Exception) -> str:
    text = " ".join(str(exc).strip().splitlines()[0].split()) if str(exc).strip() else type(exc).__name__
    return _NOISE.sub("", text)[:300]


class Grammars:
    """The grammar compiler of one vocabulary. vocab: the token strings by id (as tokenizer.json
    spells them), special: ids of special tokens (never produced by a grammar), tokenizer_json: the
    serialized tokenizer (tells how tokens spell bytes), vocab_size: the model's (rows of the logits),
    stop_ids: the end-of-sequence ids a finished grammar allows."""

    def __init__(self, vocab: list[str], special: set[int], tokenizer_json: str, vocab_size: int,
                 stop_ids: list[int], cache_size: int = CACHE_SIZE):
        import xgrammar as xgr

        self._xgr = xgr
        encoded = [("" if i in special and i not in stop_ids else token) for i, token in enumerate(vocab)]
        encoded += [""] * (vocab_size - len(encoded))
        try:
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
            vocab_type, prefix_space = meta["vocab_type"], meta["add_prefix_space"]
        except Exception:  # an unusual tokenizer: its tokens are taken as the text they spell
            vocab_type, prefix_space = xgr.VocabType.RAW, False
        self.info = xgr.TokenizerInfo(encoded[:vocab_size], vocab_type, vocab_size=vocab_size,
                                      stop_token_ids=sorted(stop_ids), add_prefix_space=prefix_space)
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        # ids a grammar never takes (asking xgrammar about them logs a warning): special, not stopping
        self.never = np.zeros(vocab_size, dtype=bool)
        self.never[[i for i in self.info.special_token_ids if i not in self.stop_ids and i < vocab_size]] = True
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self.cache_size = cache_size
        self.compiled_count = 0  # grammars compiled (not found in the cache)
        self._lock = threading.Lock()  # admission checks run on the serving threads, matchers on the engine's

    def cached(self, guide: Guide):
        """The compiled grammar of a guide when it is in the cache, else None (never compiles)."""
        key = (guide.kind, guide.text, guide.choices)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def compile(self, guide: Guide):
        """The compiled grammar of a guide (cached); ValueError naming the problem when it is bad. The
        compile runs outside the lock: a long one holds up no other thread's cache lookups."""
        hit = self.cached(guide)
        if hit is not None:
            return hit
        compiled = self._compile(guide)
        with self._lock:
            self.compiled_count += 1
            self._cache[(guide.kind, guide.text, guide.choices)] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, guide: Guide):
        compiler, kind = self._compiler, guide.kind
        if kind == "json_schema":
            try:
                schema = json.loads(guide.text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the json_schema guide is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("the json_schema guide must be a JSON object (a JSON schema)")
        try:
            if kind == "json":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "json_schema":
                return compiler.compile_json_schema(guide.text, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(guide.text)
            if kind == "choice":
                rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in guide.choices)
                return compiler.compile_grammar(f"root ::= {rule}")
            return compiler.compile_grammar(guide.text)
        except Exception as exc:  # xgrammar raises RuntimeError with the parser's message
            what = {"json_schema": "JSON schema", "regex": "regular expression", "ebnf_grammar": "grammar",
                    "choice": "choice list", "json": "JSON grammar"}[kind]
            raise ValueError(f"invalid {what}: {_clean(exc)}") from None

    def matcher(self, guide: Guide, compiled=None) -> "GuideMatcher":
        """A matcher of the guide: over `compiled` (its compiled grammar) when given, else compiled here."""
        return GuideMatcher(self._xgr, compiled if compiled is not None else self.compile(guide), self.vocab_size,
                            self.never)


class GuideMatcher:
    """One request's grammar state: after its output tokens and `ahead`, tokens past the output that a
    step's grammar walk accepted and kept (grammar_batch.py: a verification's tokens, a denoising block's
    revealed ones), which the next step's walk and the commit of the output (`advance`) most often start
    with. Every method here first stands where it needs (`settle`); `terminated` is the output's."""

    def __init__(self, xgr, compiled, vocab_size: int, never: np.ndarray):
        self._m = xgr.GrammarMatcher(compiled)
        self.handle = self._m._handle  # the C++ matcher (grammar_batch.py's batched calls take these)
        self.stops = frozenset(self._m.stop_token_ids)  # accepting one of these ends the grammar
        self._never = never
        self._bitmask = np.full((1, words(vocab_size)), -1, dtype=np.int32)  # numpy: a cheaper fill than a tensor
        self._row = self._bitmask[0]
        self.vocab_size = vocab_size
        self.words = words(vocab_size)
        self.ahead: list[int] = []

    @property
    def terminated(self) -> bool:
        return not self.ahead and self.handle.is_terminated()  # a matcher that took tokens past it had not ended

    def unwind(self, prefix) -> int:
        """Roll `ahead` back to its common start with `prefix`; returns that start's length."""
        ahead, common = self.ahead, 0
        for kept, token in zip(ahead, prefix):
            if kept != token:
                break
            common += 1
        if common < len(ahead):
            self._m.rollback(len(ahead) - common)
            del ahead[common:]
        return common

    def settle(self, prefix=()) -> int:
        """Stand after the output and the longest start of `prefix` the grammar takes; returns its length."""
        common = self.unwind(prefix)
        if common < len(prefix):
            rest = [int(t) for t in prefix[common:]]
            self.ahead += rest[: self._look(rest)]
        return len(self.ahead)

    def _fill(self, out: np.ndarray) -> None:
        self._m.fill_next_token_bitmask(self._bitmask)
        out[:] = self._row

    def full(self, rows: int) -> np.ndarray:
        """Bitmask rows that allow every token."""
        return np.full((rows, self.words), -1, dtype=np.int32)

    def _look(self, tokens) -> int:
        """Accept tokens (look-ahead) until one is refused or the grammar ends; returns how many were."""
        handle, never, size, stops = self.handle, self._never, self.vocab_size, self.stops
        if handle.is_terminated():
            return 0
        accept, done = handle.accept_token, 0
        for token in tokens:
            token = int(token)
            if not 0 <= token < size or never[token] or not accept(token, False):
                break
            done += 1
            if token in stops:  # accepted: the grammar has ended, it takes nothing more
                break
        return done

    def masks(self, drafts=()) -> np.ndarray:
        """Row i: the mask after the output and drafts[:i] (1 + len(drafts) rows). Rows after a draft the
        grammar refuses (or after its end) allow everything: no accepted output comes from them."""
        out = self.full(1 + len(drafts))
        done = 0
        self.settle()
        if not self.handle.is_terminated():
            self._fill(out[0])
            for i, token in enumerate(drafts):
                if not self._look((token,)):
                    break
                done += 1
                if self.handle.is_terminated():
                    break
                self._fill(out[i + 1])
        self._rollback(done)
        return out

    def walk(self, x: torch.Tensor, decide: Callable[[int, torch.Tensor], int | None], after=()) -> np.ndarray:
        """Build tokens left to right under the grammar from logit rows x [n, vocab] (host), starting
        after the output and `after`. decide(j, masked_row) gives row j's token, or None to stop. Returns
        the bitmask rows: a walked row allows exactly the grammar's tokens (so its masked argmax is what
        greedy decide chose), rows after the walk everything."""
        out = self.full(len(x))
        self.settle()
        done = self._look(after)
        if done == len(after):
            values = x.numpy()
            greedy = decide is greedy_pick
            for j in range(len(x)):
                if self.handle.is_terminated():
                    break
                self._fill(out[j])
                token = int(values[j].argmax()) if greedy else None
                if token is None or not out[j, token >> 5] >> (token & 31) & 1:
                    # the row's own first maximum is outside the grammar (or decide is not greedy): mask it
                    allowed = np.unpackbits(out[j].view(np.uint8), bitorder="little")[: values.shape[1]].view(bool)
                    token = decide(j, torch.from_numpy(np.where(allowed, values[j], np.float32(-np.inf))))
                if token is None or not self._look((token,)):
                    break
                done += 1
        self._rollback(done)
        return out

    def _rollback(self, count: int) -> None:
        if count:
            self._m.rollback(count)

    def advance(self, tokens: list[int]) -> tuple[int, bool]:
        """Accept output tokens: (how many the grammar took, whether it has ended)."""
        done = self.settle(tokens)
        self.ahead = []  # now part of the output
        # only a stop token ends the grammar, and a matcher that has ended takes nothing more
        return done, int(tokens[done - 1]) in self.stops if done else self.handle.is_terminated()


def greedy_pick(_j: int, row) -> int:
    """The first largest entry of a masked row (numpy's argmax, as the decisions take it). `walk` knows it:
    when a row's first maximum is allowed, that is the pick, and the row is never masked."""
    return int(row.numpy().argmax())


def one_hot(token: int, words_: int) -> np.ndarray:
    row = np.zeros(words_, dtype=np.int32)
    row[token // 32] = np.int32(np.uint32(1 << (token % 32)).view(np.int32))
    return row


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool (True: allowed)."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(len(bitmask), -1)[:, :vocab_size].bool()


def apply_masks(logits: torch.Tensor, rows: np.ndarray, bitmask: np.ndarray, keep: bool) -> torch.Tensor | None:
    """Set disallowed logits of these rows to -inf, in place on the logits' device. keep: return the
    rows' original values (to restore them for raw log-probabilities)."""
    if on_host(logits) and logits.dtype == torch.float32:  # host logits: numpy, no tensor dispatch
        x = logits.numpy()
        original = x[rows]
        bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")
        x[rows] = np.where(bits[:, : x.shape[1]].view(bool), original, np.float32(-np.inf))
        return torch.from_numpy(original) if keep else None
    index = torch.from_numpy(rows).to(logits.device, non_blocking=True)
    allowed = unpack(torch.from_numpy(bitmask).to(logits.device, non_blocking=True), logits.shape[1])
    original = logits[index]
    logits[index] = original.masked_fill(~allowed, float("-inf"))
    return original if keep else None


def apply_only(logits: torch.Tensor, rows: np.ndarray, tokens: np.ndarray, keep: bool) -> torch.Tensor | None:
    """Leave each of these rows one allowed logit (row rows[i]: token tokens[i]; the rest -inf), in place on
    the logits' device: rows whose decision a grammar walk already knows (grammar_batch.py). keep: return
    the rows' original values."""
    if on_host(logits) and logits.dtype == torch.float32:
        x = logits.numpy()
        original = x[rows] if keep else None
        kept = x[rows, tokens]
        x[rows] = np.float32(-np.inf)
        x[rows, tokens] = kept
        return torch.from_numpy(original) if keep else None
    index = torch.from_numpy(rows).to(logits.device, non_blocking=True)
    picked = torch.from_numpy(tokens).to(logits.device, non_blocking=True)
    original = logits[index]
    logits[index] = float("-inf")
    logits[index, picked] = original[torch.arange(len(rows), device=logits.device), picked]
    return original if keep else None
