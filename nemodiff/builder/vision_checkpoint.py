"""The vision side of an NLD VLM checkpoint: its config, its tensor names and the weight layouts.

[checkpoint: read here] ──builder──▶ engine dir ──runtime──▶ Triton

A VLM checkpoint (`NemotronLabsDiffusionVLMModel`) keeps the text settings at the config
root and adds a Pixtral `vision_config` plus the Mistral3 projector settings. Its tensors
are named in one of two layouts (`WEIGHT_LAYOUTS`); both are mapped onto one set of
canonical names: `encoder.*` and `diffusion_head.weight` for the text model,
`vision_tower.*` for the tower and `multi_modal_projector.*` for the projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nemodiff.engine_format import CLIP_MEAN, CLIP_STD, VISION_LIMITS, ModelConfig, VisionConfig

from .checkpoint_files import CheckpointError, checkpoint_file, get_float, get_int, load_json

VLM_ARCHITECTURE = "NemotronLabsDiffusionVLMModel"
VLM_MODEL_TYPE = "nemotron_labs_diffusion_vlm"
PREPROCESSOR_FILE = "preprocessor_config.json"
ACTIVATIONS = ("silu", "gelu")
VISION_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")


class VisionConfigError(Exception):
    """A VLM setting is missing or unsupported; the caller adds the file name."""


@dataclass(frozen=True)
class WeightLayout:
    """How stored tensor names map onto canonical names: (stored prefix, canonical prefix), first match wins."""

    name: str
    rules: tuple[tuple[str, str], ...]

    def canonical(self, stored: str) -> str | None:
        for prefix, target in self.rules:
            if stored.startswith(prefix):
                return target + stored[len(prefix):]
        return None

    def stored(self, canonical: str) -> str:
        """The name a canonical tensor would have in this layout (the first rule that fits)."""
        for prefix, target in self.rules:
            if canonical.startswith(target):
                return prefix + canonical[len(target):]
        return canonical

    def describe(self) -> str:
        return ", ".join(prefix + "*" for prefix, _ in self.rules)


TEXT_LAYOUT = WeightLayout("text", (("encoder.", "encoder."), ("diffusion_head.", "diffusion_head.")))
WEIGHT_LAYOUTS = {
    # vision tower and projector inside the encoder, next to its layers
    "encoder": WeightLayout("encoder", (
        ("encoder.vision_tower.", "vision_tower."), ("encoder.multi_modal_projector.", "multi_modal_projector."),
        ("encoder.", "encoder."), ("diffusion_head.", "diffusion_head."),
    )),
    # three top-level modules; the text model keeps its NLD names, or transformers' (model.*, lm_head)
    "language_model": WeightLayout("language_model", (
        ("vision_tower.", "vision_tower."), ("multi_modal_projector.", "multi_modal_projector."),
        ("language_model.encoder.", "encoder."), ("language_model.diffusion_head.", "diffusion_head."),
        ("language_model.model.", "encoder."), ("language_model.lm_head.", "diffusion_head."),
    )),
}


def detect_layout(stored_names) -> WeightLayout:
    if any(name.startswith("language_model.") for name in stored_names):
        return WEIGHT_LAYOUTS["language_model"]
    return WEIGHT_LAYOUTS["encoder"]


def _token_id_from_tokenizer(checkpoint_dir: Path, token: str) -> int | None:
    if not checkpoint_file(checkpoint_dir, "tokenizer.json").is_file():
        return None
    try:
        data = load_json(checkpoint_dir, "tokenizer.json")
    except CheckpointError as exc:
        if "over the limit" in str(exc):
            raise
        return None  # the build reads the tokenizer itself later, and says what is wrong with it
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == token and isinstance(added.get("id"), int):
            return added["id"]
    vocab = data.get("model") if isinstance(data.get("model"), dict) else {}
    vocab = vocab.get("vocab")
    found = vocab.get(token) if isinstance(vocab, dict) else None
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def _special_id(raw: dict, checkpoint_dir: Path, keys: tuple[str, ...], token: str) -> int:
    for key in keys:
        if raw.get(key) is not None:
            return get_int(raw, key, "config.json", low=0)
    found = _token_id_from_tokenizer(checkpoint_dir, token)
    if found is None:
        raise VisionConfigError(f"no {keys[0]} in the config and no {token!r} token in tokenizer.json")
    return found


def _preprocessing(checkpoint_dir: Path, patch_size: int, default_edge: int) -> dict:
    """Image preprocessing settings from preprocessor_config.json, else Pixtral's defaults."""
    path = checkpoint_file(checkpoint_dir, PREPROCESSOR_FILE)
    raw = load_json(checkpoint_dir, PREPROCESSOR_FILE) if path.is_file() else {}
    size = raw.get("size") or {}
    longest = size.get("longest_edge", default_edge) if isinstance(size, dict) else default_edge
    longest = get_int({"longest_edge": longest}, "longest_edge", path, high=VISION_LIMITS["longest_edge"],
                      name="size.longest_edge")
    patch = raw.get("patch_size", patch_size)
    patch = (patch.get("height"), patch.get("width")) if isinstance(patch, dict) else (patch, patch)
    if patch != (patch_size, patch_size):
        raise VisionConfigError(f"{PREPROCESSOR_FILE}: patch_size {patch!r:.60} differs from the vision tower's "
                                f"{patch_size}")
    mean, std = raw.get("image_mean", CLIP_MEAN), raw.get("image_std", CLIP_STD)
    values = [get_float({"v": v}, "v", path, name="image_mean/image_std")
              for v in list(mean if isinstance(mean, (list, tuple)) else [None])
              + list(std if isinstance(std, (list, tuple)) else [None])]
    if len(values) != 6 or len(mean) != 3 or min(values[3:]) <= 0:
        raise VisionConfigError(f"{PREPROCESSOR_FILE}: image_mean and image_std want three values (RGB), std positive")
    return dict(longest_edge=longest, image_mean=tuple(values[:3]), image_std=tuple(values[3:]),
                rescale_factor=get_float(raw, "rescale_factor", path, default=1 / 255, positive=True))


