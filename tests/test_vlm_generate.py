"""Generation with images, end to end through the engine: every decode mode, mixed batches, chunked
prefill, preemption, the vision-feature cache and bad images, on a random NLD VLM checkpoint.

References: transformers' Mistral3ForConditionalGeneration (greedy AR), the engine's own AR
output (the spec modes are lossless) and the dense diffusion reference of docs/design.md §5.2.
"""

import pytest
import torch
from test_diffusion_reference import reference_diffusion

from helpers import make_engine, make_vlm_checkpoint, png_bytes, transformers_pixels, transformers_vlm
from nemodiff import LLM, SamplingParams
from nemodiff.engine_format import EngineConfig
from nemodiff.runtime.images.pipeline import ImagePipeline
from nemodiff.runtime.images.preprocess import ImageError, ImageLimits
from nemodiff.serving.async_engine import AsyncEngine

IMAGES = [png_bytes(40, 24, seed=1), png_bytes(100, 75, seed=2), png_bytes(9, 30, seed=3)]
# (prompt ids, images): one placeholder, two placeholders, no placeholder (the image goes first)
CASES = [([1, 3, 10, 150, 151, 4], IMAGES[:1]),
         ([1, 3, 160, 10, 161, 10, 162, 4], IMAGES[1:]),
         ([1, 3, 170, 171, 4], IMAGES[2:])]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-generate")
    checkpoint = make_vlm_checkpoint(root / "ckpt", lora_rank=4)
    return checkpoint, make_engine(checkpoint, root / "engine", kv_page_size=4, max_seq_len=256)


@pytest.fixture(scope="module")
def llm(vlm):
    return LLM(vlm[1], device="cpu")


def greedy(max_new_tokens=10, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **extra)


