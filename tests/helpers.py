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
