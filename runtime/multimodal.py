"""Prompts with images: preprocess, encode (batched, cached) and lay out the prompt ids.

checkpoint ──builder──▶ engine dir ──[runtime: multimodal prompts]──▶ Triton

`ImagePipeline.prepare` turns requests of (prompt ids, images) into `MultimodalPrompt`s: the
expanded prompt ids and one feature row per `[IMG]` token. Every image of every request runs
through the vision tower in one batched call. A prefill segment covering prompt positions
[start, end) carries `prompt.embeds_for(start, end)` as its `image_embeds`; decoding after
the prefill is text only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nemodiff.engine_format import EngineConfig

from .image_processing import ImageError, ImageInput, ImageLimits, ImageProcessor, expand_image_placeholders
from .vision import VisionEncoder
from .vision_cache import VisionFeatureCache


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

    def prepare(self, requests: list[tuple[list[int], list[ImageInput]]],
                max_prompt_len: int | None = None) -> list[MultimodalPrompt]:
        """requests: (prompt ids, images) each. max_prompt_len: longest expanded prompt allowed."""
        vision = self.processor.vision
        pixels, layouts = [], []
        for ids, images in requests:
            if len(images) > self.processor.limits.max_images:
                raise ImageError(f"{len(images)} images in one prompt; the limit is {self.processor.limits.max_images}")
            tensors = [self.processor.preprocess(image, index) for index, image in enumerate(images)]
            expanded = expand_image_placeholders(list(ids), [self.processor.image_tokens(*t.shape[-2:]) for t in tensors],
                                                 vision.image_token_id, self.bos_token_id)
            if max_prompt_len is not None and len(expanded) > max_prompt_len:
                raise ImageError(f"the prompt with its images is {len(expanded)} tokens, more than the context allows "
                                 f"({max_prompt_len}); send fewer or smaller images")
            pixels.append(tensors)
            layouts.append(expanded)
        features = iter(self.encoder.encode([t for tensors in pixels for t in tensors]))
        prompts = []
        for expanded, tensors in zip(layouts, pixels):
            rows = [next(features) for _ in tensors]
            embeds = torch.cat(rows) if rows else torch.zeros(0, vision.text_hidden_size, dtype=self.encoder.dtype,
                                                              device=self.encoder.device)
            prompts.append(MultimodalPrompt(expanded, embeds, vision.image_token_id))
        return prompts
