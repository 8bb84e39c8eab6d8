"""Loading an engine directory: manifest check, config, weights (checked against the config), draft adapter.

checkpoint ──builder──▶ engine dir ──[runtime: loader]──▶ Triton

Before a tensor is read, the engine is checked end to end (`check_engine`): config.json's every key
typed and in range, every file the runtime reads listed in the manifest with its hash (a plain file
inside the engine), and the safetensors headers against the config: every tensor the model needs,
none it does not, each of the shape and dtype the config implies. A broken engine is refused with
one line that names the file and the problem. A tensor-parallel engine is loaded one rank at a time:
rank r reads (and checks against the manifest) only its own shards; rank 0 also checks every file
that is not another rank's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nemodiff.device import Platform, compute_dtype, resolve_device
from nemodiff.engine_format import (
    VISION_WEIGHTS_FILE,
    EngineConfig,
    EngineFormatError,
    draft_lora_file,
    open_engine,
    weights_file,
)
from nemodiff.plugins.ops import load_kernels
from nemodiff.sharding import shard_bounds

from .transformer import TORCH_DTYPES, Model

# engine dtype -> safetensors dtype of the plain tensors, and of the linear weights
STORED = {"fp32": ("F32", "F32"), "bf16": ("BF16", "BF16"), "fp16": ("F16", "F16"), "fp8": ("BF16", "F8_E4M3")}


@dataclass
class LoadedEngine:
    path: Path
    config: EngineConfig
    model: Model


def runtime_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    return compute_dtype(TORCH_DTYPES[config.build.dtype], device)


def expected_weights(config: EngineConfig, rank: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype) of rank `rank`'s weight file (engine_format.py, WEIGHT NAMES)."""
    m, b = config.model, config.build
    tp, h, hd = b.tp, m.hidden_size, m.head_dim
    plain, linear = STORED[b.dtype]

    def share(total: int) -> int:
        start, end = shard_bounds(total, rank, tp)
        return end - start

    heads, kv_heads, inter = m.num_attention_heads // tp, m.num_key_value_heads // tp, share(m.intermediate_size)
    want = {"embed": ((m.vocab_size, h), plain), "final_norm": ((h,), plain), "head": ((share(m.vocab_size), h), plain)}
    for i in range(m.num_hidden_layers):
        p = f"layers.{i}."
        want |= {p + "attn_norm": ((h,), plain), p + "mlp_norm": ((h,), plain)}
        for name, shape in (("qkv", ((heads + 2 * kv_heads) * hd, h)), ("o", (h, heads * hd)),
                            ("gate_up", (2 * inter, h)), ("down", (h, inter))):
            want[p + name] = (shape, linear)
            if b.dtype == "fp8":
                want[p + name + ".scale"] = ((shape[0],), "F32")
    return want


def expected_lora(config: EngineConfig, rank: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    m, b = config.model, config.build
    r, plain = b.lora.rank, STORED[b.dtype][0]
    q_out = m.num_attention_heads // b.tp * m.head_dim
    return {name: shape for i in range(m.num_hidden_layers)
            for name, shape in ((f"layers.{i}.lora_a", ((r, q_out), plain)),
                                (f"layers.{i}.lora_b", ((m.hidden_size, r), plain)))}


def expected_vision(config: EngineConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    v, plain = config.vision, STORED[config.build.dtype][0]
    h, i, p, merge, text = v.hidden_size, v.intermediate_size, v.patch_size, v.spatial_merge_size, v.text_hidden_size
    shapes = {"patch_conv": (h, v.num_channels, p, p), "ln_pre": (h,), "projector.norm": (h,),
              "projector.merge": (h, h * merge * merge), "projector.linear_1": (text, h),
              "projector.linear_2": (text, text)}
    for layer in range(v.num_hidden_layers):
        q = f"layers.{layer}."
        shapes |= {q + "attn_norm": (h,), q + "qkv": (3 * h, h), q + "o": (h, h), q + "ffn_norm": (h,),
                   q + "gate_up": (2 * i, h), q + "down": (h, i)}
    return {name: (shape, plain) for name, shape in shapes.items()}


def check_tensors(path: Path, want: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The safetensors file at `path` holds exactly `want` (names, shapes, dtypes): its header is read, no data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types, none naming the file
        raise EngineFormatError(f"{path}: unreadable safetensors file ({str(exc)[:200]})") from None
    missing = [name for name in want if name not in found]
    if missing:
        raise EngineFormatError(f"{path}: no tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if
                                len(missing) > 1 else "") + "; config.json describes a model these weights are not")
    for name, got in found.items():
        if name not in want:
            raise EngineFormatError(f"{path}: unexpected tensor {name!r}; config.json describes a model these "
                                    "weights are not")
        if got != want[name]:
            raise EngineFormatError(f"{path}: tensor {name!r} is {got[1]} {list(got[0])}, config.json implies "
                                    f"{want[name][1]} {list(want[name][0])}")


def check_engine(engine_dir: Path, rank: int | None = None, verify: bool = True) -> EngineConfig:
    """Everything but reading the tensors: config, manifest (with `verify`) and the weight files' headers
    against the config. rank None: every rank's files; rank r: that rank's (see `open_engine`)."""
    engine_dir = Path(engine_dir)
    config, _ = open_engine(engine_dir, verify=verify, rank=rank)
    b = config.build
    for r in range(b.tp) if rank is None else [rank]:
        check_tensors(engine_dir / weights_file(r, b.tp), expected_weights(config, r))
        if b.lora is not None:
            check_tensors(engine_dir / draft_lora_file(r, b.tp), expected_lora(config, r))
    if config.vision is not None and rank in (None, 0):
        check_tensors(engine_dir / VISION_WEIGHTS_FILE, expected_vision(config))
    return config


def _read(path: Path, platform: Platform) -> dict[str, torch.Tensor]:
    try:
        return platform.own_memory(load_file(str(path)))
    except Exception as exc:
        raise EngineFormatError(f"{path}: unreadable safetensors file ({str(exc)[:200]})") from None


def load_engine(engine_dir: Path, device: str | torch.device | None = None, verify: bool = True,
                rank: int = 0, kernels: str = "auto", sm_count: int | None = None) -> LoadedEngine:
    """The engine's model (rank `rank`'s shard of a tensor-parallel engine) on `device`; kernels is the
    `plugins.ops.load_kernels` mode; sm_count plans split grids for a GPU of that many SMs (None: the
    device's own)."""
    engine_dir = Path(engine_dir)
    config = check_engine(engine_dir, rank=rank, verify=verify)
    tp = config.build.tp
    device = resolve_device(device)
    if sm_count is not None and (not isinstance(sm_count, int) or not 1 <= sm_count <= 1024):
        raise ValueError(f"sm_count must be an integer in 1..1024, got {sm_count!r}")
    platform = Platform.for_kernels(device, kernels, sm=config.build.sm, sm_count=sm_count)
    with platform.on_device():  # whatever device the caller's thread had current
        weights = _read(engine_dir / weights_file(rank, tp), platform)
        lora = None
        if config.build.lora is not None:
            lora = _read(engine_dir / draft_lora_file(rank, tp), platform)
        dtype = runtime_dtype(config, device)
        library = load_kernels(engine_dir, config.build, device, mode=kernels, platform=platform,
                               sm_count=sm_count)
        model = Model(config.model, weights, dtype, platform, lora=lora,
                      lora_scale=config.build.lora.scale if config.build.lora else 1.0, kernels=library, tp_size=tp)
    return LoadedEngine(engine_dir, config, model)
