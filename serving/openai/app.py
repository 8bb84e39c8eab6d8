"""The OpenAI-compatible API of `nemodiff serve --openai-port PORT` (a Starlette app).

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend]──▶ clients

`/v1/models`, `/v1/completions` and `/v1/chat/completions`, streamed (server-sent events
ending in `data: [DONE]`) or not, with `usage` and `finish_reason` (`stop` | `length`).
Requests go to the nemodiff Triton model over gRPC (`nemodiff.serving.openai.backend`), so
validation, limits, deadlines and the engine are those of the Triton endpoints. The chat
template is the engine tokenizer's; nemodiff's `decode_mode`, `block_length`, `threshold`,
`top_k`, `max_thinking_tokens`, `ignore_eos` and `timeout` are extra body fields. Errors
have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and status codes.

On a VLM engine, chat messages may carry `image_url` content parts whose URL is a `data:` URL
(base64); the server fetches nothing, so any other URL is refused. Each image part becomes an
`[IMG]` placeholder where it stands in the message, and the image travels to the model in its
`image_bytes_input` input.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nemodiff.engine_format import EngineConfig
from nemodiff.runtime.images.preprocess import ImageProcessor
from nemodiff.runtime.text.tokenizer import EngineTokenizer
from nemodiff.serving.openai.backend import BackendError, Piece, TritonBackend
from nemodiff.serving.triton.inputs import IMAGE_INPUT, data_url_bytes

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
EXTRA_FIELDS = ("decode_mode", "block_length", "threshold", "top_k", "max_thinking_tokens", "ignore_eos", "timeout")
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               503: "service_unavailable", 504: "timeout"}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class OpenAIFrontend:
    def __init__(self, engine_dir: Path, backend: TritonBackend, served_model_name: str, max_body_bytes: int):
        self.tokenizer = EngineTokenizer(Path(engine_dir))
        config = EngineConfig.load(Path(engine_dir))
        self.max_seq_len = config.build.max_seq_len
        self.images = ImageProcessor(config.vision) if config.vision is not None else None
        self.image_placeholder = self.tokenizer.token_text(config.vision.image_token_id) if self.images else None
        self.backend = backend
        self.model = served_model_name
        self.max_body_bytes = max_body_bytes

    # -- request parsing ---------------------------------------------------------------------
    async def read_body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise InvalidRequest(f"the request body is larger than {self.max_body_bytes} bytes", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise InvalidRequest(f"the request body is larger than {self.max_body_bytes} bytes", status=413)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return payload

    def common_fields(self, body: dict) -> dict:
        if body.get("model") not in (None, self.model):
            raise InvalidRequest(f"the model {body.get('model')!r} does not exist; this server serves {self.model!r}",
                                 "model", status=404)
        if body.get("n", 1) != 1:
            raise InvalidRequest("only n = 1 is supported", "n")
        if body.get("logprobs") or body.get("top_logprobs") or body.get("best_of", 1) != 1:
            raise InvalidRequest("logprobs and best_of are not supported", "logprobs")
        if body.get("tools") or body.get("response_format", {"type": "text"}).get("type", "text") != "text":
            raise InvalidRequest("tools and structured output are not supported", "tools")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or not 1 <= max_tokens < 2**31):
            raise InvalidRequest(f"max_tokens must be an integer >= 1 (got {max_tokens!r})", "max_tokens")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop must be a string or a list of strings", "stop")
        fields = {"max_tokens": max_tokens, "stop_words": stop or None, "stream": True}
        for name, target, kind in (("temperature", "temperature", float), ("top_p", "top_p", float),
                                   ("seed", "random_seed", int), ("frequency_penalty", "frequency_penalty", float),
                                   ("presence_penalty", "presence_penalty", float)):
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and
                                                                                  not isinstance(value, int)):
                raise InvalidRequest(f"{name} must be a {'number' if kind is float else 'integer'}", name)
            if name == "temperature" and not 0 <= value <= 2:
                raise InvalidRequest(f"temperature must be in [0, 2] (got {value})", name)
            if name == "seed" and not 0 <= value < 2**64:
                raise InvalidRequest(f"seed must be in [0, 2**64) (got {value})", name)
            fields[target] = value
        for name in EXTRA_FIELDS:
            if body.get(name) is not None:
                fields[name] = body[name]
        return fields

    def completion_prompt(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            fields = {"text_input": prompt}
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            fields = {"text_input": "", "input_ids": prompt}
        else:
            raise InvalidRequest("prompt must be one string or one list of token ids", "prompt")
        if body.get("echo"):
            fields["exclude_input_in_output"] = False
        return fields

    def chat_prompt(self, body: dict) -> tuple[dict, int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", "messages")
        rendered, images, image_tokens = [], [], 0
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest("each message needs a role and content", "messages")
            content = message.get("content") or ""
            if isinstance(content, list):
                texts = []
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        texts.append(str(part.get("text", "")))
                    elif kind == "image_url":
                        image, tokens = self.image_part(part, len(images))
                        images.append(image)
                        image_tokens += tokens - 1  # the placeholder itself is one token
                        texts.append(self.image_placeholder)
                    else:
                        raise InvalidRequest("content parts must be of type text or image_url", "messages")
                content = "".join(texts)
            if not isinstance(content, str):
                raise InvalidRequest("message content must be a string or a list of content parts", "messages")
            rendered.append({"role": message["role"], "content": content})
        try:
            text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        except Exception as exc:
            raise InvalidRequest(f"the chat template could not be applied: {exc}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        length = len(ids) + image_tokens
        if length >= self.max_seq_len:
            with_images = f" with its {len(images)} image(s)" if images else ""
            raise InvalidRequest(f"the prompt{with_images} has {length} tokens; the model's context is "
                                 f"{self.max_seq_len}", "messages")
        return {"text_input": "", "input_ids": ids} | ({IMAGE_INPUT: images} if images else {}), length

    def image_part(self, part: dict, index: int) -> tuple[bytes, int]:
        """An image_url part -> (encoded image, the prompt tokens it will take)."""
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
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
        except ValueError as exc:
            raise InvalidRequest(f"image {index}: {exc}", "messages") from None
        except Exception:
            raise InvalidRequest(f"image {index}: not a decodable image", "messages") from None
        rows, cols = self.images.grid(*self.images.resized_size(height, width))
        return data, rows * (cols + 1)

    # -- endpoints ---------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "nemodiff",
             "max_model_len": self.max_seq_len}]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if await self.backend.ready() else 503)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        try:
            body = await self.read_body(request)
            fields = self.common_fields(body)
            if chat:
                prompt, prompt_len = self.chat_prompt(body)
                if fields["max_tokens"] is None:
                    fields["max_tokens"] = self.max_seq_len - prompt_len
            else:
                prompt = self.completion_prompt(body)
                if fields["max_tokens"] is None:
                    fields["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
        except InvalidRequest as exc:
            return error_response(exc.status, exc.message, exc.param)
        pieces = self.backend.generate(prompt | fields)
        try:
            first = await anext(pieces)
        except BackendError as exc:
            return error_response(exc.status, exc.message)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(first, pieces, meta, chat, usage), media_type="text/event-stream")
        text, counts, reason = [], [0, 0], None
        piece = first
        try:
            while True:
                text.append(piece.text)
                counts[0] += piece.num_input_tokens
                counts[1] += piece.num_output_tokens
                reason = piece.finish_reason or reason
                if piece.final:
                    break
                piece = await anext(pieces)
        except BackendError as exc:
            return error_response(exc.status, exc.message)
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if chat else
                  {"index": 0, "text": content, "logprobs": None}) | {"finish_reason": _finish_reason(reason)}
        return JSONResponse(meta | {"object": "chat.completion" if chat else "text_completion", "choices": [choice],
                                    "usage": _usage(*counts)})

    async def _events(self, first: Piece, pieces, meta: dict, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None}
            choice["finish_reason"] = reason
            return f"data: {json.dumps(meta | {'object': kind, 'choices': [choice]})}\n\n"

        counts = [0, 0]
        if chat:
            yield chunk("", None, role=True)
        piece = first
        try:
            while True:
                counts[0] += piece.num_input_tokens
                counts[1] += piece.num_output_tokens
                if piece.final:
                    if piece.text:
                        yield chunk(piece.text, None)
                    yield chunk(None if chat else "", _finish_reason(piece.finish_reason))
                    break
                if piece.text:
                    yield chunk(piece.text, None)
                piece = await anext(pieces)
        except BackendError as exc:
            error = {"message": exc.message, "type": ERROR_TYPES.get(exc.status, "server_error"), "param": None,
                     "code": exc.status}
            yield f"data: {json.dumps({'error': error})}\n\n"
        if include_usage:
            yield f"data: {json.dumps(meta | {'object': kind, 'choices': [], 'usage': _usage(*counts)})}\n\n"
        yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(engine_dir, backend: TritonBackend, served_model_name: str, max_body_bytes: int) -> Starlette:
    frontend = OpenAIFrontend(engine_dir, backend, served_model_name, max_body_bytes)
    return Starlette(routes=[
        Route("/v1/models", frontend.models, methods=["GET"]),
        Route("/v1/completions", frontend.completions, methods=["POST"]),
        Route("/v1/chat/completions", frontend.chat_completions, methods=["POST"]),
        Route("/health", frontend.health, methods=["GET"]),
    ])
