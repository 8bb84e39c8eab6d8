"""Loading an engine directory: manifest check, config, weights, draft adapter.

checkpoint ──builder──▶ engine dir ──[runtime: loader]──▶ Triton

A tensor-parallel engine is loaded one rank at a time: rank r reads (and checks against the
manifest) only its own shards; rank 0 also checks every file that is not another rank's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemodiff.device import Platform, compute_dtype, resolve_device
from nemodiff.engine_format import (
    EngineConfig,
    EngineFormatError,
    draft_lora_file,
    rank_files,
    verify_manifest,
    weights_file,
)
from nemodiff.plugins.ops import load_kernels

from .transformer import TORCH_DTYPES, Model


@dataclass
class LoadedEngine:
    path: Path
    config: EngineConfig
    model: Model


def runtime_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    return compute_dtype(TORCH_DTYPES[config.build.dtype], device)


def verify_rank_files(engine_dir: Path, rank: int, tp: int) -> None:
    """Rank 0 checks everything but the other ranks' shards; rank r > 0 checks its own shards."""
    if rank == 0:
        others = set().union(*(rank_files(r, tp) for r in range(1, tp)))
        verify_manifest(engine_dir, skip=others)
    else:
        verify_manifest(engine_dir, only=rank_files(rank, tp))


def load_engine(engine_dir: Path, device: str | torch.device | None = None, verify: bool = True,
                rank: int = 0, kernels: str = "auto") -> LoadedEngine:
    """The engine's model (rank `rank`'s shard of a tensor-parallel engine) on `device`; kernels is the
    `plugins.ops.load_kernels` mode."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineFormatError(f"{engine_dir}: not a directory")
    config = EngineConfig.load(engine_dir)
    tp = config.build.tp
    if verify:
        verify_rank_files(engine_dir, rank, tp)
    device = resolve_device(device)
    platform = Platform.for_kernels(device, kernels, sm=config.build.sm)
    weights = platform.own_memory(load_file(str(engine_dir / weights_file(rank, tp))))
    lora = None
    if config.build.lora is not None:
        lora = platform.own_memory(load_file(str(engine_dir / draft_lora_file(rank, tp))))
    dtype = runtime_dtype(config, device)
    library = load_kernels(engine_dir, config.build, device, mode=kernels)
    model = Model(config.model, weights, dtype, platform, lora=lora,
                  lora_scale=config.build.lora.scale if config.build.lora else 1.0, kernels=library, tp_size=tp)
    return LoadedEngine(engine_dir, config, model)
