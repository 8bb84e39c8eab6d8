"""A checkpoint's config.json: read, typed, and refused where it asks for math the runtime does not do.

[checkpoint: read here] ──builder──▶ engine dir ──runtime──▶ Triton

The backbone is transformers' Ministral3 (docs/design.md §2). A key that changes its math is either
computed by the runtime or refused by name (`MATH_KEYS`), never dropped in silence; keys this
reader does not know are tolerated. Sizes are checked against the engine format's limits
(engine_format.MODEL_LIMITS) before anything is sized from them.
"""

from __future__ import annotations

from pathlib import Path

from nemodiff.engine_format import (
    MODEL_LIMITS,
    ROPE_TYPES,
    EngineFormatError,
    ModelConfig,
    RopeConfig,
    VisionConfig,
    check_model_config,
)

from .checkpoint_files import CheckpointError, get_float, get_int, load_json
from .vision_checkpoint import VLM_ARCHITECTURE, VLM_MODEL_TYPE, VisionConfigError, read_vision_config

ARCHITECTURE = "NemotronLabsDiffusionModel"
MODEL_TYPE = "nemotron_labs_diffusion"
CONFIG_FILE = "config.json"
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
)
# rope_parameters keys the runtime computes (nemodiff/runtime/model/rope.py); others are tolerated, except these
ROPE_REFUSED = {"partial_rotary_factor": (None, 1, 1.0)}


def _full_attention(value, raw) -> bool:
    return value is None or (isinstance(value, list) and all(v == "full_attention" for v in value))


def _no_window(value, raw) -> bool:  # a window no sequence can outgrow changes nothing
    limit = raw.get("max_position_embeddings")
    return value is None or (isinstance(value, int) and isinstance(limit, int) and value >= limit)


# key -> (does the value mean what the runtime computes?, what the runtime computes)
MATH_KEYS = {
    "sliding_window": (_no_window, "null: the runtime attends to the whole context, no sliding window"),
    "layer_types": (_full_attention, "every layer 'full_attention'"),
    "attention_bias": (lambda v, raw: v in (None, False), "false: q/k/v/o have no bias"),
    "mlp_bias": (lambda v, raw: v in (None, False), "false: gate/up/down have no bias"),
    "tie_word_embeddings": (lambda v, raw: v in (None, False),
                            "false: the head (diffusion_head) is its own weight, not the embedding"),
    "hidden_act": (lambda v, raw: v in (None, "silu", "swish"), "'silu'"),
    "quantization_config": (lambda v, raw: v is None, "absent: the weights are plain floating point"),
    "attn_logit_softcapping": (lambda v, raw: v is None, "null: no attention soft-capping"),
    "final_logit_softcapping": (lambda v, raw: v is None, "null: no logit soft-capping"),
    "use_qk_norm": (lambda v, raw: v in (None, False), "false: no q/k norm"),
    "partial_rotary_factor": (lambda v, raw: v in (None, 1, 1.0), "1: rotary embedding over the whole head"),
}


def is_vlm(raw: dict) -> bool:
    architectures = raw.get("architectures")
    return isinstance(architectures, list) and VLM_ARCHITECTURE in architectures


def _rope_config(raw: dict, path: Path) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: rope_parameters is {params!r:.60}; an object is expected")
    where = f"{path}: rope_parameters"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{where}.rope_type {rope_type!r:.60} is not supported (want one of "
                              f"{', '.join(map(repr, ROPE_TYPES))})")
    for key, accepted in ROPE_REFUSED.items():
        if params.get(key) not in accepted:
            raise CheckpointError(f"{where}.{key} {params[key]!r:.60} is not supported (want 1)")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise CheckpointError(f"{where}.truncate is {truncate!r:.60}; true or false is expected")
    theta = get_float(params, "rope_theta", where, default=None, positive=True)
    return RopeConfig(
        rope_type=rope_type,
        rope_theta=theta if theta is not None else get_float(raw, "rope_theta", path, default=1e6, positive=True),
        factor=get_float(params, "factor", where, default=1.0, positive=True),
        beta_fast=get_float(params, "beta_fast", where, default=32.0) or 32.0,
        beta_slow=get_float(params, "beta_slow", where, default=1.0) or 1.0,
        mscale=get_float(params, "mscale", where, default=None),
        mscale_all_dim=get_float(params, "mscale_all_dim", where, default=None),
        attention_factor=get_float(params, "attention_factor", where, default=None),
        truncate=truncate,
        original_max_position_embeddings=get_int(params, "original_max_position_embeddings", where,
                                                 default=raw["max_position_embeddings"],
                                                 high=MODEL_LIMITS["max_position_embeddings"]),
        llama_4_scaling_beta=get_float(params, "llama_4_scaling_beta", where, default=0.0) or 0.0,
    )


