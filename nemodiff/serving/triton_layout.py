"""Where `nemodiff serve` finds Triton and lays out its model repository.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the model repository and server binary]

The `nemodiff` model (`nemodiff/model_repo/nemodiff`, package data) is copied with its config.pbtxt
filled in; the server is NVIDIA's container's tritonserver when there is one, else the one in the
nvidia-pytriton wheel, whose Python backend gets a stub for this interpreter's version.
"""

from __future__ import annotations

import shutil
import string
import sys
from pathlib import Path

import click

MODEL_NAME = "nemodiff"
CONTAINER_SERVER = Path("/opt/tritonserver/bin/tritonserver")
CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")


def model_repo_source() -> Path:
    """The canonical `nemodiff/model_repo/` (package data when installed, the folder in a source checkout)."""
    candidates = []
    try:
        import nemodiff.model_repo as shipped

        candidates += [Path(p) for p in getattr(shipped, "__path__", [])]
    except ImportError:
        pass
    here = Path(__file__).resolve().parent
    candidates += [here / "model_repo", here.parent / "model_repo"]
    for candidate in candidates:
        if (candidate / MODEL_NAME / "config.pbtxt").is_file():
            return candidate
    raise click.ClickException("the nemodiff Triton model (nemodiff/model_repo/nemodiff) is missing from this installation")


def _pbtxt_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def write_model_repository(repo: Path, values: dict[str, str]) -> Path:
    """Fill config.pbtxt and copy model.py into `repo/nemodiff/`; returns the model folder."""
    source = model_repo_source() / MODEL_NAME
    model_dir = repo / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    template = string.Template((source / "config.pbtxt").read_text())
    (model_dir / "config.pbtxt").write_text(template.substitute({k: _pbtxt_string(v) for k, v in values.items()}))
    shutil.copyfile(source / "1" / "model.py", model_dir / "1" / "model.py")
    return model_dir


def find_tritonserver(explicit: Path | None) -> tuple[Path, Path | None, Path | None]:
    """(server binary, python backend folder or None for the container layout, libs folder or None)."""
    if explicit is not None:
        if not explicit.is_file():
            raise click.ClickException(f"--tritonserver {explicit}: no such file")
        return explicit, None, None
    if CONTAINER_SERVER.is_file():
        return CONTAINER_SERVER, None, None
    try:
        import pytriton
    except ImportError:
        raise click.ClickException(
            'no tritonserver found: run inside NVIDIA\'s Triton container, or pip install "nemodiff[serve]" '
            "(the nvidia-pytriton wheel ships one)") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise click.ClickException(f"the nvidia-pytriton wheel has no tritonserver at {binary}; reinstall it")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return binary, root, libs if libs.is_dir() else None


def prepare_backends(wheel_root: Path, into: Path) -> Path:
    """A backend folder whose python backend runs this interpreter (the wheel ships one stub per version)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise click.ClickException(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    python_dir = into / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = python_dir / name
        if not link.exists():
            link.symlink_to(wheel_root / "backends" / "python" / name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")  # found next to the backend; must be a copy
    return into
