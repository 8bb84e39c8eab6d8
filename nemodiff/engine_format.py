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
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from nemodiff.engine_checks import (  # noqa: F401 (the rules of the contract, re-exported with it)
    ARCH_TO_SM,
    BUILD_LIMITS,
    DTYPE_BYTES,
    DTYPES,
    FP8_ARCHES,
    LORA_MAX_RANK,
    MANIFEST_FILE,
    MAX_KV_POOL_BYTES,
    MODEL_LIMITS,
    OPTIONAL_READS,
    ROPE_TYPES,
    TOKENIZER_FILE,
    VISION_ACTIVATIONS,
    VISION_LIMITS,
    EngineFormatError,
    check_engine_config,
    check_model_config,
    entry_problem,
    fields_of,
    plain_file,
    read_json,
    read_limit,
    read_manifest,
    sha256_of,
    size_problem,
    verify_manifest,
)

FORMAT_VERSION = 2
NEMODIFF_VERSION = "0.1.0"  # the package release; an engine records the one that built it
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
DRAFT_LORA_FILE = "draft_lora.safetensors"
VISION_WEIGHTS_FILE = "vision.safetensors"
LORA_DIR = "linear_spec_lora"
def weights_file(rank: int, tp: int) -> str:
    """The weight file of one tensor-parallel rank."""
    return WEIGHTS_FILE if tp == 1 else f"weights.rank{rank}.safetensors"


def draft_lora_file(rank: int, tp: int) -> str:
    return DRAFT_LORA_FILE if tp == 1 else f"draft_lora.rank{rank}.safetensors"


def rank_files(rank: int, tp: int) -> set[str]:
    return {weights_file(rank, tp), draft_lora_file(rank, tp)}


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
        return fields_of(cls, data, "model")


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
        return fields_of(cls, data, "vision")


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
    def from_dict(cls, data: dict, source: str = CONFIG_FILE) -> "EngineConfig":
        """The config of `data` (config.json's content), every key typed and every value in range; an
        EngineFormatError that names `source` and the key otherwise."""
        if not isinstance(data, dict):
            raise EngineFormatError(f"{source}: not an engine config (a JSON object is expected, got "
                                    f"{type(data).__name__})")
        if data.get("format_version") != FORMAT_VERSION:
            raise EngineFormatError(
                f"{source}: engine format version {data.get('format_version')!r:.60} is not "
                f"supported (this nemodiff reads version {FORMAT_VERSION}); rebuild the engine"
            )
        try:
            config = fields_of(cls, data, "")
            check_engine_config(config)
        except EngineFormatError as exc:
            raise EngineFormatError(f"{source}: {exc}") from None
        return config

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineConfig":
        engine_dir = Path(engine_dir)
        path = engine_dir / CONFIG_FILE
        if not os.path.lexists(path):
            raise EngineFormatError(f"{path}: not found; is {engine_dir} an engine directory?")
        data = read_json(path)
        if isinstance(data, dict) and "format_version" not in data and ("architectures" in data or "model_type" in data):
            raise EngineFormatError(checkpoint_hint(engine_dir, data))
        return cls.from_dict(data, source=str(path))


def checkpoint_hint(path: Path, raw: dict) -> str:
    """What to say when a Hugging Face checkpoint is given where an engine is expected."""
    path = Path(path)
    name = path.resolve().name or "model"
    engine = path.parent / f"{name}-engine" if path.name else Path("..") / f"{name}-engine"
    kind = ", ".join(map(str, raw.get("architectures") or [])) or raw.get("model_type")
    return (f"{path}: this is a Hugging Face checkpoint ({kind}), not a nemodiff engine; build an engine from it "
            f"first: nemodiff-build {shlex.quote(str(path))} -o {shlex.quote(str(engine))}")


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


def engine_files(config: EngineConfig) -> set[str]:
    """Every file the runtime reads from an engine of this config, all ranks together."""
    b = config.build
    files = {CONFIG_FILE, TOKENIZER_FILE} | {weights_file(r, b.tp) for r in range(b.tp)}
    if b.lora is not None:
        files |= {draft_lora_file(r, b.tp) for r in range(b.tp)}
    if config.vision is not None:
        files.add(VISION_WEIGHTS_FILE)
    if b.kernels:
        files |= {entry["file"] for entry in b.kernels} | {f"kernels/{b.sm}/kernels.json"}
    return files


def open_engine(engine_dir: Path, verify: bool = True, rank: int | None = None) -> tuple[EngineConfig, dict | None]:
    """The config of an engine directory and, with `verify`, its checked manifest: config.json's hash is checked
    before it is parsed, then every file the runtime reads. rank None: the whole engine; rank 0 of a
    tensor-parallel engine: all but the other ranks' shards; rank r > 0: its own shards."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineFormatError(f"{engine_dir}: not a directory")
    if not verify:
        return EngineConfig.load(engine_dir), None
    if not os.path.lexists(engine_dir / MANIFEST_FILE):
        EngineConfig.load(engine_dir)  # a checkpoint, or no config at all, is named as such first
    verify_manifest(engine_dir, only={CONFIG_FILE}, required={CONFIG_FILE})
    config = EngineConfig.load(engine_dir)
    tp, needed = config.build.tp, engine_files(config)
    if rank is None:
        return config, verify_manifest(engine_dir, required=needed)
    mine = rank_files(rank, tp) & needed
    if rank > 0:
        return config, verify_manifest(engine_dir, only=mine, required=mine)
    others = set().union(*(rank_files(r, tp) for r in range(1, tp)))
    return config, verify_manifest(engine_dir, skip=others | {CONFIG_FILE}, required=needed - others)