def read_vision_config(raw: dict, checkpoint_dir: Path, text: ModelConfig) -> VisionConfig:
    """The VisionConfig of a VLM config.json (raw), validated."""
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise VisionConfigError("a VLM config needs a 'vision_config' object")
    if vision.get("model_type", "pixtral") != "pixtral":
        raise VisionConfigError(f"vision_config.model_type {vision['model_type']!r} is not supported (want 'pixtral')")
    missing = [key for key in VISION_REQUIRED_KEYS if key not in vision]
    if missing:
        raise VisionConfigError(f"vision_config is missing {missing}")
    sizes = {key: get_int(vision, key, "config.json", high=VISION_LIMITS[key], name=f"vision_config.{key}")
             for key in VISION_REQUIRED_KEYS}
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if hidden % heads or vision.get("head_dim", hidden // heads) != hidden // heads:
        raise VisionConfigError(f"vision_config: head_dim must be hidden_size / num_attention_heads ({hidden}/{heads})")
    if (hidden // heads) % 4:
        raise VisionConfigError("vision_config: the 2-D rotary embedding needs a head_dim divisible by 4")
    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise VisionConfigError("vision_config.rope_parameters: an object is expected")
    act, projector_act = vision.get("hidden_act", "gelu"), raw.get("projector_hidden_act", "gelu")
    for key, value in (("vision_config.hidden_act", act), ("projector_hidden_act", projector_act)):
        if value not in ACTIVATIONS:
            raise VisionConfigError(f"{key} {value!r} is not supported (want one of {', '.join(ACTIVATIONS)})")
    if raw.get("multimodal_projector_bias"):
        raise VisionConfigError("multimodal_projector_bias=true is not supported (the NLD projector has no bias)")
    feature_layer = raw.get("vision_feature_layer", -1)
    layers = sizes["num_hidden_layers"]
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int) or not -(layers + 1) <= feature_layer <= layers:
        raise VisionConfigError(f"vision_feature_layer {feature_layer!r} must be one layer index in [-{layers + 1}, {layers}]")
    patch = sizes["patch_size"]
    image_size = vision.get("image_size", 1024)
    if isinstance(image_size, (list, tuple)) and image_size:
        image_size = max(image_size) if all(isinstance(v, int) for v in image_size) else None
    image_size = get_int({"image_size": image_size}, "image_size", "config.json", high=VISION_LIMITS["longest_edge"],
                         name="vision_config.image_size")
    channels = get_int(vision, "num_channels", "config.json", default=3, low=3, high=3, name="vision_config.num_channels")
    theta = get_float(rope, "rope_theta", "config.json", default=None, positive=True, name="vision_config.rope_theta")
    return VisionConfig(
        hidden_size=hidden, intermediate_size=sizes["intermediate_size"], num_hidden_layers=layers,
        num_attention_heads=heads, patch_size=patch, text_hidden_size=text.hidden_size, num_channels=channels,
        rope_theta=theta or get_float(vision, "rope_theta", "config.json", default=10000.0, positive=True,
                                      name="vision_config.rope_theta"),
        hidden_act=act, projector_norm_eps=text.rms_norm_eps, projector_hidden_act=projector_act,
        spatial_merge_size=get_int(raw, "spatial_merge_size", "config.json", default=2,
                                   high=VISION_LIMITS["spatial_merge_size"]), feature_layer=feature_layer,
        image_token_id=_special_id(raw, checkpoint_dir, ("image_token_id", "image_token_index"), "[IMG]"),
        image_break_token_id=_special_id(raw, checkpoint_dir, ("image_break_token_id",), "[IMG_BREAK]"),
        image_end_token_id=_special_id(raw, checkpoint_dir, ("image_end_token_id",), "[IMG_END]"),
        **_preprocessing(checkpoint_dir, patch, image_size),
    )


def vision_expected_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes of the Pixtral tower and the Mistral3 projector."""
    h, i, p, merge = vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.spatial_merge_size
    shapes = {"vision_tower.patch_conv.weight": (h, vision.num_channels, p, p), "vision_tower.ln_pre.weight": (h,)}
    for layer in range(vision.num_hidden_layers):
        prefix = f"vision_tower.transformer.layers.{layer}."
        shapes |= {prefix + "attention_norm.weight": (h,), prefix + "ffn_norm.weight": (h,)}
        shapes |= {prefix + f"attention.{name}_proj.weight": (h, h) for name in "qkvo"}
        shapes |= {prefix + "feed_forward.gate_proj.weight": (i, h), prefix + "feed_forward.up_proj.weight": (i, h),
                   prefix + "feed_forward.down_proj.weight": (h, i)}
    text = vision.text_hidden_size
    return shapes | {
        "multi_modal_projector.norm.weight": (h,),
        "multi_modal_projector.patch_merger.merging_layer.weight": (h, h * merge * merge),
        "multi_modal_projector.linear_1.weight": (text, h),
        "multi_modal_projector.linear_2.weight": (text, text),
    }
