"""Tokenizer and chat template of an engine (tokenizer.json + tokenizer_config.json).

checkpoint ──builder──▶ engine dir ──[runtime: tokenizer]──▶ Triton
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class EngineTokenizer:
    def __init__(self, engine_dir: Path):
        engine_dir = Path(engine_dir)
        self._tok = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        config_path = engine_dir / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_file = engine_dir / "chat_template.jinja"
        self.chat_template = self.config.get("chat_template")
        if template_file.is_file():
            self.chat_template = template_file.read_text()
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this engine's tokenizer has no chat template")

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, user_text: str) -> list[int]:
        """The prompt ids for one user turn, template applied (it carries its own BOS)."""
        return self.encode(self.apply_chat_template([{"role": "user", "content": user_text}]),
                           add_special_tokens=False)
