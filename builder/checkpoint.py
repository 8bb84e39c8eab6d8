"""Reading and validating a Hugging Face NLD checkpoint: the builder's input.

[checkpoint: read here] ──builder──▶ engine dir ──runtime──▶ Triton

Every problem is a `CheckpointError` whose message names the file and what is wrong,
so `nemodiff-build` can print it without a traceback. Text checkpoints and VLM checkpoints
(see `vision_checkpoint`) are read here; tensors are addressed by their canonical names.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from nemodiff.engine_format import LoraConfig, ModelConfig, RopeConfig, VisionConfig

from .vision_checkpoint import (
    TEXT_LAYOUT,
    VLM_ARCHITECTURE,
    VLM_MODEL_TYPE,
    VisionConfigError,
    WeightLayout,
    detect_layout,
    read_vision_config,
    vision_expected_shapes,
)

ARCHITECTURE = "NemotronLabsDiffusionModel"
MODEL_TYPE = "nemotron_labs_diffusion"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
)


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or inconsistent. The message names the file."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weight_files: dict[str, Path]  # canonical tensor name -> file holding it
    vision: VisionConfig | None = None  # VLM checkpoints only
    stored_names: dict[str, str] | None = None  # canonical -> name in the file, where they differ
    layout: WeightLayout = TEXT_LAYOUT

    def stored_name(self, name: str) -> str:
        return (self.stored_names or {}).get(name, name)

    def read(self, name: str) -> torch.Tensor:
        file, stored = self.weight_files[name], self.stored_name(name)
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(stored)
        except Exception as exc:  # safetensors raises several exception types
            raise CheckpointError(f"{file}: cannot read tensor {stored!r}: {exc}") from None


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _rope_config(raw: dict, path: Path) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported (want 'yarn' or 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta", 1e6))
    original = params.get("original_max_position_embeddings", raw["max_position_embeddings"])
    return RopeConfig(
        rope_type=rope_type,
        rope_theta=float(theta),
        factor=float(params.get("factor", 1.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        original_max_position_embeddings=int(original),
        llama_4_scaling_beta=float(params.get("llama_4_scaling_beta") or 0.0),
    )


def is_vlm(raw: dict) -> bool:
    return VLM_ARCHITECTURE in (raw.get("architectures") or [])


def read_config(checkpoint_dir: Path) -> ModelConfig:
    """The text model's config (for a VLM, the text settings at the config root)."""
    path = Path(checkpoint_dir) / "config.json"
    raw = _load_json(path)
    architectures = raw.get("architectures") or []
    if ARCHITECTURE not in architectures and VLM_ARCHITECTURE not in architectures:
        raise CheckpointError(
            f"{path}: architectures is {architectures!r}, expected [{ARCHITECTURE!r}] or [{VLM_ARCHITECTURE!r}] "
            "(not a Nemotron-Labs-Diffusion checkpoint)"
        )
    model_type = VLM_MODEL_TYPE if is_vlm(raw) else MODEL_TYPE
    if raw.get("model_type") != model_type:
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected {model_type!r}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing required keys {missing}")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (want 'silu')")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention_bias/mlp_bias are not supported by this architecture")
    if raw.get("tie_word_embeddings"):
        raise CheckpointError(f"{path}: tie_word_embeddings=true, but NLD checkpoints ship diffusion_head")
    eos = raw.get("eos_token_id")
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    heads = int(raw["num_attention_heads"])
    config = ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw["num_key_value_heads"]),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
        rms_norm_eps=float(raw["rms_norm_eps"]),
        max_position_embeddings=int(raw["max_position_embeddings"]),
        block_size=int(raw.get("block_size", 32)),
        mask_token_id=int(raw.get("mask_token_id", 100)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        rope=_rope_config(raw, path),
    )
    if is_vlm(raw):
        config.image_token_id = _vision_config(raw, Path(checkpoint_dir), config).image_token_id
    if config.num_attention_heads % config.num_key_value_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
            f"({config.num_key_value_heads})"
        )
    if not 0 <= config.mask_token_id < config.vocab_size:
        raise CheckpointError(f"{path}: mask_token_id {config.mask_token_id} is outside the vocabulary")
    return config


def _vision_config(raw: dict, checkpoint_dir: Path, config: ModelConfig) -> VisionConfig:
    try:
        vision = read_vision_config(raw, checkpoint_dir, config)
    except VisionConfigError as exc:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: {exc}") from None
    if not 0 <= vision.image_token_id < config.vocab_size:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: image token id {vision.image_token_id} is outside "
                              "the vocabulary")
    return vision


