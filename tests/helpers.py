"""Shared test helpers: tiny checkpoints, engines and the transformers oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemodiff.builder.build import BuildOptions, build_engine
from nemodiff.builder.random_checkpoint import write_random_checkpoint


def make_checkpoint(path: Path, **overrides) -> Path:
    return write_random_checkpoint(path, **overrides)


def make_engine(checkpoint: Path, out: Path, **options) -> Path:
    """fp32 engine; CUDA kernels are compiled only when a test asks for them (kernels=True)."""
    build_engine(checkpoint, out, BuildOptions(**({"dtype": "fp32", "kernels": False} | options)))
    return out


def read_hf_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        weights |= load_file(str(checkpoint / name))
    return weights


def transformers_model(checkpoint: Path):
    """The independent oracle: transformers' Ministral3ForCausalLM on the renamed weights."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    raw = json.loads((checkpoint / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "tie_word_embeddings")
    config = Ministral3Config(**{k: raw[k] for k in keep if k in raw}, rope_parameters=dict(raw["rope_parameters"]),
                              attn_implementation="eager")
    model = Ministral3ForCausalLM(config).eval().float()
    renamed = {}
    for name, tensor in read_hf_weights(checkpoint).items():
        name = name.replace("encoder.", "model.", 1) if name.startswith("encoder.") else name
        renamed[name.replace("diffusion_head.", "lm_head.")] = tensor.float()
    model.load_state_dict(renamed, strict=True)
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def make_sticky_checkpoint(path: Path, seed: int = 0, lora_rank: int = 8) -> Path:
    """A checkpoint whose drafts often match the verifier, so speculation accepts blocks of
    varied length (random weights alone almost never accept a draft).

    The residual stream carries the token embedding and the head reads it back, so the
    model tends to repeat tokens; MASK embeds to zero and attention copies the average of
    the visible values into it, so a masked slot predicts what dominates its context.
    """
    ckpt = make_checkpoint(path, seed=seed, lora_rank=lora_rank)
    weights = load_file(str(ckpt / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed + 7)
    hidden = weights["encoder.norm.weight"].shape[0]
    kv_out = weights["encoder.layers.0.self_attn.v_proj.weight"].shape[0]
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0]
    embed = torch.randn(weights["encoder.embed_tokens.weight"].shape, generator=gen)
    embed[100] = 0.0
    weights["encoder.embed_tokens.weight"] = embed
    weights["diffusion_head.weight"] = embed * 3.0
    head_dim = kv_out // 2
    o_proj = torch.zeros(hidden, 2 * kv_out)
    for h in range(4):  # four query heads over two KV heads
        o_proj[:, h * head_dim:(h + 1) * head_dim] = 0.5 * basis[:, (h // 2) * head_dim:(h // 2 + 1) * head_dim]
    layer = 0
    while f"encoder.layers.{layer}.self_attn.v_proj.weight" in weights:
        p = f"encoder.layers.{layer}."
        weights[p + "self_attn.v_proj.weight"] = basis[:, :kv_out].T.clone()
        weights[p + "self_attn.o_proj.weight"] = o_proj.clone()
        weights[p + "mlp.down_proj.weight"] = weights[p + "mlp.down_proj.weight"] * 0.3
        layer += 1
    save_file(weights, str(ckpt / "model.safetensors"))
    return ckpt


def transformers_vlm(checkpoint: Path):
    """The VLM oracle: transformers' Mistral3ForConditionalGeneration (Pixtral tower, Mistral3 projector,
    Ministral3 text model) on the renamed weights of an NLD VLM checkpoint (either layout)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from nemodiff.builder.vision_checkpoint import detect_layout

    raw = json.loads((checkpoint / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id")
    text = {k: raw[k] for k in keep if k in raw} | {"model_type": "ministral3", "tie_word_embeddings": False,
                                                     "rope_parameters": dict(raw["rope_parameters"])}
    vision = {k: v for k, v in raw["vision_config"].items() if k != "head_dim"}
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=raw["image_token_id"],
                            spatial_merge_size=raw["spatial_merge_size"],
                            projector_hidden_act=raw["projector_hidden_act"], multimodal_projector_bias=False,
                            vision_feature_layer=raw["vision_feature_layer"], tie_word_embeddings=False)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Mistral3ForConditionalGeneration(config).eval().float()
    stored = read_hf_weights(checkpoint)
    layout = detect_layout(stored)
    renamed = {}
    for name, tensor in stored.items():
        name = layout.canonical(name)
        for old, new in (("encoder.", "model.language_model."), ("diffusion_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(old):
                renamed[new + name[len(old):]] = tensor.float()
                break
    model.load_state_dict(renamed, strict=True)
    return model


# The released rope parameters (YaRN factor 16 over 16384 original positions).
NLD_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 16384,
            "llama_4_scaling_beta": 0.1}


def make_vlm_checkpoint(path: Path, layout: str = "encoder", **overrides) -> Path:
    """A small random NLD VLM checkpoint: patch 4, merge 2 (one image token per 8x8 pixels), images up to 64 px."""
    from nemodiff.builder.random_checkpoint import RandomVisionSpec

    return write_random_checkpoint(path, **({"vision": RandomVisionSpec(layout=layout), "rope": dict(NLD_ROPE),
                                             "max_position_embeddings": 262144,
                                             "eos_token_id": 11, "seed": 5} | overrides))


def png_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A random-noise image, PNG-encoded."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def transformers_pixels(images: list[bytes], longest_edge: int, token_pixels: int):
    """pixel_values and image_sizes from transformers' own Pixtral image processor (PIL backend), with the
    merged patch size the Pixtral/Mistral3 processor passes to it."""
    import io

    from PIL import Image
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                         patch_size={"height": token_pixels, "width": token_pixels})
    out = processor([Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")
    return out["pixel_values"], out["image_sizes"]


def edit_config(ckpt: Path, **changes) -> None:
    """Change keys of a checkpoint's config.json in place (malformed-checkpoint tests)."""
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def edit_weights(ckpt: Path, fn) -> None:
    """Let fn edit a single-file checkpoint's tensors in place."""
    weights = load_file(str(ckpt / "model.safetensors"))
    fn(weights)
    save_file(weights, str(ckpt / "model.safetensors"))


def penalized_greedy(model, prompt_ids: list[int], count: int, repetition: float = 1.0, frequency: float = 0.0,
                     presence: float = 0.0) -> list[int]:
    """The oracle of penalised greedy decoding: transformers' logits of the whole sequence at every step, with
    vLLM's penalty rules applied here (repetition: tokens of the prompt and output, positive logits divided,
    negative multiplied; frequency: times the count in the output; presence: once per token in the output)."""
    from collections import Counter

    output: list[int] = []
    for _ in range(count):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + output])).logits[0, -1].float()
        for token in set(prompt_ids) | set(output):
            logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token, times in Counter(output).items():
            logits[token] -= frequency * times + presence
        output.append(int(logits.argmax()))
    return output


def rotating_auto(llm):
    """Make `llm`'s auto requests change mode at every boundary (ar, linear-spec, quadratic-spec, ar, ...);
    returns the engine's own policy, to put back."""
    from nemodiff.runtime.engine.auto import AutoPolicy
    from nemodiff.runtime.request import AUTO_MODES

    class Rotating(AutoPolicy):
        def assign(self, running: list) -> None:
            for sequence in running:
                if sequence.auto is not None and sequence.strategy.boundary():
                    mode = sequence.strategy.mode
                    self.switch(sequence, AUTO_MODES[(AUTO_MODES.index(mode) + 1) % len(AUTO_MODES)])

    kept, llm.engine.auto = llm.engine.auto, Rotating(llm.engine.ctx)
    return kept


def record_splits(model) -> list[int]:
    """Spies on `model`'s attention metadata: the list fills with each forward's split-KV count."""
    seen, attention = [], model.meta.attention

    def spy(batch, cache, num_splits=None, **kwargs):
        meta = attention(batch, cache, num_splits, **kwargs)
        seen.append(meta.num_splits)
        return meta
    model.meta.attention = spy
    return seen