def test_greedy_ar_with_images_equals_transformers(vlm, llm):
    oracle = transformers_vlm(vlm[0])
    for prompt, images in CASES:
        out = llm.generate(prompt, greedy(), images=images)[0]
        pixels, sizes = transformers_pixels(images, 64, 8)
        with torch.no_grad():
            want = oracle.generate(input_ids=torch.tensor([out.prompt_ids]), pixel_values=pixels, image_sizes=sizes,
                                   max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        assert out.output_ids == want[0, len(out.prompt_ids):].tolist()
        assert len(out.prompt_ids) > len(prompt) and 13 in out.prompt_ids  # laid out: rows, breaks, [IMG_END]


@pytest.mark.parametrize("mode,block", [("linear-spec", 4), ("linear-spec", 8), ("quadratic-spec", 4)])
def test_spec_modes_with_images_equal_ar(llm, mode, block):
    prompts, images = [c[0] for c in CASES], [c[1] for c in CASES]
    ar = llm.generate(prompts, greedy(12), images=images)
    spec = llm.generate(prompts, greedy(12, mode=mode, block_length=block), images=images)
    assert [o.output_ids for o in spec] == [o.output_ids for o in ar]


@pytest.mark.parametrize("tau,block", [(0.9, 4), (None, 8)])
def test_diffusion_with_images_equals_dense_reference(vlm, llm, tau, block):
    pipeline = ImagePipeline.from_engine(vlm[1], EngineConfig.load(vlm[1]), torch.float32, "cpu", cache_bytes=0)
    for prompt, images in CASES[:2]:
        out = llm.generate(prompt, greedy(13, mode="diffusion", block_length=block, threshold=tau), images=images)[0]
        (mm,) = pipeline.prepare([(prompt, images)])
        assert out.prompt_ids == mm.token_ids
        assert out.output_ids == reference_diffusion(llm.model, mm.token_ids, block, tau, 13, set(), mm.image_embeds)


def test_mixed_batches_of_text_and_image_requests_are_exact(llm):
    prompts = [CASES[0][0], [1, 3, 200, 201, 202, 4], CASES[1][0], [1, 5, 210, 211]]
    images = [CASES[0][1], None, CASES[1][1], []]
    params = [greedy(9), greedy(9, mode="linear-spec", block_length=4), greedy(9, mode="quadratic-spec", block_length=4),
              greedy(9, mode="diffusion", block_length=4)]
    together = llm.generate(prompts, params, images=images)
    for prompt, image_list, p, got in zip(prompts, images, params, together):
        alone = llm.generate([prompt], p, images=[image_list])[0]
        assert got.output_ids == alone.output_ids and got.prompt_ids == alone.prompt_ids


@pytest.mark.parametrize("mode,block,budget", [("ar", None, 9), ("quadratic-spec", 4, 24), ("linear-spec", 4, 9)])
def test_chunked_prefill_and_preemption_with_images_are_exact(vlm, llm, mode, block, budget):
    prompts, images = [c[0] for c in CASES], [c[1] for c in CASES]
    params = greedy(16, mode=mode, block_length=block)
    want = [o.output_ids for o in llm.generate(prompts, params, images=images)]
    chunked = LLM(vlm[1], device="cpu", max_num_batched_tokens=budget)  # chunk borders inside the image rows
    assert [o.output_ids for o in chunked.generate(prompts, params, images=images)] == want
    tight = LLM(vlm[1], device="cpu", num_kv_pages=26, max_batch_size=3)  # the page pool runs dry
    fills, schedule = [], tight.engine.scheduler.schedule

    def recording_schedule():  # the real schedule; the re-fills it plans are kept for the checks below
        work = schedule()
        fills.extend((item.sequence.request, item.segment) for item in work if item.is_fill)
        return work

    tight.engine.scheduler.schedule = recording_schedule
    outs = tight.generate(prompts, params, images=images)
    assert sum(o.stats.get("preemptions", 0) for o in outs) > 0
    assert [o.output_ids for o in outs] == want
    assert any(int(seg.positions[0]) >= len(r.prompt_ids) for r, seg in fills)  # re-fills of generated tokens
    for request, seg in fills:  # a re-fill never mixes prompt (image) tokens with generated ones
        start, end, prompt_len = int(seg.positions[0]), int(seg.positions[-1]) + 1, len(request.prompt_ids)
        assert end <= prompt_len or (start >= prompt_len and seg.image_embeds is None)
        if start == 0:
            assert seg.image_embeds is not None  # every prompt here holds an image


def test_identical_images_reuse_the_vision_output(vlm, llm):
    cached = LLM(vlm[1], device="cpu")
    uncached = LLM(vlm[1], device="cpu", vision_cache_bytes=0)
    prompts = [[1, 3, 10, 150, 4], [1, 3, 10, 151, 4]]
    same = [[IMAGES[0]], [IMAGES[0]]]  # two concurrent requests, one image
    first = cached.generate(prompts, greedy(), images=same)
    assert (cached.vision_cache.hits, cached.vision_cache.misses) == (1, 1)
    later = cached.generate([1, 3, 10, 152, 4], greedy(), images=[IMAGES[0]])  # a later request
    assert (cached.vision_cache.hits, cached.vision_cache.misses) == (2, 1)
    assert uncached.vision_cache is None
    assert [o.output_ids for o in first] == [o.output_ids for o in uncached.generate(prompts, greedy(), images=same)]
    assert later[0].output_ids == uncached.generate([1, 3, 10, 152, 4], greedy(), images=[IMAGES[0]])[0].output_ids
    assert cached.engine.image_stats()["vision_cache_hits"] == 2


def test_features_live_with_the_request_and_are_freed_when_it_ends(llm):
    engine = llm.engine
    done = engine.add_request(CASES[0][0], greedy(3), images=CASES[0][1])
    cancelled = engine.add_request(CASES[1][0], greedy(50), images=CASES[1][1])
    assert done.images.pixels is not None and not done.images.encoded
    engine.step()  # admission: both requests' images are encoded in this step, then the prefill runs
    assert done.images.encoded and cancelled.images.encoded and done.images.pixels is None
    assert done.images.features.image_embeds.device == llm.model.device
    while not done.finished:
        engine.step()
    assert done.images.released and done.images.features is None
    engine.abort(cancelled)
    assert cancelled.images.released and not engine.has_unfinished()


def test_async_engine_carries_images_and_survives_bad_ones(llm):
    want = llm.generate(CASES[0][0], greedy(6), images=CASES[0][1])[0]  # before the AsyncEngine drives the engine
    server = AsyncEngine(llm)
    try:
        got = server.generate(CASES[0][0], greedy(6), images=CASES[0][1], timeout=120)
        assert got.output.output_ids == want.output_ids and got.output.prompt_ids == want.prompt_ids
        bad = server.generate(CASES[0][0], greedy(6), images=[b"\x89PNG but not really"], timeout=120)
        assert bad.error_kind == "invalid" and "not a decodable image" in bad.error
        assert server.generate(CASES[0][0], greedy(6), images=CASES[0][1], timeout=120).output.output_ids == \
            want.output_ids
        assert server.metrics()["vision_cache_hits"] >= 1 and server.healthy
    finally:
        server.shutdown()


def test_bad_images_get_clear_errors(vlm, llm, engine_fp32, tmp_path):
    with pytest.raises(ImageError, match="image 0: not a decodable image"):
        llm.generate([1, 10, 4], greedy(), images=[b"not an image"])
    with pytest.raises(ImageError, match=r"image 1: file .*missing\.png not found"):
        llm.generate([1, 10, 10, 4], greedy(), images=[IMAGES[0], tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="more than the context leaves for the prompt"):
        llm.generate([1, 4], greedy(), images=[png_bytes(64, 64, seed=i) for i in range(4)])  # 4 x 72 tokens > 256
    with pytest.raises(ImageError, match="3 image placeholders for 1 images"):
        llm.generate([1, 10, 10, 10], greedy(), images=[IMAGES[0]])
    with pytest.raises(ImageError, match="image placeholder.*but no image was given"):
        llm.generate([1, 10, 4], greedy())
    small = LLM(vlm[1], device="cpu", image_limits=ImageLimits(max_bytes=100, max_images=2))
    with pytest.raises(ImageError, match="too large"):
        small.generate([1, 4], greedy(), images=[IMAGES[1]])
    with pytest.raises(ImageError, match="3 images in one prompt; the limit is 2"):
        small.generate([1, 4], greedy(), images=[IMAGES[2]] * 3)
    with pytest.raises(ValueError, match="one list of images per prompt"):
        llm.generate([[1, 4], [1, 5]], greedy(), images=[[IMAGES[0]]])
    with pytest.raises(ValueError, match="no vision tower"):
        LLM(engine_fp32, device="cpu").generate([1, 4], greedy(), images=[IMAGES[0]])
    assert not llm.engine.has_unfinished()
    assert llm.generate(*CASES[0][:1], greedy(4), images=CASES[0][1])[0].finish_reason == "length"
