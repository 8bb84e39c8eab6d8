"""Loading an engine directory: manifest check, config, weights, draft adapter.

checkpoint ──builder──▶ engine dir ──[runtime: loader]──▶ Triton
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemodiff.engine_format import DRAFT_LORA_FILE, WEIGHTS_FILE, EngineConfig, EngineFormatError, verify_manifest
from nemodiff.plugins.library import load_kernels

from .model import TORCH_DTYPES, Model


@dataclass
class LoadedEngine:
    path: Path
    config: EngineConfig
    model: Model


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_engine(engine_dir: Path, device: str | torch.device | None = None, verify: bool = True,
                kernels: str = "auto") -> LoadedEngine:
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineFormatError(f"{engine_dir}: not a directory")
    config = EngineConfig.load(engine_dir)
    if verify:
        verify_manifest(engine_dir)
    device = torch.device(device) if device is not None else default_device()
    weights = load_file(str(engine_dir / WEIGHTS_FILE))
    lora = None
    if config.build.lora is not None:
        lora = load_file(str(engine_dir / DRAFT_LORA_FILE))
    dtype = TORCH_DTYPES[config.build.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 matmuls are slow and partly unsupported on CPU
    library = load_kernels(engine_dir, config.build, device, mode=kernels)
    model = Model(config.model, weights, dtype, device, lora=lora,
                  lora_scale=config.build.lora.scale if config.build.lora else 1.0, kernels=library)
    return LoadedEngine(engine_dir, config, model)
