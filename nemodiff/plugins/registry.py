"""The explicit list of kernel modules, and lookups across them.

checkpoint ──builder (compiles `engine_variants`)──▶ engine dir ──runtime (launches by name)──▶ Triton

Every kernel module in `nemodiff/plugins/` defines:
  KERNELS: dict[str, JITFunction]           registry name -> `@triton.jit` kernel
  variants(config: ModelConfig, dtype: str) -> list[KernelVariant]
      every specialisation an engine of this model config and dtype ("fp32", "bf16", "fp16",
      "fp8") may launch; the builder compiles exactly these for the target arch.
"""

from __future__ import annotations

import importlib

from nemodiff.engine_format import ModelConfig

from .spec import KernelVariant

KERNEL_MODULES: tuple[str, ...] = ("attention", "norm", "activation", "fp8_gemm")  # in nemodiff.plugins


def _module(name: str):
    return importlib.import_module(f"nemodiff.plugins.{name}")


def kernel_function(kernel: str):
    """The `@triton.jit` function registered as `kernel`."""
    for name in KERNEL_MODULES:
        kernels = _module(name).KERNELS
        if kernel in kernels:
            return kernels[kernel]
    raise KeyError(f"no kernel named {kernel!r} in {', '.join(KERNEL_MODULES) or 'any kernel module'}")


def engine_variants(config: ModelConfig, dtype: str) -> list[KernelVariant]:
    """Every kernel variant an engine of `config` in `dtype` may launch, without duplicates."""
    seen: dict[str, KernelVariant] = {}
    for name in KERNEL_MODULES:
        for variant in _module(name).variants(config, dtype):
            seen.setdefault(variant.key, variant)
    return list(seen.values())
