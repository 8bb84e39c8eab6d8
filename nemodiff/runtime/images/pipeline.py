"""Prompts with images: preprocess, encode (batched, cached) and lay out the prompt ids.

checkpoint ──builder──▶ engine dir ──[runtime: multimodal prompts]──▶ Triton

A request's images go through two stages. `ImagePipeline.preprocess` (any thread, at
submission) decodes and resizes them and expands the prompt's placeholders into the
`[IMG]`/`[IMG_BREAK]`/`[IMG_END]` layout, giving `PreparedImages`; every bad input fails here
with an `ImageError`. `ImagePipeline.encode` (the engine, when the requests are admitted) runs
the vision tower once over every image of every request it is given, through the content-hash
cache. `RequestImages` keeps one request's pixels until they are encoded, then its feature
rows (on the model's device) until the request ends; a segment covering prompt positions
[start, end) carries `embeds_for(start, end)` as its `image_embeds`. Decoding after the
prefill is text only.

`ImagePipeline.prepare` does both stages at once for a list of requests (`MultimodalPrompt`s).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nemodiff.engine_format import EngineConfig

from .encoder import VisionEncoder
from .feature_cache import VisionFeatureCache, content_key
from .preprocess import ImageError, ImageInput, ImageLimits, ImageProcessor, expand_image_placeholders


@dataclass
class MultimodalPrompt:
    token_ids: list[int]
    image_embeds: torch.Tensor  # [number of image tokens in token_ids, text hidden], in prompt order
    image_token_id: int

    def __post_init__(self):
        ids = torch.tensor(self.token_ids, dtype=torch.long)
        # _before[i] = image tokens among token_ids[:i]
        self._before = torch.cat([torch.zeros(1, dtype=torch.long), (ids == self.image_token_id).long().cumsum(0)])
        if int(self._before[-1]) != self.image_embeds.shape[0]:
            raise ValueError(f"{self.image_embeds.shape[0]} image feature rows for {int(self._before[-1])} image tokens")

    @property
    def num_image_tokens(self) -> int:
        return self.image_embeds.shape[0]

    def embeds_for(self, start: int, end: int) -> torch.Tensor | None:
        """The feature rows of the image tokens among token_ids[start:end] (None if there are none)."""
        first, last = int(self._before[start]), int(self._before[end])
        return self.image_embeds[first:last] if last > first else None


@dataclass
class PreparedImages:
    """One request's images after preprocessing: the expanded prompt and the pixels, not yet encoded."""

    token_ids: list[int]
    pixels: list[torch.Tensor]  # [3, H, W] each, in prompt order


class RequestImages:
    """The images of one running request: pixels until encoded, then the feature rows of its prompt."""

    def __init__(self, token_ids: list[int], pixels: list[torch.Tensor], image_token_id: int,
                 encode: Callable[[list[RequestImages]], None]):
        self.pixels: list[torch.Tensor] | None = pixels
        self.features: MultimodalPrompt | None = None
        self._token_ids = token_ids
        self._image_token_id = image_token_id
        # what names the images in prefix-cache keys: their contents, in prompt order
        self.digest = hashlib.sha256("".join(content_key(p) for p in pixels).encode()).digest()
        self._image_positions = np.flatnonzero(np.asarray(token_ids) == image_token_id)
        self._encode = encode  # the pipeline's batched encoder (used alone only if a prefill comes first)
        self.released = False

    @property
    def encoded(self) -> bool:
        return self.features is not None

    def set_features(self, rows: list[torch.Tensor]) -> None:
        self.features = MultimodalPrompt(self._token_ids, torch.cat(rows), self._image_token_id)
        self.pixels = None

    def embeds_for(self, start: int, end: int) -> torch.Tensor | None:
        """Feature rows of the prompt's image tokens among positions [start, end) (positions past the
        prompt, i.e. generated tokens, never carry image features)."""
        if self.features is None:
            if self.released:
                raise RuntimeError("the request has ended; its image features were released")
            self._encode([self])
        end = min(end, len(self._token_ids))
        return self.features.embeds_for(start, end) if end > start else None

    def prefix_key(self, first: int, end: int) -> bytes:
        """Bytes that join the prefix-cache key of positions [first, end): the images' digest when an
        image token lies there (every image of the request: a conservative key, never a wrong one)."""
        positions = self._image_positions
        i = np.searchsorted(positions, first)
        return self.digest if i < len(positions) and positions[i] < end else b""

    def release(self) -> None:
        """Drop pixels and features (the request has ended); the vision cache keeps its own copy."""
        self.pixels = self.features = None
        self.released = True


