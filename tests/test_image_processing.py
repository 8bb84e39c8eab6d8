"""Image preprocessing against transformers' Pixtral image processor, the token layout, the
placeholder expansion, and the errors for bad images."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_engine, make_vlm_checkpoint, png_bytes, transformers_pixels
from nemodiff.engine_format import EngineConfig, VisionConfig
from nemodiff.runtime.images.pipeline import ImagePipeline
from nemodiff.runtime.images.preprocess import ImageError, ImageLimits, ImageProcessor, expand_image_placeholders

IMG, BREAK, END = 10, 12, 13


def vision_config(**changes) -> VisionConfig:
    return VisionConfig(**({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "patch_size": 14, "text_hidden_size": 64,
                            "longest_edge": 1540} | changes))


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def sample_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 52, 4), dtype=np.uint8)
    rgba[..., 3] = rng.integers(0, 2, (37, 52)) * 255  # half transparent: composited onto white
    smooth = np.linspace(0, 255, 300 * 130 * 3).reshape(130, 300, 3).astype(np.uint8)
    return {
        "rgb png, upscaled to whole tokens": png_bytes(61, 45, seed=4),
        "rgba png": encoded(Image.fromarray(rgba, "RGBA")),
        "grayscale": encoded(Image.fromarray(rng.integers(0, 256, (20, 33), dtype=np.uint8), "L")),
        "palette with transparency": encoded(Image.fromarray(rgba[..., :3], "RGB").quantize(16), transparency=3),
        "jpeg, shrunk to the longest edge": encoded(Image.fromarray(smooth, "RGB"), "JPEG", quality=90),
        "tall and thin": png_bytes(7, 200, seed=5),
    }


@pytest.mark.parametrize("longest_edge, patch, merge", [(64, 4, 2), (112, 14, 2)])
def test_preprocessing_equals_transformers_pixtral_processor(longest_edge, patch, merge):
    processor = ImageProcessor(vision_config(longest_edge=longest_edge, patch_size=patch, spatial_merge_size=merge))
    images = sample_images()
    want, sizes = transformers_pixels(list(images.values()), longest_edge, patch * merge)
    for (name, data), reference, (height, width) in zip(images.items(), want, sizes.tolist()):
        got = processor.preprocess(data)
        assert tuple(got.shape) == (3, height, width), name
        assert height % (patch * merge) == 0 and width % (patch * merge) == 0 and max(height, width) <= longest_edge
        assert torch.allclose(got, reference[:, :height, :width], atol=1e-6, rtol=0), name


def test_token_layout_rows_breaks_and_end():
    processor = ImageProcessor(vision_config(patch_size=4, spatial_merge_size=2))
    assert processor.grid(16, 24) == (2, 3)
    assert processor.image_tokens(16, 24) == [IMG, IMG, IMG, BREAK, IMG, IMG, IMG, END]
    assert processor.image_tokens(8, 8) == [IMG, END]
    assert processor.image_tokens(24, 8) == [IMG, BREAK, IMG, BREAK, IMG, END]


def test_placeholders_mark_where_each_image_goes():
    a, b = [IMG, END], [IMG, IMG, BREAK, IMG, IMG, END]
    assert expand_image_placeholders([1, 3, IMG, 50, IMG, 4], [a, b], IMG, 1) == [1, 3, *a, 50, *b, 4]
    assert expand_image_placeholders([1, 3, 50, 4], [a, b], IMG, 1) == [1, *a, *b, 3, 50, 4]  # first, after BOS
    assert expand_image_placeholders([3, 50], [a], IMG, 1) == [*a, 3, 50]
    assert expand_image_placeholders([1, 3, 50], [], IMG, 1) == [1, 3, 50]
    with pytest.raises(ImageError, match="2 image placeholders for 1 images"):
        expand_image_placeholders([IMG, 5, IMG], [a], IMG, 1)
    with pytest.raises(ImageError, match="1 image placeholder\\(s\\) but no image was given"):
        expand_image_placeholders([1, IMG], [], IMG, 1)
    with pytest.raises(ImageError, match="3 images in one prompt; the limit is 2"):
        expand_image_placeholders([1], [a, a, a], IMG, 1, max_images=2)


def test_bad_images_get_clear_errors(tmp_path):
    processor = ImageProcessor(vision_config(), ImageLimits(max_bytes=50_000, max_pixels=100_000))
    good = png_bytes(40, 30)
    cases = {
        b"definitely not an image": "image 0: not a decodable image",
        good[: len(good) // 2]: "image 0: not a decodable image",  # truncated
        encoded(Image.new("RGB", (400, 300))): "image 0: 400x300 pixels is too large (limit 100000 pixels)",
        b"\x00" * 60_000: "image 0: 60000 bytes is too large (limit 50000)",
        12345: "image 0: expected encoded image bytes, a path or a PIL image, got int",
        tmp_path / "missing.png": "missing.png not found",
    }
    for data, message in cases.items():
        with pytest.raises(ImageError, match=message.replace("(", "\\(").replace(")", "\\)")):
            processor.preprocess(data, index=0)
    (tmp_path / "ok.png").write_bytes(good)
    assert torch.equal(processor.preprocess(tmp_path / "ok.png"), processor.preprocess(good))
    assert issubclass(ImageError, ValueError)  # callers that report ValueErrors report these too


def test_pixels_are_bounded_per_request_from_the_headers():
    processor = ImageProcessor(vision_config(), ImageLimits(max_pixels=100_000, max_request_pixels=150_000))
    image = encoded(Image.new("RGB", (300, 300)))
    assert processor.size(image, 0) == (300, 300)
    processor.check_request_pixels([(300, 300)])
    with pytest.raises(ImageError, match="too many pixels: the 2 images have 180000 pixels in all, more than the "
                                         "limit of 150000 pixels per request"):
        processor.check_request_pixels([processor.size(image, i) for i in range(2)])
    with pytest.raises(ImageError, match="image 1: 400x300 pixels is too large"):
        processor.size(encoded(Image.new("RGB", (400, 300))), 1)


def test_too_many_images_for_the_context(tmp_path):
    engine = make_engine(make_vlm_checkpoint(tmp_path / "ckpt"), tmp_path / "engine")
    pipeline = ImagePipeline.from_engine(engine, EngineConfig.load(engine), torch.float32, "cpu",
                                         limits=ImageLimits(max_images=3))
    image = png_bytes(64, 64)  # 8 x 8 tokens + 8 breaks = 72 prompt tokens
    (fits,) = pipeline.prepare([([1, 5], [image])], max_prompt_len=74)
    assert len(fits.token_ids) == 74 and fits.num_image_tokens == 64
    with pytest.raises(ImageError, match="the prompt with its images is 146 tokens, more than the context leaves"):
        pipeline.prepare([([1, 5], [image, image])], max_prompt_len=100)
    with pytest.raises(ImageError, match="4 images in one prompt; the limit is 3"):
        pipeline.prepare([([1, 5], [image] * 4)])
    with pytest.raises(ImageError, match="image 1: not a decodable image"):
        pipeline.prepare([([1, 5], [image, b"junk"])])
