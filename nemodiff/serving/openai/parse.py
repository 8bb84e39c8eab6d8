"""Reading an OpenAI request body into the nemodiff model's inputs (every refusal an `InvalidRequest`).

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: request parsing]──▶ clients

The body is checked before it is read (nemodiff/serving/http/guard.py: size, UTF-8, JSON, nesting depth,
lone surrogates), then each field for its type: a value of the wrong type is a 400 naming the
field, never an exception further down. The chat template is the engine tokenizer's. On a VLM
engine, `image_url` content parts (base64 `data:` URLs) become `[IMG]` placeholders; their pixel
counts are read from the image headers and bounded here, per image and per request, with the
runtime's limits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nemodiff.engine_format import EngineConfig
from nemodiff.runtime.images.preprocess import ImageError, ImageProcessor
from nemodiff.runtime.request import MAX_CACHE_SALT, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, PENALTIES, penalty_error
from nemodiff.runtime.text.tokenizer import EngineTokenizer
from nemodiff.serving.http.guard import BodyError, check_strings, parse_json
from nemodiff.serving.openai.fields import note_unknown, refusal
from nemodiff.serving.openai.guided import GuideError, ToolCall, guide_fields
from nemodiff.serving.triton.inputs import DEFAULT_MAX_N, IMAGE_INPUT, data_url_bytes

ROLES = ("system", "user", "assistant", "tool", "developer")  # the chat roles a request may use
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool))


# nemodiff's own body fields: name -> (check, what it must be)
EXTRA_FIELDS = {
    "decode_mode": (lambda v: isinstance(v, str), "a string"),
    "block_length": (lambda v: _is_int(v) and 1 <= v < 2**31, "an integer >= 1"),
    "threshold": (_is_number, "a number"),
    "top_k": (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer >= 0"),
    "max_thinking_tokens": (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer >= 0"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
    "timeout": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a positive number of seconds"),
    "min_tokens": (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer >= 0"),
    # tenants (vLLM's field): prefix-cache pages are shared only between requests with the same salt
    "cache_salt": (lambda v: isinstance(v, str) and 0 < len(v) <= MAX_CACHE_SALT,
                   f"a non-empty string of at most {MAX_CACHE_SALT} characters"),
}


class InvalidRequest(BodyError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(status, message, param)


class RequestReader:
    def __init__(self, engine_dir: Path, served_model_name: str, max_n: int = DEFAULT_MAX_N):
        self.tokenizer = EngineTokenizer(Path(engine_dir))
        config = EngineConfig.load(Path(engine_dir))
        self.max_seq_len = config.build.max_seq_len
        self.vocab_size = config.model.vocab_size
        self.images = ImageProcessor(config.vision) if config.vision is not None else None
        self.image_placeholder = self.tokenizer.token_text(config.vision.image_token_id) if self.images else None
        self.model = served_model_name
        self.max_n = max_n

    @staticmethod
    def body(data: bytes) -> dict:
        payload = parse_json(data)
        if not isinstance(payload, dict):
            raise InvalidRequest("the request body must be a JSON object")
        check_strings(payload, "the request body")
        return payload

    def choices_and_logprobs(self, body: dict, chat: bool) -> dict:
        """n, best_of and the log-probability fields -> the model's num_return_sequences, return_log_probs and
        top_logprobs. Chat: `logprobs` true/false and `top_logprobs` K; completions: `logprobs` K."""
        n = body.get("n")
        n = 1 if n is None else n
        if not (_is_int(n) and 1 <= n <= self.max_n):
            raise InvalidRequest(f"n must be an integer in [1, {self.max_n}] (got {n!r}); this server's limit is "
                                 f"{self.max_n}", "n")
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1:
            raise InvalidRequest("best_of is not supported; ask for n completions instead", "best_of")
        fields = {"num_return_sequences": n if n > 1 else None}
        top, name = (body.get("top_logprobs"), "top_logprobs") if chat else (body.get("logprobs"), "logprobs")
        if top is not None and not (_is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}] (got {top!r})", name)
        if chat:
            if not isinstance(body.get("logprobs") or False, bool):
                raise InvalidRequest("logprobs must be true or false", "logprobs")
            if top is not None and not body.get("logprobs"):
                raise InvalidRequest("top_logprobs needs logprobs to be true", "top_logprobs")
            wanted = bool(body.get("logprobs"))
        else:
            wanted = top is not None
        if wanted:
            fields |= {"return_log_probs": True, "top_logprobs": top or 0}
        return fields

    def common_fields(self, body: dict, chat: bool = False) -> dict:
        refused = refusal(body)
        if refused is not None:
            raise InvalidRequest(refused[1], refused[0])
        note_unknown(body)
        if body.get("model") not in (None, self.model):
            raise InvalidRequest(f"the model {body.get('model')!r} does not exist; this server serves {self.model!r}",
                                 "model", status=404)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and not (_is_int(max_tokens) and 1 <= max_tokens <= self.max_seq_len):
            raise InvalidRequest(f"max_tokens must be an integer in [1, {self.max_seq_len}] (got {max_tokens!r:.40}); "
                                 f"the model's context is {self.max_seq_len} tokens, the prompt included",
                                 "max_tokens")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop must be a string or a list of strings", "stop")
        if not isinstance(body.get("stream", False), bool):
            raise InvalidRequest("stream must be true or false", "stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise InvalidRequest("stream_options must be an object", "stream_options")
        fields = {"max_tokens": max_tokens, "stop_words": stop or None, "stream": True,
                  "logit_bias": self.logit_bias(body.get("logit_bias"))}
        fields |= self.choices_and_logprobs(body, chat)
        for name, target, kind in (("temperature", "temperature", float), ("top_p", "top_p", float),
                                   ("seed", "random_seed", int)):
            value = body.get(name)
            if value is None:
                continue
            if not (_is_int(value) if kind is int else _is_number(value)):
                raise InvalidRequest(f"{name} must be a {'number' if kind is float else 'integer'}", name)
            if name == "temperature" and not 0 <= value <= 2:
                raise InvalidRequest(f"temperature must be in [0, 2] (got {value})", name)
            if name == "seed" and not 0 <= value < 2**64:
                raise InvalidRequest(f"seed must be in [0, 2**64) (got {value})", name)
            fields[target] = value
        for name in PENALTIES:  # frequency_penalty, presence_penalty, repetition_penalty
            value = body.get(name)
            if value is not None:
                if penalty_error(name, value) is not None:
                    raise InvalidRequest(penalty_error(name, value), name)
                fields[name] = float(value)
        for name, (check, what) in EXTRA_FIELDS.items():
            value = body.get(name)
            if value is not None:
                if not check(value):
                    raise InvalidRequest(f"{name} must be {what} (got {value!r})", name)
                fields[name] = value
        return fields

    def logit_bias(self, bias) -> str | None:
        """OpenAI's logit_bias (token-id strings -> numbers in [-100, 100]) -> the model's JSON input."""
        if bias is None or bias == {}:
            return None
        if not isinstance(bias, dict):
            raise InvalidRequest("logit_bias must be an object mapping token ids to numbers", "logit_bias")
        out = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
            if not 0 <= token < self.vocab_size:
                raise InvalidRequest(f"logit_bias keys must be token ids in [0, {self.vocab_size}) (got {key!r})",
                                     "logit_bias")
            if not (_is_number(value) and math.isfinite(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
                raise InvalidRequest(f"logit_bias values must be numbers in [-100, 100] (got {value!r} for token "
                                     f"{key})", "logit_bias")
            out[str(token)] = value
        return json.dumps(out)

    def guided(self, body: dict, chat: bool) -> tuple[dict, ToolCall | None, list | None]:
        """Structured output and forced tool calls (guided.py): (model inputs, tool call, tools to render)."""
        try:
            return guide_fields(body, "tools" in (self.tokenizer.chat_template or ""), chat)
        except GuideError as exc:
            raise InvalidRequest(str(exc), exc.param) from None

    def completion_prompt(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            fields = {"text_input": prompt}
        elif isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < 2**31 for t in prompt):
            fields = {"text_input": "", "input_ids": prompt}
        else:
            raise InvalidRequest("prompt must be one string or one list of token ids", "prompt")
        if body.get("suffix") not in (None, ""):
            raise InvalidRequest("suffix is not supported: the models complete text left to right only", "suffix")
        if body.get("echo"):
            if body.get("logprobs") is not None:
                raise InvalidRequest("echo with logprobs is not supported (it asks for the prompt's "
                                     "log-probabilities)", "echo")
            fields["exclude_input_in_output"] = False
        return fields

    def chat_prompt(self, body: dict, tools: list | None = None) -> tuple[dict, int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", "messages")
        rendered, images, sizes, image_tokens = [], [], [], 0
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest("each message needs a role and content", "messages")
            if message["role"] not in ROLES:
                raise InvalidRequest(f"messages[{index}].role is {message['role']!r:.40}; it must be one of "
                                     f"{', '.join(ROLES)}", "messages")
            content = message.get("content") or ""
            if isinstance(content, list):
                texts = []
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text", ""), str):
                        texts.append(part.get("text", ""))
                    elif kind == "image_url":
                        image, size, tokens = self.image_part(part, len(images))
                        images.append(image)
                        sizes.append(size)
                        image_tokens += tokens - 1  # the placeholder itself is one token
                        texts.append(self.image_placeholder)
                    else:
                        raise InvalidRequest("content parts must be of type text (with a string) or image_url",
                                             "messages")
                content = "".join(texts)
            if not isinstance(content, str):
                raise InvalidRequest("message content must be a string or a list of content parts", "messages")
            rendered.append({"role": message["role"], "content": content})
        if sizes:
            try:
                self.images.check_request_pixels(sizes)
            except ImageError as exc:
                raise InvalidRequest(str(exc), "messages") from None
        try:
            text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tools=tools)
        except Exception as exc:
            raise InvalidRequest(f"the chat template could not be applied: {exc}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        length = len(ids) + image_tokens
        if length >= self.max_seq_len:
            with_images = f" with its {len(images)} image(s)" if images else ""
            raise InvalidRequest(f"the prompt{with_images} has {length} tokens; the model's context is "
                                 f"{self.max_seq_len}", "messages")
        return {"text_input": "", "input_ids": ids} | ({IMAGE_INPUT: images} if images else {}), length

    def image_part(self, part: dict, index: int) -> tuple[bytes, tuple[int, int], int]:
        """An image_url part -> (encoded image, (width, height), the prompt tokens it will take)."""
        if self.images is None:
            raise InvalidRequest("this model takes no images (its engine has no vision tower)", "messages")
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"image {index}: image_url needs a url", "messages")
        if not url[:5].lower() == "data:":
            raise InvalidRequest(f"image {index}: only data: URLs are accepted (data:image/png;base64,...); this "
                                 "server does not fetch remote images", "messages")
        try:
            data = data_url_bytes(url)
            width, height = self.images.size(data, index)  # the header only; the limits' own reasons
        except ValueError as exc:
            raise InvalidRequest(str(exc) if str(exc).startswith("image") else f"image {index}: {exc}",
                                 "messages") from None
        rows, cols = self.images.grid(*self.images.resized_size(height, width))
        return data, (width, height), rows * (cols + 1)