def _eos_ids(raw: dict, path: Path) -> list[int]:
    eos = raw.get("eos_token_id")
    values = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return [get_int({"eos_token_id": e}, "eos_token_id", path, low=0) for e in values]


def read_config(checkpoint_dir: Path) -> ModelConfig:
    """The text model's config (for a VLM, the text settings at the config root)."""
    root = Path(checkpoint_dir).resolve()
    path = root / CONFIG_FILE
    raw = load_json(root, CONFIG_FILE)
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or (ARCHITECTURE not in architectures
                                               and VLM_ARCHITECTURE not in architectures):
        raise CheckpointError(
            f"{path}: architectures is {architectures!r:.80}, expected [{ARCHITECTURE!r}] or [{VLM_ARCHITECTURE!r}] "
            "(not a Nemotron-Labs-Diffusion checkpoint)"
        )
    model_type = VLM_MODEL_TYPE if is_vlm(raw) else MODEL_TYPE
    if raw.get("model_type") != model_type:
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r:.60}, expected {model_type!r}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing required keys {missing}")
    for key, (accepted, meaning) in MATH_KEYS.items():
        if key in raw and not accepted(raw[key], raw):
            raise CheckpointError(f"{path}: {key} {raw[key]!r:.60} is not supported; the runtime implements "
                                  f"{meaning}")
    sizes = {key: get_int(raw, key, path, high=MODEL_LIMITS.get(key)) for key in REQUIRED_KEYS if key != "rms_norm_eps"}
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    head_dim = get_int(raw, "head_dim", path, default=None, high=MODEL_LIMITS["head_dim"])
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{path}: no head_dim, and hidden_size {hidden} is not a multiple of "
                                  f"num_attention_heads {heads}")
        head_dim = hidden // heads
    config = ModelConfig(
        **sizes, head_dim=head_dim, rms_norm_eps=get_float(raw, "rms_norm_eps", path, positive=True),
        block_size=get_int(raw, "block_size", path, default=32, high=MODEL_LIMITS["block_size"]),
        mask_token_id=get_int(raw, "mask_token_id", path, default=100, low=0),
        bos_token_id=get_int(raw, "bos_token_id", path, default=None, low=0),
        eos_token_ids=_eos_ids(raw, path),
        rope=_rope_config(raw, path),
    )
    try:
        check_model_config(config, key="")
    except EngineFormatError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if is_vlm(raw):
        config.image_token_id = _vision_config(raw, root, config).image_token_id
    return config


def _vision_config(raw: dict, checkpoint_dir: Path, config: ModelConfig) -> VisionConfig:
    try:
        vision = read_vision_config(raw, checkpoint_dir, config)
    except VisionConfigError as exc:
        raise CheckpointError(f"{checkpoint_dir / CONFIG_FILE}: {exc}") from None
    if not 0 <= vision.image_token_id < config.vocab_size:
        raise CheckpointError(f"{checkpoint_dir / CONFIG_FILE}: image token id {vision.image_token_id} is outside "
                              "the vocabulary")
    return vision


def read_vlm_config(checkpoint_dir: Path) -> VisionConfig | None:
    """The vision settings of a VLM checkpoint; None for a text checkpoint."""
    root = Path(checkpoint_dir).resolve()
    raw = load_json(root, CONFIG_FILE)
    return _vision_config(raw, root, read_config(root)) if is_vlm(raw) else None
