"""Tokenizer and chat template of an engine (tokenizer.json + tokenizer_config.json).

checkpoint ──builder──▶ engine dir ──[runtime: tokenizer]──▶ Triton

The builder checks these files with this class too, so an engine never carries a tokenizer the
runtime cannot read. A bad file is an EngineFormatError that names it, in one line; a file read whole is
refused above its size limit before it is read. The chat template is the checkpoint's code, run per
request: it renders in Jinja's sandbox, bounded in time, added memory and output (a ValueError past them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from nemodiff.engine_format import EngineFormatError, plain_file, read_json, size_problem

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
TEMPLATE_TIME_S = 2.0  # a render takes milliseconds; a template is the checkpoint's code, run per request
TEMPLATE_OUTPUT_CHARS = 1 << 20  # what a template may write beyond four times the messages' (and tools') text
TEMPLATE_MEMORY_BYTES = 256 << 20  # what a render may add to the process's resident memory


def _token_text(value, path: Path, key: str) -> str | None:
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise EngineFormatError(f"{path}: {key} is {text!r:.60}; a token string is expected")
    return text


def _chat_template(value, path: Path) -> str | None:
    """A template string; of a list of named templates (as transformers saves several), the "default" one."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise EngineFormatError(f"{path}: chat_template is {value!r:.60}; a template string is expected")
    return value


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` sized before they run: `'x' * 10**10` is refused, not allocated."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 4096:
            raise jinja2.sandbox.SecurityError(f"the chat template raises to the power {right} (limit 4096)")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > 2**20:
                    raise jinja2.sandbox.SecurityError("the chat template repeats a sequence to more than 2**20 items")
        return super().call_binop(context, operator, left, right)


def _render_bounded(template, limit: int, variables: dict) -> str:
    """The template rendered within TEMPLATE_TIME_S and `limit` characters, else a ValueError. The time is
    watched on the template's own lines (a trace of its frames only), so a loop that writes nothing stops too."""
    start = time.monotonic()
    deadline, base, checked = start + TEMPLATE_TIME_S, _resident_bytes(), [start]

    def local(frame, event, arg):
        now = time.monotonic()
        if now > deadline:
            raise _TemplateTimeout
        if now - checked[0] > 0.001:  # a line that took a while may have built something large
            checked[0] = now
            if base is not None and _resident_bytes() - base > TEMPLATE_MEMORY_BYTES:
                raise _TemplateTimeout("memory")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    parts, size = [], 0
    try:
        for part in template.generate(**variables):
            size += len(part)
            if size > limit:
                raise ValueError(f"the chat template's output passed {limit} characters (its limit for these "
                                 "messages); the engine's chat template is faulty")
            parts.append(part)
    except _TemplateTimeout as exc:
        what = (f"more than {TEMPLATE_MEMORY_BYTES >> 20} MiB of memory" if exc.args else
                f"more than {TEMPLATE_TIME_S:g} s")
        raise ValueError(f"the chat template took {what} to render; the engine's chat template is faulty") from None
    finally:
        sys.settrace(previous)
    return "".join(parts)


class _TemplateTimeout(Exception):
    pass


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _check_size(path: Path) -> None:
    problem = size_problem(path)
    if problem:
        raise EngineFormatError(problem)


class EngineTokenizer:
    """vocab_size: the model's; a tokenizer that can produce larger ids is refused."""

    def __init__(self, engine_dir: Path, vocab_size: int | None = None):
        engine_dir = Path(engine_dir)
        path = plain_file(engine_dir, TOKENIZER_FILE, missing="not found (the engine needs its tokenizer)")
        _check_size(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception whose message names no file
            reason = " ".join(str(exc).split())[:200]
            raise EngineFormatError(f"{path}: not a valid tokenizer ({reason})") from None
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise EngineFormatError(f"{path}: the tokenizer has {self.vocab_size} tokens, more than the model's "
                                    f"vocab_size {vocab_size}")
        config_path = engine_dir / TOKENIZER_CONFIG_FILE
        self.config = read_json(config_path) if os.path.lexists(config_path) else {}
        if not isinstance(self.config, dict):
            raise EngineFormatError(f"{config_path}: a JSON object is expected")
        self.chat_template = _chat_template(self.config.get("chat_template"), config_path)
        if os.path.lexists(engine_dir / TEMPLATE_FILE):
            template = plain_file(engine_dir, TEMPLATE_FILE)
            _check_size(template)
            try:
                self.chat_template = template.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise EngineFormatError(f"{template}: not UTF-8 text") from None
        self.bos_token = _token_text(self.config.get("bos_token"), config_path, "bos_token")
        self.eos_token = _token_text(self.config.get("eos_token"), config_path, "eos_token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Every token's string -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_text(self, token_id: int) -> str | None:
        """The text of one token (e.g. "[IMG]" for the image placeholder), None if out of the vocabulary."""
        return self._tok.id_to_token(token_id)

    def think_end_id(self) -> int | None:
        """Id of the end-of-thinking token, if the vocabulary has one."""
        for name in ("[/THINK]", "</think>"):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def grammar_vocab(self) -> tuple[list[str], set[int], str]:
        """What a grammar engine needs: the token strings by id, the ids of special tokens, and the
        serialized tokenizer (how its tokens spell bytes)."""
        vocab = [""] * self.vocab_size
        for token, token_id in self._tok.get_vocab(with_added_tokens=True).items():
            if token_id < len(vocab):
                vocab[token_id] = token
        special = {i for i, added in self._tok.get_added_tokens_decoder().items() if added.special}
        return vocab, special, self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None) -> str:
        if not self.chat_template:
            raise ValueError("this engine's tokenizer has no chat template")

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        given = sum(len(str(m.get("content") or "")) for m in messages) + (len(json.dumps(tools)) if tools else 0)
        limit = TEMPLATE_OUTPUT_CHARS + 4 * given
        return _render_bounded(template, limit, dict(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            **({"tools": tools} if tools is not None else {})))

    def encode_chat(self, user_text: str) -> list[int]:
        """The prompt ids for one user turn, template applied (it carries its own BOS)."""
        return self.encode(self.apply_chat_template([{"role": "user", "content": user_text}]),
                           add_special_tokens=False)
