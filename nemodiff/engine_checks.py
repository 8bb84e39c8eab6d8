"""The rules of the engine-dir contract: what a valid config.json holds, and how files are read.

checkpoint ──builder──▶ [engine dir: checked here] ──runtime──▶ Triton

`nemodiff/engine_format.py` describes the engine directory and re-exports everything here; this
module holds what that contract accepts, so that the builder refuses what the runtime would refuse:
every key of config.json typed, every size within the limits below (checked before anything is sized
from it), and every file the runtime reads listed in the manifest, a plain relative path inside the
engine, no symlink, with its hash. It imports nothing of nemodiff; engine_format.py imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import types
import typing
from pathlib import Path

# The check functions take engine_format's dataclasses (ModelConfig, EngineConfig, VisionConfig) and
# read their fields by name: naming the types here would make the contract and its rules a circle.
ModelConfig = EngineConfig = VisionConfig = typing.Any

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
# Files of an engine the runtime reads when they are there: each must then be in the manifest.
OPTIONAL_READS = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
MAX_JSON_BYTES = 64 << 20  # config.json, manifest.json, kernels.json: far above any real engine's
# The other files read whole, by name (the largest real ones: tokenizer.json ~35 MB, a chat template a few KB,
# a cubin under 1 MB). Weights are not read whole: their headers are checked against the config first.
MAX_TOKENIZER_BYTES = 128 << 20
MAX_TEMPLATE_BYTES = 1 << 20
MAX_KERNEL_BYTES = 64 << 20


def read_limit(name: str) -> int | None:
    """The most bytes a file of this name (an engine's or a checkpoint's, relative path) may hold; None for
    weights (.safetensors), which are sized by the config."""
    base = name.rsplit("/", 1)[-1]
    if base.endswith(".safetensors"):
        return None
    if base == TOKENIZER_FILE:
        return MAX_TOKENIZER_BYTES
    if base.endswith(".jinja"):
        return MAX_TEMPLATE_BYTES
    if base.endswith(".json"):
        return MAX_JSON_BYTES
    return MAX_KERNEL_BYTES if name.startswith("kernels/") else None


def size_problem(path: Path, name: str | None = None) -> str | None:
    """'PATH: N bytes, over the limit of L bytes for a NAME file' when the file is larger than its read_limit."""
    path = Path(path)
    limit = read_limit(name or path.name)
    size = path.stat().st_size
    if limit is None or size <= limit:
        return None
    return f"{path}: {size} bytes, over the limit of {limit} bytes for {(name or path.name).rsplit('/', 1)[-1]}"

DTYPES = ("fp32", "bf16", "fp16", "fp8")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # of activations and the KV cache (fp8: bf16)
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
ROPE_TYPES = ("default", "yarn")
VISION_ACTIVATIONS = ("silu", "gelu")

# Upper bounds of every size an engine (and a checkpoint) may give; the lower bound is 1. The NLD family
# (docs/design.md §2: vocab 131072, hidden <= 5120, 40 layers, 32 heads, 262144 positions, block 32) fits
# with room to spare; anything beyond is refused before memory is sized from it.
MODEL_LIMITS = {"vocab_size": 1 << 20, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
                "num_hidden_layers": 512, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                "head_dim": 1024, "max_position_embeddings": 1 << 22, "block_size": 1024}
BUILD_LIMITS = {"block_length": 1024, "max_seq_len": 1 << 22, "max_batch_size": 4096, "kv_page_size": 4096,
                "tp": 64}
VISION_LIMITS = {"hidden_size": 1 << 14, "intermediate_size": 1 << 16, "num_hidden_layers": 256,
                 "num_attention_heads": 256, "patch_size": 256, "num_channels": 3, "spatial_merge_size": 16,
                 "longest_edge": 1 << 15}
LORA_MAX_RANK = 4096
# The KV-cache pool an engine sizes by default (max_batch_size sequences of max_seq_len) may not pass this
# per rank: no accelerator holds more.
MAX_KV_POOL_BYTES = 1 << 40


class EngineFormatError(Exception):
    """An engine directory is missing a file, a file does not match the manifest, or config.json is not a
    valid engine config. The message names the file (and the key) and fits on one line: line breaks
    carried in from a library's message or a hostile file are folded into spaces."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# -- config.json: types and ranges -------------------------------------------------------------------------

