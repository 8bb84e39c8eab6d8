"""Writes small random NLD checkpoints in the exact upstream Hugging Face layout.

[checkpoint: made here] ──builder──▶ engine dir ──runtime──▶ Triton

Used by the tests, the benchmarks and anyone who wants an engine without downloading
weights: config.json, model.safetensors (or shards + index), tokenizer.json,
tokenizer_config.json with a chat template, and optionally a `linear_spec_lora/` adapter
(PEFT layout, fp32) and a Pixtral vision tower with its projector (a VLM checkpoint, in
either weight layout of `vision_checkpoint.WEIGHT_LAYOUTS`, plus preprocessor_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nemodiff.engine_format import CLIP_MEAN, CLIP_STD, VisionConfig

from .checkpoint import ARCHITECTURE, MODEL_TYPE, expected_shapes
from .vision_checkpoint import VLM_ARCHITECTURE, VLM_MODEL_TYPE, WEIGHT_LAYOUTS, vision_expected_shapes

# Special tokens by id. Unnamed ids up to NUM_SPECIAL are "<SPECIAL_i>" placeholders, as upstream.
NUM_SPECIAL = 128
SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[SYSTEM_PROMPT]",
                  6: "[/SYSTEM_PROMPT]", 7: "[THINK]", 8: "[/THINK]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
                  13: "[IMG_END]", 100: "<|mask|>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
_WORDS = ("the a one two three model token block mask draft verify cache page fast slow small large "
          "red green blue cat dog tree river stone light dark open close read write run stop go "
          "and or not if then else when while for with from into over under é ü 日本 语言").split()


@dataclass
class RandomVisionSpec:
    """A small Pixtral tower + Mistral3 projector; head_dim = hidden / heads must be divisible by 4."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    patch_size: int = 4
    image_size: int = 64  # longest edge after resizing
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    projector_hidden_act: str = "gelu"
    spatial_merge_size: int = 2
    layout: str = "encoder"  # a key of WEIGHT_LAYOUTS


@dataclass
class RandomCheckpointSpec:
    vocab_size: int = 384
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 4096
    block_size: int = 32
    rms_norm_eps: float = 1e-5
    rope: dict = field(default_factory=lambda: {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 0.25, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 16384,
        "llama_4_scaling_beta": 0.1,
    })
    eos_token_id: int | list[int] = 2
    seed: int = 0
    num_shards: int = 1
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    vision: RandomVisionSpec | None = None  # a VLM checkpoint when set


def corpus_lines(count: int = 400, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(count):
        n = int(torch.randint(4, 14, (1,), generator=gen))
        idx = torch.randint(0, len(_WORDS), (n,), generator=gen).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx) + ".")
    return lines


def special_token_list() -> list[str]:
    return [SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIAL)]


def train_tokenizer(vocab_size: int, lines: list[str]) -> Tokenizer:
    """Byte-level BPE with the NLD special-token block at ids 0..127 (mask at 100)."""
    if vocab_size < NUM_SPECIAL + 256:
        raise ValueError(f"vocab_size must be >= {NUM_SPECIAL + 256} for a byte-level tokenizer")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_token_list(), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def write_tokenizer(out_dir: Path, vocab_size: int, lines: list[str] | None = None, eos_token_id: int = 2) -> Tokenizer:
    tokenizer = train_tokenizer(vocab_size, lines or corpus_lines())
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}
             for i, tok in enumerate(special_token_list())}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": special_token_list()[eos_token_id],
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<|mask|>",
        "add_bos_token": True, "model_max_length": 1 << 20, "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return tokenizer


def hf_config_dict(spec: RandomCheckpointSpec) -> dict:
    config = _text_config_dict(spec)
    if spec.vision is None:
        return config
    v = spec.vision
    return config | {
        "architectures": [VLM_ARCHITECTURE], "model_type": VLM_MODEL_TYPE,
        "vision_config": {
            "model_type": "pixtral", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "head_dim": v.hidden_size // v.num_attention_heads, "num_channels": 3, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": v.hidden_act, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
        "image_token_id": 10, "spatial_merge_size": v.spatial_merge_size,
        "projector_hidden_act": v.projector_hidden_act, "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
    }


def _text_config_dict(spec: RandomCheckpointSpec) -> dict:
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "auto_map": {"AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"},
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "hidden_act": "silu", "rms_norm_eps": spec.rms_norm_eps,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "max_position_embeddings": spec.max_position_embeddings, "block_size": spec.block_size,
        "mask_token_id": 100, "bos_token_id": 1, "eos_token_id": spec.eos_token_id, "pad_token_id": 11,
        "dlm_paradigm": "bidirectional", "rope_parameters": dict(spec.rope),
        "torch_dtype": "float32", "transformers_version": "5.0.0",
    }


