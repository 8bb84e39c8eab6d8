"""What a compiled kernel is: the contract between kernel modules, the builder and the launchers.

checkpoint ──builder (compiles variants)──▶ engine dir/kernels/<sm>/ ──runtime (launches them)──▶ Triton

A kernel module in `nemodiff/plugins/` holds one or more `@triton.jit` kernels, the host wrappers the
model calls, and the PyTorch reference each kernel must match. For ahead-of-time builds it
lists the `KernelVariant`s an engine needs (one per specialisation: dtype, head size, tile
sizes...). A variant names its kernel, the Triton type of every runtime argument, and the
values of every `tl.constexpr`; the builder compiles exactly those, and at run time a
launcher looks a variant up by its `key`, so the host wrapper must build the same variant
from the tensors it is given.

A pointer argument `<name>_ptr` is read densely (contiguous) unless the kernel also takes a
`stride_<name>...` argument for it; the ahead-of-time checker (nemodiff/plugins/aot_check.py) holds
launches to that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import torch

# torch dtype -> Triton pointer element type, as written in compile signatures
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
}


def pointer(dtype: torch.dtype) -> str:
    return "*" + TRITON_TYPES[dtype]


@dataclass(frozen=True)
class KernelVariant:
    """One compilable specialisation of a kernel.

    kernel: the registry name of the `@triton.jit` function (see nemodiff/plugins/registry.py).
    signature: (argument name, Triton type) for every runtime argument, in call order:
        "*bf16", "*fp32", "*i32", ... for pointers, "i32", "i64", "fp32" for scalars.
    constexprs: (name, value) for every `tl.constexpr` argument.
    """

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, int | float | bool | str], ...]
    num_warps: int = 4
    num_stages: int = 2

    @cached_property
    def key(self) -> str:
        """Stable file-name-safe identity: kernel name plus a hash of everything else (computed once per
        variant object; host wrappers keep their variants, so a launch looks its key up, not hashes)."""
        payload = json.dumps([self.signature, self.constexprs, self.num_warps, self.num_stages], sort_keys=True)
        return f"{self.kernel}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    def constexpr_dict(self) -> dict:
        return dict(self.constexprs)
