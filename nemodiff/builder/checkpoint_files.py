"""Reading a checkpoint's files safely: every path inside the checkpoint, JSON bounded, values typed.

[checkpoint: read here] ──builder──▶ engine dir ──runtime──▶ Triton

Every file the builder reads (config, index, shards, tokenizer files, the draft adapter, the
preprocessor config) goes through `checkpoint_file`: a plain relative name (no absolute path, no
`..`) whose real location, symlinks resolved, lies inside the checkpoint directory. The one
exception is the Hugging Face hub cache, whose snapshot folders hold symlinks into the repository's
`blobs/` folder next to them (`snapshot_download` returns such a folder). A file read whole (JSON,
tokenizer.json, a chat template) is refused above the runtime's limit for it
(`engine_checks.read_limit`) before it is read. Config values are read with their type checked, so a
string where a number goes is a one-line error, not a traceback.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nemodiff.engine_format import entry_problem, size_problem

_MISSING = object()


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or inconsistent. The message names the file and fits on one
    line (line breaks from a library's message or a hostile file are folded into spaces)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _inside(real: Path, root: Path) -> bool:
    if real == root or real.is_relative_to(root):
        return True
    # the Hugging Face hub cache: <repo>/snapshots/<revision>/<file> -> <repo>/blobs/<hash>
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def checkpoint_file(root: Path, rel: str, source: str | Path | None = None) -> Path:
    """root/rel, refused unless `rel` is a plain relative name that resolves inside `root` (which is resolved).
    `source`: the file that named `rel` (an index), for the message. The path may not exist."""
    problem = entry_problem(rel)
    if problem:
        raise CheckpointError(f"{source or root}: {rel!r:.80} is {problem}; a checkpoint's files lie inside it")
    path = root / rel
    if not os.path.lexists(path):
        return path
    real = path.resolve()
    if not _inside(real, root):
        raise CheckpointError(f"{path}: resolves to {real}, outside the checkpoint {root}"
                              + (f" (named in {Path(source).name})" if source else "") + "; copy the file into it")
    if real.exists() and not real.is_file() and not real.is_dir():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def load_json(root: Path, rel: str, what: str = "an object"):
    """A JSON file of the checkpoint; an object unless `what` says otherwise."""
    path = checkpoint_file(root, rel)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if problem := size_problem(path, rel):  # a JSON file's limit, tokenizer.json's for that one
        raise CheckpointError(problem)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    if what == "an object" and not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def get_int(raw: dict, key: str, where, default=_MISSING, low: int | None = 1, high: int | None = None,
            name: str | None = None) -> int | None:
    """raw[key] as an int in [low, high] (bounds None: open); `default` when absent (or null)."""
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise CheckpointError(f"{where}: missing required key {name or key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {name or key} is {value!r:.60}; an integer is expected")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise CheckpointError(f"{where}: {name or key} is {value}; it must be in {bounds}")
    return value


def get_float(raw: dict, key: str, where, default=_MISSING, positive: bool = False,
              name: str | None = None) -> float | None:
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise CheckpointError(f"{where}: missing required key {name or key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {name or key} is {value!r:.60}; a finite number is expected")
    if positive and value <= 0:
        raise CheckpointError(f"{where}: {name or key} is {value}; it must be positive")
    return float(value)
