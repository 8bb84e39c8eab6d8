"""Launchers: how a kernel variant runs. The same host wrapper code drives all of them.

checkpoint ──builder──▶ engine dir/kernels/<sm>/ ──[runtime: launchers]──▶ Triton

- `InterpretLauncher`: the kernel's real Python body under Triton's interpreter, on CPU tensors.
  This is how CI proves every kernel, and what `kernels="interpret"` runs the model with.
- `JitLauncher`: Triton's just-in-time compiler on a GPU (development and benchmarks).
- The ahead-of-time launcher (cubins compiled at build time, no compiler at serve time)
  lives in `nemodiff/plugins/aot.py`.

Kernels must not call other `@triton.jit` functions: the interpreter path wraps each kernel's
Python function on its own, and nested jit calls do not survive that.
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

from .registry import kernel_function
from .spec import KernelVariant


class Launcher(Protocol):
    name: str
    launches: int  # launches so far (benchmarks count by it)

    def launch(self, variant: KernelVariant, grid: tuple[int, ...], args: tuple) -> None:
        """Run `variant` over `grid` with the runtime arguments `args` (in signature order)."""


def use_interpreter() -> None:
    """Make Triton run kernels under its interpreter in this process.

    Triton wraps its own library functions (`tl.sum`, ...) for the interpreter only when
    TRITON_INTERPRET=1 is set at its first import. nemodiff imports Triton only when kernels are
    loaded, so the variable is set here when Triton is not loaded yet; a process that already
    imported Triton for its compiler gets a clear error instead of a failure inside a kernel."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    from triton import language

    if type(language.standard.sum).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton was imported in this process before the interpreter was chosen; set "
                           "TRITON_INTERPRET=1 in the environment to run kernels under the interpreter")


class InterpretLauncher:
    """Runs kernels through `triton.runtime.interpreter` on CPU tensors."""

    name = "interpret"

    def __init__(self):
        use_interpreter()
        from triton.runtime.interpreter import InterpretedFunction

        self._wrap = InterpretedFunction
        self._cache: dict[str, object] = {}
        self.launches = 0

    def launch(self, variant: KernelVariant, grid: tuple[int, ...], args: tuple) -> None:
        self.launches += 1
        fn = self._cache.get(variant.kernel)
        if fn is None:
            jitted = kernel_function(variant.kernel)
            fn = self._cache[variant.kernel] = jitted if isinstance(jitted, self._wrap) else self._wrap(jitted.fn)
        fn[grid](*args, **variant.constexpr_dict())


class JitLauncher:
    """Triton's JIT on a GPU: compiles each variant on first use."""

    name = "jit"

    def __init__(self):
        self.launches = 0

    def launch(self, variant: KernelVariant, grid: tuple[int, ...], args: tuple) -> None:
        self.launches += 1
        kernel_function(variant.kernel)[grid](*args, **variant.constexpr_dict(), num_warps=variant.num_warps,
                                              num_stages=variant.num_stages)
