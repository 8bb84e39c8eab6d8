"""Shared test helpers: tiny checkpoints, engines and the transformers oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemodiff.builder.build import BuildOptions, build_engine
from nemodiff.builder.random_checkpoint import write_random_checkpoint


def make_checkpoint(path: Path, **overrides) -> Path:
    return write_random_checkpoint(path, **overrides)


def make_engine(checkpoint: Path, out: Path, **options) -> Path:
    build_engine(checkpoint, out, BuildOptions(**({"dtype": "fp32"} | options)))
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