def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fields_of(cls, data, key: str):
    """An instance of dataclass `cls` from `data`: no unknown key, none missing, each value of its type."""
    where = key or "the config"
    if not isinstance(data, dict):
        raise EngineFormatError(f"{where} is {_show(data)}; an object is expected")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known:
            name = name if name.isidentifier() else _show(name)  # a hostile name stays on one line
            raise EngineFormatError(f"{_key(key, name)}: unknown key (not part of this engine "
                                    "format); rebuild the engine")
    for name, f in known.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise EngineFormatError(f"{_key(key, name)}: missing")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed(value, hints[name], _key(key, name)) for name, value in data.items()})


def _key(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _typed(value, hint, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return fields_of(hint, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise EngineFormatError(f"{key} is {_show(value)}; a list is expected")
        items = [_typed(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise EngineFormatError(f"{key} is {value}; a finite number is expected")
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    want = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}
    raise EngineFormatError(f"{key} is {_show(value)}; {want.get(hint, hint)} is expected")


def _in_range(key: str, value: int, high: int, low: int = 1) -> None:
    if not low <= value <= high:
        raise EngineFormatError(f"{key} is {value}; it must be in [{low}, {high}]")


def check_model_config(m: ModelConfig, key: str = "model") -> None:
    """Ranges and consistency of a model config (the builder checks a checkpoint's with it too, key "")."""
    pre = f"{key}." if key else ""
    for name, high in MODEL_LIMITS.items():
        _in_range(pre + name, getattr(m, name), high)
    if m.num_attention_heads % m.num_key_value_heads:
        raise EngineFormatError(f"{pre}num_attention_heads {m.num_attention_heads} is not a multiple of "
                                f"num_key_value_heads {m.num_key_value_heads}")
    if m.head_dim % 2:
        raise EngineFormatError(f"{pre}head_dim {m.head_dim} is odd; rotary embeddings rotate pairs")
    if not 0 < m.rms_norm_eps < 1:
        raise EngineFormatError(f"{pre}rms_norm_eps is {m.rms_norm_eps}; it must be in (0, 1)")
    ids = {"mask_token_id": m.mask_token_id, "bos_token_id": m.bos_token_id, "image_token_id": m.image_token_id}
    ids |= {f"eos_token_ids[{i}]": e for i, e in enumerate(m.eos_token_ids)}
    for name, token in ids.items():
        if token is not None and not 0 <= token < m.vocab_size:
            raise EngineFormatError(f"{pre}{name} {token} is outside the vocabulary (vocab_size {m.vocab_size})")
    rope, pre = m.rope, f"{key}.rope." if key else "rope_parameters."
    if rope.rope_type not in ROPE_TYPES:
        raise EngineFormatError(f"{pre}rope_type {rope.rope_type!r} is not implemented (want one of "
                                f"{', '.join(ROPE_TYPES)})")
    for name in ("rope_theta", "factor", "beta_fast", "beta_slow"):
        if not getattr(rope, name) > 0:
            raise EngineFormatError(f"{pre}{name} is {getattr(rope, name)}; it must be positive")
    _in_range(f"{pre}original_max_position_embeddings", rope.original_max_position_embeddings,
              MODEL_LIMITS["max_position_embeddings"])


def check_engine_config(c: EngineConfig) -> None:
    m, b = c.model, c.build
    check_model_config(m)
    if b.dtype not in DTYPES:
        raise EngineFormatError(f"build.dtype {b.dtype!r} is not one of {', '.join(DTYPES)}")
    if b.arch not in ARCH_TO_SM:
        raise EngineFormatError(f"build.arch {b.arch!r} is not one of {', '.join(ARCH_TO_SM)}")
    if b.sm != ARCH_TO_SM[b.arch]:
        raise EngineFormatError(f"build.sm {b.sm!r} does not match build.arch {b.arch!r} ({ARCH_TO_SM[b.arch]})")
    for name, high in BUILD_LIMITS.items():
        _in_range(f"build.{name}", getattr(b, name), high)
    _in_range("build.max_seq_len", b.max_seq_len, m.max_position_embeddings)
    if m.num_key_value_heads % b.tp:
        raise EngineFormatError(f"build.tp {b.tp} does not divide model.num_key_value_heads {m.num_key_value_heads}")
    _in_range("build.num_parameters", b.num_parameters, 1 << 50, 0)
    if b.lora is not None:
        _in_range("build.lora.rank", b.lora.rank, LORA_MAX_RANK)
        if b.lora.target_modules != ["o_proj"]:
            raise EngineFormatError(f"build.lora.target_modules is {_show(b.lora.target_modules)}; want ['o_proj']")
    for i, entry in enumerate(b.kernels):
        for name in ("kernel", "key", "file"):
            if not isinstance(entry.get(name), str):
                raise EngineFormatError(f"build.kernels[{i}].{name} is {_show(entry.get(name))}; a string is expected")
        problem = entry_problem(entry["file"])
        if problem or b.sm is None or not entry["file"].startswith(f"kernels/{b.sm}/"):
            raise EngineFormatError(f"build.kernels[{i}].file {_show(entry['file'])} is not a file under "
                                    f"kernels/{b.sm}/ of the engine" + (f" ({problem})" if problem else ""))
    page = b.kv_page_size
    per_sequence = -(-(b.max_seq_len + 2 * b.block_length) // page) * page
    pool = (b.max_batch_size * per_sequence * 2 * m.num_hidden_layers * (m.num_key_value_heads // b.tp)
            * m.head_dim * DTYPE_BYTES[b.dtype])
    if pool > MAX_KV_POOL_BYTES:
        raise EngineFormatError(
            f"build: the default KV cache (max_batch_size {b.max_batch_size} x max_seq_len {b.max_seq_len}) needs "
            f"{pool / 2**30:,.0f} GiB per rank, more than {MAX_KV_POOL_BYTES >> 30} GiB; rebuild with a smaller "
            "--max-batch-size or --max-seq-len")
    if c.vision is not None:
        _check_vision(c.vision, m)


def _check_vision(v: VisionConfig, m: ModelConfig) -> None:
    for name, high in VISION_LIMITS.items():
        _in_range(f"vision.{name}", getattr(v, name), high, low=3 if name == "num_channels" else 1)
    if v.hidden_size % v.num_attention_heads or v.head_dim % 4:
        raise EngineFormatError(f"vision.hidden_size {v.hidden_size} / num_attention_heads {v.num_attention_heads} "
                                "must be a whole head_dim divisible by 4 (2-D rotary embedding)")
    if v.text_hidden_size != m.hidden_size:
        raise EngineFormatError(f"vision.text_hidden_size {v.text_hidden_size} is not model.hidden_size "
                                f"{m.hidden_size}")
    for name in ("hidden_act", "projector_hidden_act"):
        if getattr(v, name) not in VISION_ACTIVATIONS:
            raise EngineFormatError(f"vision.{name} {getattr(v, name)!r} is not one of {', '.join(VISION_ACTIVATIONS)}")
    _in_range("vision.feature_layer", v.feature_layer, v.num_hidden_layers, -(v.num_hidden_layers + 1))
    for name in ("image_token_id", "image_break_token_id", "image_end_token_id"):
        _in_range(f"vision.{name}", getattr(v, name), m.vocab_size - 1, 0)
    if len(v.image_mean) != 3 or len(v.image_std) != 3 or min(v.image_std) <= 0:
        raise EngineFormatError("vision.image_mean and image_std want three values each (RGB), std positive")
    for name in ("rms_norm_eps", "projector_norm_eps", "rescale_factor", "rope_theta"):
        if not getattr(v, name) > 0:
            raise EngineFormatError(f"vision.{name} is {getattr(v, name)}; it must be positive")


# -- the manifest ---------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", opener=_no_follow) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _no_follow(path, flags):
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def entry_problem(rel) -> str | None:
    """Why `rel` is not a plain relative path inside a directory (None when it is one)."""
    if not isinstance(rel, str) or not rel:
        return "not a file name"
    if rel.startswith("/") or "\\" in rel or "\0" in rel or (len(rel) > 1 and rel[1] == ":"):
        return "an absolute path or a foreign separator"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "not a plain relative path (empty, '.' or '..' parts)"
    return None


def plain_file(root: Path, rel: str, missing: str = f"listed in {MANIFEST_FILE} but missing") -> Path:
    """root/rel when every part below root is a real directory and the last a regular file; no symlinks."""
    path = Path(root)
    for part in rel.split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise EngineFormatError(f"{Path(root) / rel}: {missing}") from None
        except OSError as exc:
            raise EngineFormatError(f"{Path(root) / rel}: cannot be read ({exc.strerror})") from None
        if stat.S_ISLNK(mode):
            raise EngineFormatError(f"{path}: is a symbolic link; an engine holds plain files only (copy the "
                                    "engine instead of linking into it)")
    if not stat.S_ISREG(mode):
        raise EngineFormatError(f"{path}: not a regular file")
    return path


def read_json(path: Path):
    """A small JSON file of an engine (no symlink, bounded size), or an EngineFormatError naming it."""
    path = Path(path)
    plain_file(path.parent, path.name, missing="not found")
    if problem := size_problem(path):
        raise EngineFormatError(problem)
    try:
        with open(path, "rb", opener=_no_follow) as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise EngineFormatError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    except OSError as exc:
        raise EngineFormatError(f"{path}: cannot be read ({exc.strerror})") from None


def read_manifest(engine_dir: Path) -> dict:
    """manifest.json with every entry checked for form (a plain relative path, a sha256, a size) before any
    listed file is opened."""
    path = Path(engine_dir) / MANIFEST_FILE
    if not os.path.lexists(path):
        raise EngineFormatError(f"{path}: not found; the engine directory is incomplete")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise EngineFormatError(f"{path}: not a manifest (want {{\"files\": {{path: {{\"sha256\", \"bytes\"}}}}}})")
    for rel, entry in files.items():
        problem = entry_problem(rel) or ("the manifest itself" if rel == MANIFEST_FILE else None)
        if problem:
            raise EngineFormatError(f"{path}: entry {_show(rel)} is {problem}; an engine lists its own files only")
        digest, size = (entry.get("sha256"), entry.get("bytes")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
                and isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise EngineFormatError(f"{path}: entry {rel!r} wants {{\"sha256\": 64 hex digits, \"bytes\": size}}")
    return manifest


def _unlisted_reads(engine_dir: Path, files: dict) -> None:
    """A file the runtime would read must be in the manifest: it is refused, not read, when it is not."""
    for name in sorted(os.listdir(engine_dir)):
        if (name in OPTIONAL_READS or name.endswith(".safetensors")) and name not in files:
            raise EngineFormatError(f"{engine_dir / name}: not listed in {MANIFEST_FILE}; the engine did not ship "
                                    "it (remove it, or rebuild the engine)")
    for top, dirs, names in os.walk(engine_dir / "kernels"):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            rel = Path(top, name).relative_to(engine_dir).as_posix()
            if rel not in files:
                raise EngineFormatError(f"{engine_dir / rel}: not listed in {MANIFEST_FILE}; the engine did not "
                                        "ship it (remove it, or rebuild the engine)")


def verify_manifest(engine_dir: Path, skip: set[str] | frozenset[str] = frozenset(),
                    only: set[str] | None = None, required: set[str] | frozenset[str] = frozenset()) -> dict:
    """Check every file listed in the manifest exists, plain, with its recorded size and hash; that every
    `required` file is listed; and (checking the whole engine, `only` None) that no file the runtime reads is
    unlisted. `skip` / `only` narrow the check (each tensor-parallel rank hashes its own shards)."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    files = manifest["files"]
    for rel in sorted(required):
        if rel not in files:
            raise EngineFormatError(f"{engine_dir / MANIFEST_FILE}: does not list {rel}, which the engine needs; "
                                    "the manifest is incomplete or was altered: rebuild the engine")
    if only is None:
        _unlisted_reads(engine_dir, files)
    for rel, entry in files.items():
        if rel in skip or (only is not None and rel not in only):
            continue
        file = plain_file(engine_dir, rel)
        problem = size_problem(file, rel)  # before hashing it: the limit also bounds the time spent
        if problem:
            raise EngineFormatError(problem)
        if file.stat().st_size != entry["bytes"] or sha256_of(file) != entry["sha256"]:
            raise EngineFormatError(
                f"{file}: contents do not match {MANIFEST_FILE} (file changed or corrupt); rebuild the engine"
            )
    return manifest

