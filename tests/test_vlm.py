"""The VLM against transformers' Mistral3ForConditionalGeneration: vision features, prompt logits
with images spliced in, chunked prefill, and the encoder-output cache."""

import pytest
import torch

from helpers import make_engine, make_vlm_checkpoint, png_bytes, relative_error, transformers_pixels, transformers_vlm
from nemodiff.engine_format import EngineConfig
from nemodiff.runtime.images.encoder import VisionEncoder
from nemodiff.runtime.images.feature_cache import VisionFeatureCache
from nemodiff.runtime.images.pipeline import ImagePipeline, MultimodalPrompt
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Pattern, Segment

IMAGES = [png_bytes(40, 24, seed=1), png_bytes(100, 75, seed=2), png_bytes(9, 30, seed=3)]  # the middle one shrinks


@pytest.fixture(scope="module", params=["encoder", "language_model"])
def vlm(request, tmp_path_factory):
    """(checkpoint, engine, oracle) for each weight layout."""
    root = tmp_path_factory.mktemp(f"vlm-{request.param}")
    checkpoint = make_vlm_checkpoint(root / "ckpt", layout=request.param)
    engine = make_engine(checkpoint, root / "engine", kv_page_size=4)
    return checkpoint, engine, transformers_vlm(checkpoint)


def pipeline_of(engine, cache_bytes=0):
    return ImagePipeline.from_engine(engine, EngineConfig.load(engine), torch.float32, "cpu", cache_bytes=cache_bytes)


def test_vision_features_equal_transformers(vlm):
    _, engine, oracle = vlm
    pipeline = pipeline_of(engine)
    vision = pipeline.processor.vision
    pixels, sizes = transformers_pixels(IMAGES, vision.longest_edge, pipeline.processor.token_pixels)
    with torch.no_grad():
        want = oracle.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True).pooler_output
    got = pipeline.encoder.encode([pipeline.processor.preprocess(image) for image in IMAGES])
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    assert [g.shape[0] for g in got] == [15, 8 * 6, 4 * 2]  # 40x24 px: 5x3 tokens; 100x75 -> 64x48 px; 9x30 -> 16x32 px
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5


def test_prompt_logits_with_images_equal_transformers(vlm):
    _, engine, oracle = vlm
    pipeline = pipeline_of(engine)
    model = load_engine(engine, device="cpu").model
    prompt = [1, 3, 10, 150, 151, 10, 152, 4, 200, 201]  # two [IMG] placeholders
    images = IMAGES[:2]
    (mm,) = pipeline.prepare([(prompt, images)])
    got = model.forward([Segment(0, mm.token_ids, list(range(len(mm.token_ids))), 0, Pattern.CAUSAL,
                                 image_embeds=mm.image_embeds)])[0]
    pixels, sizes = transformers_pixels(images, pipeline.processor.vision.longest_edge, pipeline.processor.token_pixels)
    with torch.no_grad():
        want = oracle(input_ids=torch.tensor([mm.token_ids]), pixel_values=pixels, image_sizes=sizes).logits[0]
    assert got.shape == want.shape and relative_error(got, want) < 1e-5
    text_only = model.forward([Segment(0, mm.token_ids, list(range(len(mm.token_ids))), 0, Pattern.CAUSAL)])[0]
    assert relative_error(text_only, want) > 1e-2  # the features matter


def test_chunked_prefill_splices_each_chunk_like_one_forward(vlm):
    _, engine, _ = vlm
    pipeline = pipeline_of(engine)
    model, cfg = (loaded := load_engine(engine, device="cpu")).model, loaded.config.model
    (mm,) = pipeline.prepare([([1, 3, 150, 151, 152, 4], IMAGES[:1])])  # no placeholder: the image goes first
    assert mm.token_ids[:2] == [1, 10] and mm.token_ids[-5:] == [3, 150, 151, 152, 4]
    n = len(mm.token_ids)
    whole = model.forward([Segment(0, mm.token_ids, list(range(n)), 0, Pattern.CAUSAL, logit_rows=[n - 1],
                                   image_embeds=mm.image_embeds)])[0]
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, 16, torch.float32)
    cache.add_request(0)
    done = 0
    for end in (5, 13, n):  # chunk borders inside the image rows
        cache.reserve(0, end)
        seg = Segment(0, mm.token_ids[done:end], list(range(done, end)), done, Pattern.CAUSAL, write_kv=True,
                      logit_rows=[end - done - 1], image_embeds=mm.embeds_for(done, end))
        last = model.forward([seg], cache)[0]
        cache.set_length(0, end)
        done = end
    assert torch.allclose(last, whole, rtol=1e-5, atol=1e-5)