def random_weights(spec: RandomCheckpointSpec) -> dict[str, torch.Tensor]:
    """Weights scaled so activations and logits have O(1) spread (clear argmax margins)."""
    from nemodiff.engine_format import ModelConfig  # the shapes only need a config-like object

    config = ModelConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, block_size=spec.block_size,
        mask_token_id=100, bos_token_id=1, eos_token_ids=[2],
    )
    gen = torch.Generator().manual_seed(spec.seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            weights[name] = torch.randn(shape, generator=gen)
        else:
            gain = 2.0 if name == "diffusion_head.weight" else 1.0
            weights[name] = gain * torch.randn(shape, generator=gen) / shape[1] ** 0.5
    return weights


def vision_config_of(spec: RandomCheckpointSpec) -> VisionConfig:
    v = spec.vision
    return VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                        patch_size=v.patch_size, text_hidden_size=spec.hidden_size,
                        spatial_merge_size=v.spatial_merge_size)


def random_vision_weights(spec: RandomCheckpointSpec) -> dict[str, torch.Tensor]:
    """Tower and projector weights in canonical names (vision_tower.*, multi_modal_projector.*)."""
    gen = torch.Generator().manual_seed(spec.seed + 2)
    weights = {}
    for name, shape in vision_expected_shapes(vision_config_of(spec)).items():
        if len(shape) == 1:
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            weights[name] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    return weights


def write_preprocessor_config(out_dir: Path, vision: RandomVisionSpec) -> None:
    config = {"image_processor_type": "PixtralImageProcessor", "do_resize": True, "do_rescale": True,
              "do_normalize": True, "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255,
              "size": {"longest_edge": vision.image_size},
              "patch_size": {"height": vision.patch_size, "width": vision.patch_size},
              "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _write_weights(out_dir: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    if num_shards <= 1:
        save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    weight_map, total = {}, 0
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: weights[n] for n in names[shard::num_shards]}
        save_file(part, str(out_dir / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_lora(out_dir: Path, spec: RandomCheckpointSpec) -> None:
    lora_dir = out_dir / "linear_spec_lora"
    lora_dir.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    q_out, rank = spec.num_attention_heads * spec.head_dim, spec.lora_rank
    tensors = {}
    for layer in range(spec.num_hidden_layers):
        prefix = f"base_model.model.encoder.layers.{layer}.self_attn.o_proj."
        tensors[prefix + "lora_A.weight"] = torch.randn(rank, q_out, generator=gen) / q_out ** 0.5
        tensors[prefix + "lora_B.weight"] = torch.randn(spec.hidden_size, rank, generator=gen) / rank ** 0.5
    save_file(tensors, str(lora_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "base_model_name_or_path": None, "task_type": None, "inference_mode": True,
              "r": rank, "lora_alpha": spec.lora_alpha, "lora_dropout": 0.0, "target_modules": ["o_proj"],
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True}
    (lora_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_random_checkpoint(out_dir: Path, spec: RandomCheckpointSpec | None = None, **overrides) -> Path:
    """Write a random checkpoint to `out_dir`; keyword overrides update the default spec."""
    spec = spec or RandomCheckpointSpec()
    for key, value in overrides.items():
        setattr(spec, key, value)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(spec), indent=2))
    weights = random_weights(spec)
    if spec.vision is not None:
        layout = WEIGHT_LAYOUTS[spec.vision.layout]
        weights = {layout.stored(name): tensor for name, tensor in (weights | random_vision_weights(spec)).items()}
        write_preprocessor_config(out_dir, spec.vision)
    _write_weights(out_dir, weights, spec.num_shards)
    eos = spec.eos_token_id if isinstance(spec.eos_token_id, int) else spec.eos_token_id[0]
    write_tokenizer(out_dir, spec.vocab_size, eos_token_id=eos)
    if spec.lora_rank:
        write_lora(out_dir, spec)
    return out_dir
