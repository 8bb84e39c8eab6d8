"""The engine directory contract, shared by the builder (writer) and the runtime (reader).

checkpoint ──builder──▶ [engine dir: described here] ──runtime──▶ Triton

An engine directory holds:
  config.json            {"format_version", "model": ModelConfig, "build": BuildSettings}
  weights.safetensors    tensors in the runtime layout (see WEIGHT NAMES below)
  tokenizer.json, tokenizer_config.json (+ any other tokenizer files of the checkpoint)
  draft_lora.safetensors the draft adapter in runtime names (optional)
  vision.safetensors     the vision tower and projector of a VLM, in runtime names (VLM engines only)
  kernels/<sm>/<key>.cubin, kernels/<sm>/kernels.json
                         Triton kernels compiled ahead of time for the target arch (GPU builds):
                         one cubin per kernel variant and the index the launcher reads
  manifest.json          {"files": {relative path: {"sha256", "bytes"}}}, checked at load

A tensor-parallel engine (`build.tp` = N > 1) holds one weight file per rank instead of
weights.safetensors / draft_lora.safetensors: weights.rank{r}.safetensors and
draft_lora.rank{r}.safetensors (see `weights_file`, `draft_lora_file`). In rank r's file,
qkv holds its query heads and KV heads ([q_r; k_r; v_r]), gate_up its slice of the
intermediate size ([gate_r; up_r]), o and down the matching input columns, head its slice
of the vocabulary (rows), lora_a the columns of its query heads; embed, norms and lora_b are
whole. fp8 scales follow their rows (o and down keep every row, so they keep every scale).

Runtime weight names: embed, final_norm, head, and per layer i
  layers.{i}.attn_norm, layers.{i}.qkv (fused [q; k; v]), layers.{i}.o,
  layers.{i}.mlp_norm, layers.{i}.gate_up (fused [gate; up]), layers.{i}.down.
An fp8 engine stores each linear weight as `<name>` (float8_e4m3fn) plus
`<name>.scale` (float32, one per output channel); a weight equals weight.float() * scale[:, None].

Vision weight names (vision.safetensors; plain dtype, never fp8): patch_conv [hidden, channels, p, p],
ln_pre, and per layer i layers.{i}.attn_norm, layers.{i}.qkv (fused), layers.{i}.o,
layers.{i}.ffn_norm, layers.{i}.gate_up (fused), layers.{i}.down; then projector.norm,
projector.merge [hidden, hidden * merge**2], projector.linear_1, projector.linear_2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
DRAFT_LORA_FILE = "draft_lora.safetensors"
VISION_WEIGHTS_FILE = "vision.safetensors"
LORA_DIR = "linear_spec_lora"

DTYPES = ("fp32", "bf16", "fp16", "fp8")
# Target name -> CUDA SM. "cpu" builds run on the PyTorch reference path only.
ARCH_TO_SM = {
    "cpu": None,
    "a100": "sm_80",
    "l40s": "sm_89",
    "h100": "sm_90a",
    "h200": "sm_90a",
    "b200": "sm_100a",
    "gb200": "sm_100a",
}
FP8_ARCHES = ("cpu", "l40s", "h100", "h200", "b200", "gb200")


def weights_file(rank: int, tp: int) -> str:
    """The weight file of one tensor-parallel rank."""
    return WEIGHTS_FILE if tp == 1 else f"weights.rank{rank}.safetensors"


def draft_lora_file(rank: int, tp: int) -> str:
    return DRAFT_LORA_FILE if tp == 1 else f"draft_lora.rank{rank}.safetensors"


def rank_files(rank: int, tp: int) -> set[str]:
    return {weights_file(rank, tp), draft_lora_file(rank, tp)}


class EngineFormatError(Exception):
    """An engine directory is missing a file, or a file does not match the manifest."""


@dataclass
class RopeConfig:
    rope_type: str = "yarn"
    rope_theta: float = 1e6
    factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    original_max_position_embeddings: int = 16384
    llama_4_scaling_beta: float = 0.0


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    block_size: int
    mask_token_id: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    rope: RopeConfig = field(default_factory=RopeConfig)
    image_token_id: int | None = None  # VLM: rows at this token take the image features

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        return cls(**data)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """A Pixtral vision tower, the Mistral3 projector into the text model, and the image preprocessing."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    text_hidden_size: int
    num_channels: int = 3
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5  # the tower's norms
    projector_norm_eps: float = 1e-5  # the projector's norm (the text model's eps)
    projector_hidden_act: str = "gelu"
    spatial_merge_size: int = 2
    feature_layer: int = -1  # which hidden state feeds the projector (-1: the last layer's output)
    longest_edge: int = 1024  # images are resized to fit this many pixels on their longest side
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        data = dict(data)
        data["image_mean"], data["image_std"] = tuple(data["image_mean"]), tuple(data["image_std"])
        return cls(**data)


@dataclass
class LoraConfig:
    rank: int
    alpha: float
    target_modules: list[str]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class BuildSettings:
    dtype: str
    arch: str
    block_length: int
    max_seq_len: int
    max_batch_size: int
    kv_page_size: int
    sm: str | None = None
    num_parameters: int = 0
    lora: LoraConfig | None = None
    # compiled kernels, one {"kernel", "key", "file"} per variant; files are relative to the engine dir
    kernels: list[dict] = field(default_factory=list)
    source: str = ""
    nemodiff_version: str = ""
    tp: int = 1  # tensor-parallel ranks the weights are sharded for


@dataclass
class EngineConfig:
    model: ModelConfig
    build: BuildSettings
    vision: VisionConfig | None = None  # VLM engines only
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        if data.get("format_version") != FORMAT_VERSION:
            raise EngineFormatError(
                f"{CONFIG_FILE}: engine format version {data.get('format_version')!r} is not "
                f"supported (this nemodiff reads version {FORMAT_VERSION}); rebuild the engine"
            )
        build = dict(data["build"])
        if build.get("lora") is not None:
            build["lora"] = LoraConfig(**build["lora"])
        vision = VisionConfig.from_dict(data["vision"]) if data.get("vision") else None
        return cls(model=ModelConfig.from_dict(data["model"]), build=BuildSettings(**build), vision=vision)

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineConfig":
        path = Path(engine_dir) / CONFIG_FILE
        if not path.is_file():
            raise EngineFormatError(f"{path}: not found; is {engine_dir} an engine directory?")
        return cls.from_dict(json.loads(path.read_text()))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(engine_dir: Path) -> dict:
    engine_dir = Path(engine_dir)
    files = {}
    for path in sorted(p for p in engine_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(engine_dir).as_posix()
        if rel == MANIFEST_FILE:
            continue
        files[rel] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (engine_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(engine_dir: Path, skip: set[str] | frozenset[str] = frozenset(),
                    only: set[str] | None = None) -> dict:
    """Check every file listed in the manifest exists with its recorded hash.

    `skip` / `only` narrow the check to some files (each tensor-parallel rank hashes its own shards).
    """
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        raise EngineFormatError(f"{path}: not found; the engine directory is incomplete")
    manifest = json.loads(path.read_text())
    for rel, entry in manifest["files"].items():
        if rel in skip or (only is not None and rel not in only):
            continue
        file = engine_dir / rel
        if not file.is_file():
            raise EngineFormatError(f"{file}: listed in {MANIFEST_FILE} but missing")
        if file.stat().st_size != entry["bytes"] or sha256_of(file) != entry["sha256"]:
            raise EngineFormatError(
                f"{file}: contents do not match {MANIFEST_FILE} (file changed or corrupt); rebuild the engine"
            )
    return manifest
