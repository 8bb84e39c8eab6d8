"""Images in, pixel tensors and prompt token ids out: the VLM's preprocessing (docs/design.md §2).

checkpoint ──builder──▶ engine dir ──[runtime: image preprocessing]──▶ Triton

As Pixtral's processor does it: decode (Pillow), composite any transparency onto white, resize
(bicubic) so the longest edge fits `longest_edge`, each side rounded up to a whole number of
merged patches (patch_size x spatial_merge_size pixels: one image token each), rescale to
[0, 1] and normalise with the CLIP mean and std. An image of R x C merged
patches is laid out in the prompt as R rows of C `[IMG]` tokens, each row closed by
`[IMG_BREAK]`, with the last row's break replaced by `[IMG_END]`.

Every bad input raises `ImageError` (a ValueError) with a message meant for the caller.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nemodiff.engine_format import VisionConfig

ImageInput = bytes | bytearray | str | Path | Image.Image


class ImageError(ValueError):
    """An image cannot be used: not decodable, too large, or too many for the context."""


@dataclass
class ImageLimits:
    max_bytes: int = 32 << 20  # encoded size
    max_pixels: int = 64_000_000  # decoded width x height, checked before decoding the pixels
    max_images: int = 16  # per prompt
    max_request_pixels: int = 64_000_000  # width x height summed over a prompt's images, checked before decoding


def _describe(index: int | None) -> str:
    return "image" if index is None else f"image {index}"


class ImageProcessor:
    def __init__(self, vision: VisionConfig, limits: ImageLimits | None = None):
        self.vision = vision
        self.limits = limits or ImageLimits()

    # -- decoding ----------------------------------------------------------------------------
    def size(self, image: ImageInput, index: int | None = None) -> tuple[int, int]:
        """(width, height) from the image's header alone, within the limits (ImageError otherwise)."""
        name = _describe(index)
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            image = self._encoded(image, name)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(io.BytesIO(bytes(image))) as header:  # reads the header only
                        width, height = header.size
            except UnidentifiedImageError:
                raise ImageError(f"{name}: not a decodable image (unknown or corrupt image format)") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageError(f"{name}: too many pixels ({exc})") from None
            except (OSError, ValueError, SyntaxError) as exc:
                raise ImageError(f"{name}: not a decodable image ({type(exc).__name__}: {exc})") from None
        self._check_pixels(width, height, name)
        return width, height

    def _encoded(self, image, name: str) -> bytes:
        """The encoded bytes of a path or bytes input, within the size limit (ImageError otherwise)."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise ImageError(f"{name}: file {path} not found")
            if path.stat().st_size > self.limits.max_bytes:
                raise ImageError(f"{name}: {path.stat().st_size} bytes is too large (limit {self.limits.max_bytes})")
            image = path.read_bytes()
        if not isinstance(image, (bytes, bytearray)):
            raise ImageError(f"{name}: expected encoded image bytes, a path or a PIL image, got {type(image).__name__}")
        if len(image) > self.limits.max_bytes:
            raise ImageError(f"{name}: {len(image)} bytes is too large (limit {self.limits.max_bytes})")
        return image

    def check_request_pixels(self, sizes: list[tuple[int, int]]) -> None:
        """A prompt's images together, from their headers: bounded before any of them is decoded."""
        total = sum(w * h for w, h in sizes)
        if total > self.limits.max_request_pixels:
            raise ImageError(f"too many pixels: the {len(sizes)} images have {total} pixels in all, more than the "
                             f"limit of {self.limits.max_request_pixels} pixels per request")

    def load(self, image: ImageInput, index: int | None = None) -> Image.Image:
        """Decode encoded bytes (or a file path, or a PIL image) into an RGB image."""
        name = _describe(index)
        if isinstance(image, Image.Image):
            self._check_pixels(image.width, image.height, name)
            return self._to_rgb(image)
        image = self._encoded(image, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                decoded = Image.open(io.BytesIO(bytes(image)))
                self._check_pixels(decoded.width, decoded.height, name)
                decoded.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a decodable image (unknown or corrupt image format)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{name}: not a decodable image ({type(exc).__name__}: {exc})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: too large ({exc})") from None
        return self._to_rgb(decoded)

    def _check_pixels(self, width: int, height: int, name: str) -> None:
        if width * height > self.limits.max_pixels:
            raise ImageError(f"{name}: {width}x{height} pixels is too large (limit {self.limits.max_pixels} pixels)")
        if width < 1 or height < 1:
            raise ImageError(f"{name}: empty image ({width}x{height})")

    @staticmethod
    def _to_rgb(image: Image.Image) -> Image.Image:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")

    # -- pixels ------------------------------------------------------------------------------
    @property
    def token_pixels(self) -> int:
        """Side in pixels of the square one image token covers."""
        return self.vision.patch_size * self.vision.spatial_merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Fit the longest edge, then round each side up to whole image tokens."""
        longest, step = self.vision.longest_edge, self.token_pixels
        ratio = max(height / longest, width / longest)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        return ((height - 1) // step + 1) * step, ((width - 1) // step + 1) * step

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of image tokens for a preprocessed image of this pixel size."""
        return height // self.token_pixels, width // self.token_pixels

    def preprocess(self, image: ImageInput, index: int | None = None) -> torch.Tensor:
        """One image -> float32 pixels [3, H, W], H and W multiples of the patch size."""
        rgb = self.load(image, index)
        height, width = self.resized_size(rgb.height, rgb.width)
        rows, cols = self.grid(height, width)
        if rows < 1 or cols < 1:
            raise ImageError(f"{_describe(index)}: {rgb.width}x{rgb.height} pixels is too small or too thin (it "
                             f"resizes to {width}x{height}, less than one image token)")
        if (height, width) != (rgb.height, rgb.width):
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        scaled = (pixels.astype(np.float64) * self.vision.rescale_factor).astype(np.float32)
        mean = np.asarray(self.vision.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.vision.image_std, dtype=np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray((scaled - mean) / std))

    # -- tokens ------------------------------------------------------------------------------
    def image_tokens(self, height: int, width: int) -> list[int]:
        """The token ids standing for one preprocessed image in the prompt."""
        rows, cols = self.grid(height, width)
        v = self.vision
        tokens = ([v.image_token_id] * cols + [v.image_break_token_id]) * rows
        tokens[-1] = v.image_end_token_id
        return tokens


def expand_image_placeholders(prompt_ids: list[int], image_tokens: list[list[int]], image_token_id: int,
                              bos_token_id: int | None = None, max_images: int | None = None) -> list[int]:
    """Replace each `[IMG]` placeholder of a prompt by its image's token layout.

    The prompt marks where each image goes with one `[IMG]` per image, in order. A prompt
    without placeholders gets its images first (after a leading BOS, if it starts with one).
    """
    if max_images is not None and len(image_tokens) > max_images:
        raise ImageError(f"{len(image_tokens)} images in one prompt; the limit is {max_images}")
    placeholders = [i for i, token in enumerate(prompt_ids) if token == image_token_id]
    if not image_tokens:
        if placeholders:
            raise ImageError(f"the prompt has {len(placeholders)} image placeholder(s) but no image was given")
        return list(prompt_ids)
    if not placeholders:
        start = 1 if prompt_ids and bos_token_id is not None and prompt_ids[0] == bos_token_id else 0
        return list(prompt_ids[:start]) + [t for tokens in image_tokens for t in tokens] + list(prompt_ids[start:])
    if len(placeholders) != len(image_tokens):
        raise ImageError(f"the prompt has {len(placeholders)} image placeholders for {len(image_tokens)} images "
                         "(give one placeholder per image, or none to put the images first)")
    out, last = [], 0
    for position, tokens in zip(placeholders, image_tokens):
        out += prompt_ids[last:position] + tokens
        last = position + 1
    return out + list(prompt_ids[last:])
