"""`build_engine`: checkpoint directory in, engine directory out (atomically).

checkpoint ──[builder: build]──▶ engine dir ──runtime──▶ Triton

The engine is assembled in a temporary sibling directory and renamed into place only
when complete, so a failed build leaves nothing at the output path. With `tp` > 1 the
weights and the draft adapter are written as one shard per tensor-parallel rank.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from nemodiff.engine_format import (
    ARCH_TO_SM,
    BUILD_LIMITS,
    CONFIG_FILE,
    DTYPES,
    FP8_ARCHES,
    NEMODIFF_VERSION,
    VISION_WEIGHTS_FILE,
    BuildSettings,
    EngineConfig,
    EngineFormatError,
    draft_lora_file,
    size_problem,
    weights_file,
    write_manifest,
)
from nemodiff.plugins.aot import compile_variants
from nemodiff.plugins.registry import engine_variants

from .checkpoint import CheckpointError, num_parameters, open_checkpoint, read_lora
from .checkpoint_files import checkpoint_file, load_json
from .convert import convert_lora, convert_vision_weights, convert_weights
from .shard import Sharder, ShardError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


class BuildError(Exception):
    """The requested build settings are invalid (not a checkpoint problem)."""


@dataclass
class BuildOptions:
    dtype: str = "bf16"
    arch: str = "cpu"
    block_length: int | None = None
    max_seq_len: int | None = None
    max_batch_size: int = 8
    kv_page_size: int = 16
    kernels: bool = True  # compile the Triton kernels ahead of time for GPU archs
    overwrite: bool = False
    tp: int = 1  # tensor-parallel ranks: one weight shard each


@dataclass
class BuildResult:
    engine_dir: Path
    config: EngineConfig
    total_bytes: int


def _validate(options: BuildOptions) -> None:
    if options.dtype not in DTYPES:
        raise BuildError(f"--dtype {options.dtype!r}: choose one of {', '.join(DTYPES)}")
    if options.arch not in ARCH_TO_SM:
        raise BuildError(f"--arch {options.arch!r}: choose one of {', '.join(ARCH_TO_SM)}")
    if options.dtype == "fp8" and options.arch not in FP8_ARCHES:
        raise BuildError(
            f"--dtype fp8 is not supported on --arch {options.arch} ({ARCH_TO_SM[options.arch]} has no fp8 "
            "tensor cores); use --dtype bf16, or an fp8 arch: " + ", ".join(a for a in FP8_ARCHES if a != "cpu")
        )
    for name in ("max_batch_size", "kv_page_size", "tp", "block_length", "max_seq_len"):
        value = getattr(options, name)
        if value is not None and not 1 <= value <= BUILD_LIMITS[name]:
            raise BuildError(f"--{name.replace('_', '-')} {value} must be in [1, {BUILD_LIMITS[name]}]")


def _check_tokenizer(root: Path, vocab_size: int) -> None:
    """The tokenizer files the engine will carry, read as the runtime reads them."""
    from tokenizers import Tokenizer

    path = checkpoint_file(root, "tokenizer.json")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (the engine needs the tokenizer)")
    for name in TOKENIZER_FILES:  # what the engine will carry, within the limits the runtime reads it with
        file = checkpoint_file(root, name)
        if file.is_file() and (problem := size_problem(file)):
            raise CheckpointError(problem)
    try:
        tokenizer = Tokenizer.from_str(path.read_bytes().decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception whose message names no file
        raise CheckpointError(f"{path}: not a valid tokenizer ({' '.join(str(exc).split())[:200]})") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                              f"more than the model's vocab_size {vocab_size} (config.json)")
    if checkpoint_file(root, "tokenizer_config.json").is_file():
        template = load_json(root, "tokenizer_config.json").get("chat_template")
        if template is not None and not isinstance(template, (str, list)):
            raise CheckpointError(f"{root / 'tokenizer_config.json'}: chat_template is {template!r:.60}; a template "
                                  "string is expected")


def rank_config(config, tp: int):
    """The geometry one tensor-parallel rank runs (its heads and MLP slice): what its kernels are built for."""
    if tp == 1:
        return config
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp,
                               num_key_value_heads=config.num_key_value_heads // tp,
                               intermediate_size=config.intermediate_size // tp)


def _save_shards(sharder: Sharder, tensors: dict, staging: Path, file_name) -> None:
    """One file per tensor-parallel rank (the tensors as they are when tp is 1)."""
    shards = [tensors] if sharder.tp == 1 else sharder.split_all(tensors)
    for rank, shard in enumerate(shards):
        save_file(shard, str(staging / file_name(rank, sharder.tp)), metadata={"format": "nemodiff"})


def build_engine(hf_dir: Path, out_dir: Path, options: BuildOptions, progress=None,
                 kernel_progress=None) -> BuildResult:
    """progress, kernel_progress: optional callables(total) returning an object with update(n) and close(),
    for the layers converted and the kernel variants compiled."""
    _validate(options)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    checkpoint = open_checkpoint(hf_dir)
    config, hf_dir = checkpoint.config, checkpoint.path  # the resolved checkpoint directory
    _check_tokenizer(hf_dir, config.vocab_size)
    max_seq_len = options.max_seq_len or min(config.max_position_embeddings, 8192)
    if not 1 <= max_seq_len <= config.max_position_embeddings:
        raise BuildError(f"--max-seq-len {max_seq_len} must be in [1, {config.max_position_embeddings}]")
    try:
        sharder = Sharder(config, options.tp)
    except ShardError as exc:
        raise BuildError(str(exc)) from None
    block_length = options.block_length or config.block_size
    if block_length < 1:
        raise BuildError("--block-length must be at least 1")
    if out_dir.exists() and any(out_dir.iterdir()) and not options.overwrite:
        raise BuildError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")

    lora = read_lora(hf_dir, config)
    settings = BuildSettings(
        dtype=options.dtype, arch=options.arch, sm=ARCH_TO_SM[options.arch], block_length=block_length,
        max_seq_len=max_seq_len, max_batch_size=options.max_batch_size, kv_page_size=options.kv_page_size,
        num_parameters=num_parameters(config, checkpoint.vision), lora=lora[0] if lora else None,
        source=str(hf_dir.resolve()), nemodiff_version=NEMODIFF_VERSION, tp=options.tp,
    )
    engine_config = EngineConfig(model=config, build=settings, vision=checkpoint.vision)
    try:  # what the runtime will accept: the same rules, before a byte is written
        EngineConfig.from_dict(json.loads(json.dumps(engine_config.to_dict())), source="the engine's config.json")
    except EngineFormatError as exc:
        raise BuildError(str(exc)) from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    bar = progress(config.num_hidden_layers) if progress else None
    try:
        tensors = {}
        for group in convert_weights(checkpoint, options.dtype, on_layer=lambda _: bar and bar.update(1)):
            tensors |= group
        _save_shards(sharder, tensors, staging, weights_file)
        del tensors
        if lora:
            _save_shards(sharder, convert_lora(lora[1], options.dtype), staging, draft_lora_file)
        if checkpoint.vision:
            save_file(convert_vision_weights(checkpoint, options.dtype), str(staging / VISION_WEIGHTS_FILE))
        if settings.sm and options.kernels:
            kernel_dir = staging / "kernels" / settings.sm
            entries = compile_variants(engine_variants(rank_config(config, options.tp), options.dtype), settings.sm,
                                       kernel_dir,
                                       progress=kernel_progress)
            settings.kernels = [{"kernel": e["kernel"], "key": e["key"],
                                 "file": (kernel_dir / e["file"]).relative_to(staging).as_posix()} for e in entries]
        for name in TOKENIZER_FILES:
            source = checkpoint_file(hf_dir, name)
            if source.is_file():  # the file's content (a link inside the checkpoint is followed): a plain copy
                shutil.copyfile(source, staging / name)
        (staging / CONFIG_FILE).write_text(json.dumps(engine_config.to_dict(), indent=2) + "\n")
        staging.chmod(0o755)
        for file in staging.rglob("*"):
            file.chmod(0o755 if file.is_dir() else 0o644)
        manifest = write_manifest(staging)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(trash / "old")
            staging.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar:
            bar.close()
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    return BuildResult(out_dir, engine_config, total)
