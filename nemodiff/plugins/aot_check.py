"""`kernels="aot-check"`: the GPU launch path run on the CPU, every launch checked against its cubin.

checkpoint ──builder──▶ engine dir/kernels/<sm>/ ──[runtime: AotLauncher + these]──▶ serving

An engine built for a GPU arch carries cubins and `kernels.json`, which records what each cubin
was compiled to assume. Under aot-check the runtime runs exactly its GPU branch on the CPU
(nemodiff/device.py) and launches through the same `AotLauncher`: the variant is picked by the
same host wrapper, found in `kernels.json` by its key, and its arguments are packed by the same
packer. Then, instead of the driver call:
- `LaunchChecker` checks every argument against the cubin's assumptions: pointer alignment (the
  16-byte divisibility hint of every pointer), element dtypes, the contiguity the kernel relies on
  (a tensor is read densely unless the kernel takes a `stride_<name>` argument for it, and then
  its last dimension is dense and its row stride is that argument), integer ranges of scalar
  arguments, the divisibility a variant's constexprs promise (`ALIGNED`), grid limits, threads per
  block, shared memory and registers x threads (the cubin's register count, in its allocation
  unit) against the arch. A violation raises `KernelLaunchError` naming the
  kernel, the argument and the assumption.
- `InterpretDriver` runs the same `@triton.jit` function under Triton's interpreter on the same
  tensors (with `INTERPRET` set where the kernel has that flag: the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemodiff.device import KernelLaunchError

from .aot import REGISTER_FILE, register_demand
from .launch import use_interpreter
from .registry import kernel_function
from .spec import TRITON_TYPES, KernelVariant

# Dynamic shared memory one block may use, per compile target (CUDA's opt-in maximum).
MAX_SHARED_BYTES = {"sm_80": 163 * 1024, "sm_89": 99 * 1024, "sm_90a": 227 * 1024, "sm_100a": 227 * 1024}
MAX_THREADS = 1024
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
INT_RANGES = {"i32": (-2 ** 31, 2 ** 31 - 1), "u32": (0, 2 ** 32 - 1), "i64": (-2 ** 63, 2 ** 63 - 1),
              "u64": (0, 2 ** 64 - 1), "i1": (0, 1)}
# constexpr flag -> integer arguments it promises to be multiples of 16 (the kernel tells the compiler so)
DIVISIBILITY_FLAGS = {"ALIGNED": ("K", "stride_xm", "k_per_split")}
POINTER_TYPES = {"*" + name: dtype for dtype, name in TRITON_TYPES.items()}


def _stride_args(params: list, pointer: str) -> list[str]:
    base = pointer[:-4] if pointer.endswith("_ptr") else pointer
    return [name for name, kind in params if name.startswith(f"stride_{base}") and not kind.startswith("*")]


class LaunchChecker:
    """Checks one launch against the `kernels.json` entry of its cubin; raises KernelLaunchError."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.checked = 0

    def check(self, entry: dict, variant: KernelVariant, grid: tuple, args: tuple, sm: str) -> None:
        kernel = variant.kernel
        params = [tuple(p) for p in entry["params"]]

        def fail(what: str):
            raise KernelLaunchError(f"{kernel} ({entry['file']}): {what}")

        values = dict(zip((name for name, _ in params), args))
        for name, kind in params:
            arg = values[name]
            if kind.startswith("*"):
                self._check_pointer(name, kind, arg, params, values, entry["pointer_alignment"], fail)
            elif kind in INT_RANGES:
                if isinstance(arg, torch.Tensor) or not isinstance(arg, int):
                    fail(f"argument {name}: expected a Python int for {kind}, got {type(arg).__name__}")
                low, high = INT_RANGES[kind]
                if not low <= arg <= high:
                    fail(f"argument {name}: {arg} is outside the {kind} range [{low}, {high}]")
            elif kind.startswith("fp"):
                if isinstance(arg, torch.Tensor) or not isinstance(arg, (int, float)):
                    fail(f"argument {name}: expected a Python number for {kind}, got {type(arg).__name__}")
        constexprs = variant.constexpr_dict()
        for flag, names in DIVISIBILITY_FLAGS.items():
            if constexprs.get(flag):
                for name in names:
                    if name in values and values[name] % 16:
                        fail(f"argument {name}: {values[name]} is not a multiple of 16, but the variant was "
                             f"compiled with {flag}=True, which promises it")
        for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
            if not 1 <= size <= limit:
                fail(f"grid {grid}: dimension {axis} is {size}; it must be within 1..{limit} (a launch with no "
                     "programs is an error, and programs without work should not be launched)")
        if 32 * entry["num_warps"] > MAX_THREADS:
            fail(f"{entry['num_warps']} warps exceed {MAX_THREADS} threads per block")
        limit = MAX_SHARED_BYTES.get(sm)
        if limit is not None and entry["shared"] > limit:
            fail(f"needs {entry['shared']} bytes of shared memory; {sm} allows {limit} per block")
        registers = entry.get("registers", 0)  # indexes written before registers were recorded carry none
        if register_demand(registers, entry["num_warps"]) > REGISTER_FILE:
            fail(f"{registers} registers x {32 * entry['num_warps']} threads exceed the {REGISTER_FILE} registers "
                 f"of a block on {sm}: the launch would fail")
        self.checked += 1

    def _check_pointer(self, name, kind, arg, params, values, alignment, fail) -> None:
        if arg is None:
            return
        if not isinstance(arg, torch.Tensor):
            fail(f"argument {name}: expected a tensor for pointer type {kind}, got {type(arg).__name__}")
        want = POINTER_TYPES.get(kind)
        if want is not None and arg.dtype != want:
            fail(f"argument {name}: dtype {arg.dtype}, but the cubin was compiled for {kind} ({want})")
        if arg.device != self.device:
            fail(f"argument {name}: tensor on {arg.device}, the engine runs on {self.device}")
        if arg.data_ptr() % alignment:
            fail(f"argument {name}: address {arg.data_ptr():#x} is not {alignment}-byte aligned, but every "
                 f"pointer of the cubin was compiled with a {alignment}-byte divisibility hint")
        strides = _stride_args(params, name)
        if not strides:
            if not arg.is_contiguous():
                fail(f"argument {name}: a tensor of shape {tuple(arg.shape)} and strides {arg.stride()} is not "
                     "contiguous, and the kernel reads it densely (it takes no stride for it)")
        else:
            if arg.dim() and arg.stride(-1) != 1:
                fail(f"argument {name}: its last dimension has stride {arg.stride(-1)}; the kernel reads rows densely")
            if arg.dim() == 2 and len(strides) == 1 and arg.shape[0] > 1 and arg.stride(0) != values[strides[0]]:
                fail(f"argument {name}: row stride {arg.stride(0)} differs from {strides[0]}={values[strides[0]]}")