class ImagePipeline:
    def __init__(self, processor: ImageProcessor, encoder: VisionEncoder, bos_token_id: int | None = None):
        self.processor = processor
        self.encoder = encoder
        self.bos_token_id = bos_token_id

    @classmethod
    def from_engine(cls, engine_dir: Path, config: EngineConfig, dtype: torch.dtype, device: torch.device | str,
                    cache_bytes: int = 256 << 20, limits: ImageLimits | None = None) -> ImagePipeline:
        """cache_bytes: memory for reused encoder outputs (0 disables the cache)."""
        cache = VisionFeatureCache(cache_bytes) if cache_bytes > 0 else None
        encoder = VisionEncoder.from_engine(engine_dir, config, dtype, device, cache)
        return cls(ImageProcessor(config.vision, limits), encoder, config.model.bos_token_id)

    @property
    def cache(self) -> VisionFeatureCache | None:
        return self.encoder.cache

    @property
    def image_token_id(self) -> int:
        return self.processor.vision.image_token_id

    def preprocess(self, prompt_ids: list[int], images: list[ImageInput],
                   max_prompt_len: int | None = None) -> PreparedImages:
        """Decode and resize the images and lay out the prompt; raises ImageError on any bad input.
        max_prompt_len: the longest expanded prompt allowed."""
        if not isinstance(images, (list, tuple)):
            raise ImageError(f"images must be a list (one entry per image), got {type(images).__name__}")
        if len(images) > self.processor.limits.max_images:
            raise ImageError(f"{len(images)} images in one prompt; the limit is {self.processor.limits.max_images}")
        self.processor.check_request_pixels([self.processor.size(image, i) for i, image in enumerate(images)])
        tensors = [self.processor.preprocess(image, index) for index, image in enumerate(images)]
        layouts = [self.processor.image_tokens(*t.shape[-2:]) for t in tensors]
        expanded = expand_image_placeholders(list(prompt_ids), layouts, self.image_token_id, self.bos_token_id)
        if max_prompt_len is not None and len(expanded) > max_prompt_len:
            raise ImageError(f"the prompt with its images is {len(expanded)} tokens, more than the context leaves "
                             f"for the prompt ({max_prompt_len} tokens); send fewer or smaller images, or ask for "
                             "fewer new tokens")
        return PreparedImages(expanded, tensors)

    def encode(self, requests: list[RequestImages]) -> None:
        """Encode the images of several requests in one call of the vision tower (through the cache)."""
        todo = [r for r in requests if not r.encoded and not r.released]
        if not todo:
            return
        features = iter(self.encoder.encode([t for r in todo for t in r.pixels]))
        for request in todo:
            request.set_features([next(features) for _ in request.pixels])

    def prepare(self, requests: list[tuple[list[int], list[ImageInput]]],
                max_prompt_len: int | None = None) -> list[MultimodalPrompt]:
        """requests: (prompt ids, images) each. max_prompt_len: longest expanded prompt allowed."""
        vision = self.processor.vision
        prepared = [self.preprocess(ids, images, max_prompt_len) for ids, images in requests]
        features = iter(self.encoder.encode([t for p in prepared for t in p.pixels]))
        prompts = []
        for p in prepared:
            rows = [next(features) for _ in p.pixels]
            embeds = torch.cat(rows) if rows else torch.zeros(0, vision.text_hidden_size, dtype=self.encoder.dtype,
                                                              device=self.encoder.device)
            prompts.append(MultimodalPrompt(p.token_ids, embeds, vision.image_token_id))
        return prompts
