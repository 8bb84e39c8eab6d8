"""The 3B/8B/14B geometry classes, scaled down with the same ratios, against transformers; eos 11;
the released rope settings; the draft adapter in the shipped PEFT layout; the bench shapes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import NLD_ROPE, make_checkpoint, make_engine, relative_error, transformers_model
from nemodiff import LLM, SamplingParams
from nemodiff.bench.shapes import shape_config
from nemodiff.builder.checkpoint import CheckpointError
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Pattern, Segment

# hidden / 32 of the released models; 8 heads x 16 = 128 keeps each class's ratio of heads x head_dim to hidden
# (3B: 4096 / 3072, 8B: 4096 / 4096, 14B: 4096 / 5120) and of intermediate to hidden
GEOMETRIES = {
    "3b": dict(hidden_size=96, intermediate_size=288, rope_theta=1e6),
    "8b": dict(hidden_size=128, intermediate_size=448, rope_theta=1e6),
    "14b": dict(hidden_size=160, intermediate_size=512, rope_theta=1e9),
}
PROMPTS = [[1, 200, 201, 202, 203], [1] + list(range(130, 170))]


def family_checkpoint(path, name, **overrides):
    geometry = dict(GEOMETRIES[name])
    rope = NLD_ROPE | {"rope_theta": geometry.pop("rope_theta")}
    return make_checkpoint(path, **({"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
                                     "num_hidden_layers": 2, "max_position_embeddings": 262144, "rope": rope,
                                     "eos_token_id": 11, "seed": 7} | geometry | overrides))


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"nld-{request.param}")
    checkpoint = family_checkpoint(root / "ckpt", request.param)
    return request.param, checkpoint, make_engine(checkpoint, root / "engine", kv_page_size=8)


def test_projection_shapes_follow_heads_times_head_dim(family):
    name, checkpoint, engine = family
    hidden = GEOMETRIES[name]["hidden_size"]
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("encoder.layers.0.self_attn.q_proj.weight").get_shape() == [128, hidden]
        assert f.get_slice("encoder.layers.0.self_attn.o_proj.weight").get_shape() == [hidden, 128]
    weights = load_file(str(engine / "weights.safetensors"))
    assert weights["layers.1.qkv"].shape == (128 + 2 * 32, hidden) and weights["layers.1.o"].shape == (hidden, 128)


def test_causal_logits_match_transformers(family):
    _, checkpoint, engine = family
    model = load_engine(engine, device="cpu").model
    reference = transformers_model(checkpoint)
    for ids in PROMPTS:
        with torch.no_grad():
            want = reference(torch.tensor([ids])).logits[0]
        got = model.forward([Segment(0, ids, list(range(len(ids))), 0, Pattern.CAUSAL)])[0]
        assert relative_error(got, want) < 1e-5


def test_greedy_generation_matches_transformers(family):
    _, checkpoint, engine = family
    llm = LLM(engine, device="cpu")
    reference = transformers_model(checkpoint)
    outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            hf = reference.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert out.output_ids == hf[0, len(prompt):].tolist()


@pytest.mark.parametrize("eos", [11, [11, 2]])
def test_generation_stops_at_eos_11_like_transformers(eos, tmp_path):
    checkpoint = family_checkpoint(tmp_path / "ckpt", "14b", eos_token_id=eos)
    prompt = PROMPTS[1]
    free = LLM(make_engine(checkpoint, tmp_path / "free"), device="cpu").generate(
        prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))[0].output_ids
    weights = load_file(str(checkpoint / "model.safetensors"))
    # the head row of id 11 becomes a stronger copy of a token the model emits, so the model emits 11 instead
    weights["diffusion_head.weight"][11] = 1.5 * weights["diffusion_head.weight"][free[4]]
    save_file(weights, str(checkpoint / "model.safetensors"))
    llm = LLM(make_engine(checkpoint, tmp_path / "engine"), device="cpu")
    out = llm.generate(prompt, SamplingParams(max_new_tokens=12))[0]
    assert out.finish_reason == "eos" and out.output_ids[-1] == 11 and len(out.output_ids) <= 5
    with torch.no_grad():
        hf = transformers_model(checkpoint).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                                     pad_token_id=0)  # eos from the checkpoint's config
    assert out.output_ids == hf[0, len(prompt):].tolist()
    assert json.loads((tmp_path / "engine" / "config.json").read_text())["model"]["eos_token_ids"] == (
        [11] if eos == 11 else [11, 2])


def test_draft_adapter_in_the_shipped_peft_layout(tmp_path):
    checkpoint = family_checkpoint(tmp_path / "ckpt", "14b", lora_rank=128, lora_alpha=512)
    lora_dir = checkpoint / "linear_spec_lora"
    adapter = load_file(str(lora_dir / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_{ab}.weight"
                                     for i in range(2) for ab in "AB")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    a0 = adapter["base_model.model.encoder.layers.0.self_attn.o_proj.lora_A.weight"]
    b0 = adapter["base_model.model.encoder.layers.0.self_attn.o_proj.lora_B.weight"]
    assert a0.shape == (128, 128) and b0.shape == (160, 128)  # A [r, heads x head_dim], B [hidden, r]
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == (
        "LORA", 128, 512, ["o_proj"])

    bf16 = make_engine(checkpoint, tmp_path / "bf16", dtype="bf16")
    draft = load_file(str(bf16 / "draft_lora.safetensors"))
    assert draft["layers.0.lora_a"].dtype == torch.bfloat16 and torch.equal(draft["layers.0.lora_a"], a0.bfloat16())
    assert json.loads((bf16 / "config.json").read_text())["build"]["lora"] == {
        "rank": 128, "alpha": 512.0, "target_modules": ["o_proj"]}

    # a draft-adapter forward equals transformers with o_proj merged as PEFT defines it: W + (alpha / r) B A
    model = load_engine(make_engine(checkpoint, tmp_path / "fp32"), device="cpu").model
    reference = transformers_model(checkpoint)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            a = adapter[f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_A.weight"]
            b = adapter[f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_B.weight"]
            layer.self_attn.o_proj.weight += 4.0 * b @ a
        ids = PROMPTS[1]
        want = reference(torch.tensor([ids])).logits[0]
    got = model.forward([Segment(0, ids, list(range(len(ids))), 0, Pattern.CAUSAL, use_lora=True)])[0]
    assert relative_error(got, want) < 1e-5


def test_adapter_outside_the_peft_layout_is_refused(tmp_path):
    from nemodiff.builder.checkpoint import read_config, read_lora

    checkpoint = family_checkpoint(tmp_path / "ckpt", "3b", lora_rank=4)
    lora_dir = checkpoint / "linear_spec_lora"
    config = read_config(checkpoint)
    adapter = load_file(str(lora_dir / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.encoder.", "base_model.model.model."): v for k, v in adapter.items()}
    save_file(renamed, str(lora_dir / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'base_model.model.model.layers.0.self_attn.o_proj"
                                              ".lora_A.weight' \\(want base_model.model.encoder.layers.N"):
        read_lora(checkpoint, config)
    save_file(adapter, str(lora_dir / "adapter_model.safetensors"))
    peft = json.loads((lora_dir / "adapter_config.json").read_text())
    (lora_dir / "adapter_config.json").write_text(json.dumps(peft | {"use_rslora": True}))
    with pytest.raises(CheckpointError, match="adapter_config.json: use_rslora=true is not supported"):
        read_lora(checkpoint, config)


@pytest.mark.parametrize("name, hidden, layers, theta", [("nld-3b", 3072, 26, 1e6), ("nld-8b", 4096, 34, 1e6),
                                                         ("nld-14b", 5120, 40, 1e9)])
def test_bench_shapes_are_the_released_configs(name, hidden, layers, theta):
    config = shape_config(name)
    assert (config.hidden_size, config.num_hidden_layers, config.rope.rope_theta) == (hidden, layers, theta)
    assert (config.vocab_size, config.eos_token_ids, config.mask_token_id, config.bos_token_id) == (131072, [11], 100, 1)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    rope = config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings, rope.llama_4_scaling_beta) == (
        "yarn", 16.0, 16384, 0.1)
    assert config.max_position_embeddings == 262144 and config.block_size == 32