class InterpretDriver:
    """The aot-check "driver": runs the variant's Triton function under the interpreter."""

    def __init__(self, platform=None):
        use_interpreter()
        from triton.runtime.interpreter import InterpretedFunction

        self.platform = platform  # the emulated GPU: loads and launches are recorded for its device checks

        self._wrap = InterpretedFunction
        self._functions: dict[str, object] = {}

    def load(self, kernel_dir: Path, entry: dict, variant: KernelVariant):
        if not (kernel_dir / entry["file"]).is_file():
            raise KernelLaunchError(f"{kernel_dir / entry['file']}: the cubin of {variant.kernel} is missing")
        if self.platform is not None:
            with self.platform.on_device():  # as CudaDriver pushes its own device's context to load
                self.platform.touch("load")
        fn = self._functions.get(variant.kernel)
        if fn is None:
            jitted = kernel_function(variant.kernel)
            fn = self._functions[variant.kernel] = jitted if isinstance(jitted, self._wrap) else self._wrap(jitted.fn)
        constexprs = variant.constexpr_dict()
        if "INTERPRET" in constexprs:
            constexprs["INTERPRET"] = True
        return fn, constexprs

    def launch(self, prepared, grid: tuple, args: tuple) -> None:
        fn, constexprs = prepared.fn
        if self.platform is not None:
            self.platform.touch("launch")  # on the thread's current device, as cuLaunchKernel
        fn[grid](*args, **constexprs)

    def scratch(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)