def read_vlm_config(checkpoint_dir: Path) -> VisionConfig | None:
    """The vision settings of a VLM checkpoint; None for a text checkpoint."""
    raw = _load_json(Path(checkpoint_dir) / "config.json")
    return _vision_config(raw, Path(checkpoint_dir), read_config(checkpoint_dir)) if is_vlm(raw) else None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes = {"encoder.embed_tokens.weight": (v, h), "encoder.norm.weight": (h,), "diffusion_head.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        p = f"encoder.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map'")
        files = []
        for name in sorted(set(weight_map.values())):
            shard = checkpoint_dir / name
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            files.append(shard)
        return files
    single = checkpoint_dir / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return [single]


def _tensor_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    index = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    index[name] = (file, tuple(f.get_slice(name).get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
    return index


def _canonical_index(stored: dict[str, tuple[Path, tuple[int, ...]]], layout: WeightLayout,
                     vlm: bool) -> tuple[dict[str, tuple[Path, tuple[int, ...]]], dict[str, str]]:
    """Renames the stored tensors to canonical names; a name outside the layout is an error."""
    found, renamed = {}, {}
    for name, (file, shape) in stored.items():
        canonical = layout.canonical(name)
        if canonical is None:
            hint = f" (this VLM checkpoint's names follow the layout {layout.describe()})" if vlm else ""
            raise CheckpointError(f"{file}: unexpected tensor {name!r}{hint}")
        if canonical in found:
            raise CheckpointError(f"{file}: tensors {renamed.get(canonical, canonical)!r} and {name!r} are the same "
                                  f"weight ({canonical!r}) under two names")
        found[canonical] = (file, shape)
        if canonical != name:
            renamed[canonical] = name
    return found, renamed


def open_checkpoint(checkpoint_dir: Path) -> Checkpoint:
    """Validate config, tensor names and shapes; returns a lazy reader for the tensors."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a directory")
    config = read_config(checkpoint_dir)
    vision = read_vlm_config(checkpoint_dir)
    stored = _tensor_index(_weight_files(checkpoint_dir))
    layout = detect_layout(stored) if vision else TEXT_LAYOUT
    found, renamed = _canonical_index(stored, layout, vlm=vision is not None)
    want = expected_shapes(config) | (vision_expected_shapes(vision) if vision else {})
    missing = [name for name in want if name not in found]
    if missing:
        file = found and next(iter(found.values()))[0].name or SINGLE_FILE
        raise CheckpointError(
            f"{checkpoint_dir}: missing tensor {layout.stored(missing[0])!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" in the weights ({file})"
        )
    unexpected = [name for name in found if name not in want]
    if unexpected:
        file = found[unexpected[0]][0]
        raise CheckpointError(f"{file}: unexpected tensor {renamed.get(unexpected[0], unexpected[0])!r}")
    for name, shape in want.items():
        file, got = found[name]
        if got != shape:
            raise CheckpointError(f"{file}: tensor {renamed.get(name, name)!r} has shape {list(got)}, want {list(shape)}")
    return Checkpoint(checkpoint_dir, config, {name: found[name][0] for name in want}, vision=vision,
                      stored_names=renamed, layout=layout)


def check_finite(name: str, tensor: torch.Tensor, file: Path) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise CheckpointError(f"{file}: tensor {name!r} has {bad} non-finite values (NaN or Inf)")


LORA_TENSOR = re.compile(r"base_model\.model\.encoder\.layers\.(\d+)\.self_attn\.o_proj\.lora_([AB])\.weight")
LORA_TENSOR_FORM = "base_model.model.encoder.layers.N.self_attn.o_proj.lora_{A,B}.weight"


def _lora_config(path: Path) -> LoraConfig:
    """adapter_config.json as PEFT writes it; options that change the math are refused, not ignored."""
    raw = _load_json(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw['peft_type']!r} is not supported (want 'LORA')")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if sorted(targets) != ["o_proj"]:
        raise CheckpointError(f"{path}: target_modules {targets!r} not supported (want ['o_proj'])")
    if "r" not in raw:
        raise CheckpointError(f"{path}: missing 'r'")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if raw.get(key):
            raise CheckpointError(f"{path}: {key}=true is not supported")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias {raw['bias']!r} is not supported (want 'none')")
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])), target_modules=targets)


def read_lora(checkpoint_dir: Path, config: ModelConfig) -> tuple[LoraConfig, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None:
    """Read `linear_spec_lora/` (PEFT format) if present: per layer (A [r, in], B [out, r]) as stored."""
    lora_dir = Path(checkpoint_dir) / LORA_DIR
    if not lora_dir.is_dir():
        return None
    lora = _lora_config(lora_dir / LORA_CONFIG)
    weights_file = lora_dir / LORA_WEIGHTS
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file}: file not found")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for name in f.keys():
                match = LORA_TENSOR.fullmatch(name)
                if match is None or int(match[1]) >= config.num_hidden_layers:
                    raise CheckpointError(f"{weights_file}: unexpected tensor {name!r} (want {LORA_TENSOR_FORM}, "
                                          f"N < {config.num_hidden_layers})")
                layers.setdefault(int(match[1]), {})[match[2]] = f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{weights_file}: unreadable safetensors file ({exc})") from None
    q_out = config.num_attention_heads * config.head_dim
    result = {}
    for layer in range(config.num_hidden_layers):
        pair = layers.get(layer, {})
        if "A" not in pair or "B" not in pair:
            raise CheckpointError(f"{weights_file}: missing lora_A/lora_B for layer {layer}")
        for key, want in (("A", (lora.rank, q_out)), ("B", (config.hidden_size, lora.rank))):
            if tuple(pair[key].shape) != want:
                raise CheckpointError(
                    f"{weights_file}: layer {layer} lora_{key} has shape {list(pair[key].shape)}, want {list(want)}"
                )
            if not pair[key].is_floating_point():
                raise CheckpointError(f"{weights_file}: layer {layer} lora_{key} is {pair[key].dtype}, not a float")
            check_finite(f"layers.{layer}.lora_{key}", pair[key], weights_file)
        result[layer] = (pair["A"], pair["B"])
    return lora, result


def num_parameters(config: ModelConfig, vision: VisionConfig | None = None) -> int:
    shapes = expected_shapes(config) | (vision_expected_shapes(vision) if vision else {})
    return sum(math.prod(shape) for shape in shapes.values())