def test_mixed_batch_of_image_and_text_segments_equals_each_alone(vlm):
    _, engine, _ = vlm
    pipeline = pipeline_of(engine)
    model = load_engine(engine, device="cpu").model
    with_image, plain = pipeline.prepare([([1, 10, 150, 151], IMAGES[2:]), ([1, 160, 161, 162], [])])
    assert plain.num_image_tokens == 0 and plain.embeds_for(0, 4) is None
    segments = [Segment(0, with_image.token_ids, list(range(len(with_image.token_ids))), 0,
                        image_embeds=with_image.image_embeds),
                Segment(1, plain.token_ids, list(range(4)), 0)]
    together = model.forward(segments)
    for seg, got in zip(segments, together):
        assert torch.allclose(got, model.forward([seg])[0], rtol=1e-5, atol=1e-5)


def test_image_embeds_must_match_the_image_tokens(vlm):
    _, engine, _ = vlm
    model = load_engine(engine, device="cpu").model
    seg = Segment(0, [1, 10, 10, 5], [0, 1, 2, 3], 0, image_embeds=torch.zeros(1, model.config.hidden_size))
    with pytest.raises(ValueError, match="1 image embeddings for 2 image tokens"):
        model.forward([seg])
    with pytest.raises(ValueError, match="image feature rows"):
        MultimodalPrompt([1, 10, 10], torch.zeros(3, 4), 10)


def test_cache_reuses_identical_images_and_stays_bounded(vlm):
    _, engine, _ = vlm
    config = EngineConfig.load(engine)
    plain = VisionEncoder.from_engine(engine, config, torch.float32)
    pipeline = pipeline_of(engine, cache_bytes=1 << 20)
    cache = pipeline.cache
    a, b = pipeline.processor.preprocess(IMAGES[0]), pipeline.processor.preprocess(IMAGES[1])
    first = pipeline.encoder.encode([a, b, a])  # the repeat within one call is a hit
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    again = pipeline.encoder.encode([pipeline.processor.preprocess(IMAGES[0])])  # a later request, same content
    assert (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(again[0], first[0]) and torch.equal(first[2], first[0])
    reference = plain.encode([a, b])
    assert torch.allclose(first[1], reference[1], rtol=1e-6, atol=1e-6)

    small = VisionFeatureCache(max_bytes=first[0].numel() * 4 + first[1].numel() * 4)
    bounded = VisionEncoder.from_engine(engine, config, torch.float32, cache=small)
    c = pipeline.processor.preprocess(IMAGES[2])
    bounded.encode([a, b])
    bounded.encode([c])  # evicts the least recently used entry (a)
    assert small.bytes <= small.max_bytes and small.evictions >= 1
    bounded.encode([a])
    assert small.misses == 4 and small.hits == 0
    assert small.stats()["entries"] == len(small)


def test_text_only_generation_on_a_vlm_engine_matches_transformers(vlm):
    from nemodiff import LLM, SamplingParams

    _, engine, oracle = vlm
    prompt = [1, 3, 150, 151, 152, 4]
    out = LLM(engine, device="cpu").generate(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    with torch.no_grad():
        want = oracle.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert out.output_ids == want[0, len(prompt):].tolist()


def test_an_earlier_vision_feature_layer_equals_transformers(tmp_path):
    import json

    checkpoint = make_vlm_checkpoint(tmp_path / "ckpt", seed=9)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"vision_feature_layer": -2}))
    pipeline = pipeline_of(make_engine(checkpoint, tmp_path / "engine"))
    assert len(pipeline.encoder.layers) == 1  # the last layer's output is not used, so it never runs
    pixels, sizes = transformers_pixels(IMAGES[:2], 64, pipeline.processor.token_pixels)
    with torch.no_grad():
        want = transformers_vlm(checkpoint).model.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                                                     return_dict=True).pooler_output
    got = pipeline.encoder.encode([pipeline.processor.preprocess(image) for image in IMAGES[:2]])
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5


def test_bf16_encoder_stays_close_to_fp32(vlm):
    _, engine, _ = vlm
    config = EngineConfig.load(engine)
    pixels = [ImagePipeline.from_engine(engine, config, torch.float32, "cpu").processor.preprocess(IMAGES[1])]
    full = VisionEncoder.from_engine(engine, config, torch.float32).encode(pixels)[0]
    half = VisionEncoder.from_engine(engine, config, torch.bfloat16).encode(pixels)[0]
    assert half.dtype == torch.bfloat16 and relative_error(half, full) < 3e-2
