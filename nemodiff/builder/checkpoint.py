"""Reading and validating a Hugging Face NLD checkpoint: the builder's input.

[checkpoint: read here] ──builder──▶ engine dir ──runtime──▶ Triton

Every problem is a `CheckpointError` whose message names the file and what is wrong,
so `nemodiff-build` can print it without a traceback. Text checkpoints and VLM checkpoints
(see `vision_checkpoint`) are read here; tensors are addressed by their canonical names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from nemodiff.engine_format import LORA_MAX_RANK, LoraConfig, ModelConfig, VisionConfig

from .checkpoint_config import (  # noqa: F401 (re-exported: the checkpoint's names in one place)
    ARCHITECTURE,
    CONFIG_FILE,
    MODEL_TYPE,
    REQUIRED_KEYS,
    is_vlm,
    read_config,
    read_vlm_config,
)
from .checkpoint_files import CheckpointError, checkpoint_file, get_float, get_int, load_json
from .vision_checkpoint import (
    TEXT_LAYOUT,
    WeightLayout,
    detect_layout,
    vision_expected_shapes,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
LAYER_TENSOR = re.compile(r"encoder\.layers\.(\d+)\.")


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


def _weight_files(root: Path) -> dict[Path, set[str] | None]:
    """The weight files, each with the tensor names the index puts there (None: no index)."""
    index = checkpoint_file(root, INDEX_FILE)
    if index.is_file():
        weight_map = load_json(root, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map'")
        files: dict[Path, set[str]] = {}
        for tensor, name in weight_map.items():
            shard = checkpoint_file(root, name, source=index)
            files.setdefault(shard, set()).add(tensor)
        for shard in files:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        return files
    single = checkpoint_file(root, SINGLE_FILE)
    if not single.is_file():
        raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return {single: None}


def _tensor_index(files: dict[Path, set[str] | None]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    index = {}
    for file, listed in files.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    if name in index:
                        raise CheckpointError(f"{file}: tensor {name!r} is also in {index[name][0].name}")
                    index[name] = (file, tuple(f.get_slice(name).get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({str(exc)[:200]})") from None
        if listed is not None and not listed <= set(names):
            raise CheckpointError(f"{file}: has no tensor {min(listed - set(names))!r}, which {INDEX_FILE} "
                                  "places there")
    return index


def _check_layer_count(config: ModelConfig, stored: dict, layout: WeightLayout, root: Path) -> None:
    """config.json's layer count against the layers the weights hold, before any per-layer table is made."""
    layers = {int(m[1]) for name in stored if (m := LAYER_TENSOR.match(layout.canonical(name) or ""))}
    held = max(layers) + 1 if layers else 0
    if held != config.num_hidden_layers:
        raise CheckpointError(f"{root / CONFIG_FILE}: num_hidden_layers is {config.num_hidden_layers}, but the weights "
                              f"hold {held} layers (encoder.layers.0 to {held - 1})")


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
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a directory")
    checkpoint_dir = Path(checkpoint_dir).resolve()
    config = read_config(checkpoint_dir)
    vision = read_vlm_config(checkpoint_dir)
    stored = _tensor_index(_weight_files(checkpoint_dir))
    layout = detect_layout(stored) if vision else TEXT_LAYOUT
    _check_layer_count(config, stored, layout, checkpoint_dir)
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
    raw = load_json(path.parent, path.name)
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw['peft_type']!r} is not supported (want 'LORA')")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or targets != ["o_proj"]:
        raise CheckpointError(f"{path}: target_modules {targets!r} not supported (want ['o_proj'])")
    rank = get_int(raw, "r", path, high=LORA_MAX_RANK)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if raw.get(key):
            raise CheckpointError(f"{path}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if raw.get(key):  # per-layer ranks or scales, extra full weights, a subset of layers: other math
            raise CheckpointError(f"{path}: {key} {raw[key]!r:.60} is not supported (want it empty)")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias {raw['bias']!r:.40} is not supported (want 'none')")
    return LoraConfig(rank=rank, alpha=get_float(raw, "lora_alpha", path, default=float(rank)), target_modules=targets)


def read_lora(checkpoint_dir: Path, config: ModelConfig) -> tuple[LoraConfig, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None:
    """Read `linear_spec_lora/` (PEFT format) if present: per layer (A [r, in], B [out, r]) as stored."""
    root = Path(checkpoint_dir).resolve()
    lora_dir = checkpoint_file(root, LORA_DIR)
    if not lora_dir.is_dir():
        return None
    lora = _lora_config(checkpoint_file(root, f"{LORA_DIR}/{LORA_CONFIG}"))
    weights_file = checkpoint_file(root, f"{LORA_DIR}/{LORA_WEIGHTS}")
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
