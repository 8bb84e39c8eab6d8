"""Ahead-of-time kernels: compile variants to cubins at build time, launch them at serve time.

checkpoint ──builder (`compile_variants`)──▶ engine dir/kernels/<sm>/ ──runtime (`AotLauncher`)──▶ Triton

Build side (no GPU needed): `triton.compile` turns each `KernelVariant` into a cubin for one
GPU architecture, written as `<variant.key>.cubin`, plus `kernels.json`, which records all a
launcher needs: the kernel's entry name, warps, dynamic shared memory, its runtime parameters
in order, the scratch pointers Triton appends to every kernel, and the Triton version.

Serve side (no compiler): `AotLauncher` loads cubins lazily through the CUDA driver API
(cuda-python) and launches them with `cuLaunchKernel` on torch's current stream, so CUDA-graph
capture records the launches like any other kernel.

Every pointer argument is compiled as 16-byte aligned (the divisibility hint Triton's JIT
gives aligned tensors); the launcher checks that before it launches.

Triton versions: 3.6 and 3.9 (the range this is checked against) take the same
`ASTSource(fn, signature, constexprs, attrs)`: the signature maps every argument name to its
type, constexprs included as "constexpr"; constexpr values and attributes are keyed by
`(argument index,)`. Both append two pointer parameters to every kernel (global and profile
scratch), which the index records from the PTX entry itself. Each cubin's PTX is checked to
target the requested architecture (`sm_90a`/`sm_100a` need their arch-specific features).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from .registry import kernel_function
from .spec import KernelVariant

INDEX_FILE = "kernels.json"
INDEX_FORMAT = 1
POINTER_ALIGNMENT = 16
FP_FUSION = True  # Triton's JIT default (multiply-add contraction); stated so AOT builds do not depend on it
SM_TO_CAPABILITY = {"sm_80": 80, "sm_89": 89, "sm_90a": 90, "sm_100a": 100}
# Parameters Triton appends after the kernel's own, in order. Triton 3.6 and 3.9 both append a
# global-scratch and a profile-scratch pointer (NULL unless the kernel reports a scratch size).
SCRATCH_PARAMS = ("global_scratch", "profile_scratch")
SCALAR_TYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
                "fp32": ctypes.c_float, "fp64": ctypes.c_double, "i1": ctypes.c_int8}


class KernelBuildError(RuntimeError):
    """Compiling the kernels failed; the message carries the compiler's error."""


class KernelLaunchError(RuntimeError):
    """A kernel could not be found, loaded or launched; the message says which and why."""


# -- build side ----------------------------------------------------------------------------------

def _jit_function(fn):
    """A JITFunction for `fn` (under TRITON_INTERPRET=1, `@triton.jit` returns an interpreter wrapper)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _ast_source(fn, variant: KernelVariant):
    """Triton's ASTSource for `variant`: signature by argument name (constexprs typed "constexpr"),
    constexpr values and the pointer-alignment attributes, keyed by argument index."""
    from triton.compiler import ASTSource

    runtime = dict(variant.signature)
    constants = variant.constexpr_dict()
    expected = list(fn.arg_names)
    if sorted(expected) != sorted([*runtime, *constants]):
        raise ValueError(f"variant {variant.key}: arguments {[*runtime, *constants]} do not match "
                         f"{variant.kernel}'s parameters {expected}")
    order = [name for name in expected if name in runtime]
    if order != [name for name, _ in variant.signature]:
        raise ValueError(f"variant {variant.key}: runtime arguments must follow the kernel's order {order}")
    signature = {name: runtime.get(name, "constexpr") for name in expected}
    constexprs = {(expected.index(name),): value for name, value in constants.items()}
    attrs = {(expected.index(name),): [["tt.divisibility", POINTER_ALIGNMENT]]
             for name, kind in variant.signature if kind.startswith("*")}
    return ASTSource(fn, signature, constexprs, attrs)


def _ptx_param_count(ptx: str, entry: str) -> int:
    match = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\(([^)]*)\)", ptx)
    if match is None:
        raise KernelBuildError(f"entry {entry} not found in the generated PTX")
    return len(re.findall(r"\.param\s", match.group(1)))


def compile_variant(variant: KernelVariant, sm: str) -> tuple[bytes, dict]:
    """(cubin, index entry) for one variant on one architecture."""
    import triton
    from triton.backends.compiler import GPUTarget

    if sm not in SM_TO_CAPABILITY:
        raise ValueError(f"no Triton target for {sm!r}; known: {', '.join(SM_TO_CAPABILITY)}")
    capability = SM_TO_CAPABILITY[sm]
    fn = _jit_function(kernel_function(variant.kernel))
    compiled = triton.compile(_ast_source(fn, variant), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages,
                                       "enable_fp_fusion": FP_FUSION})
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    if target is None or target.group(1) != sm:
        raise KernelBuildError(f"{variant.key}: PTX targets {target and target.group(1)}, expected {sm}")
    meta = compiled.metadata
    extra = _ptx_param_count(ptx, meta.name) - len(variant.signature)
    if not 0 <= extra <= len(SCRATCH_PARAMS):
        raise KernelBuildError(f"{variant.key}: {extra} unexpected trailing kernel parameters (Triton "
                                f"{triton.__version__}); the launcher knows {', '.join(SCRATCH_PARAMS)}")
    sizes = {"global_scratch": (getattr(meta, "global_scratch_size", 0) or 0,
                                getattr(meta, "global_scratch_align", 1) or 1),
             "profile_scratch": (getattr(meta, "profile_scratch_size", 0) or 0,
                                 getattr(meta, "profile_scratch_align", 1) or 1)}
    entry = {
        "key": variant.key,
        "kernel": variant.kernel,
        "name": meta.name,
        "file": f"{variant.key}.cubin",
        "num_warps": meta.num_warps,
        "num_stages": variant.num_stages,
        "shared": meta.shared,
        "params": [list(p) for p in variant.signature],
        "constexprs": [list(c) for c in variant.constexprs],
        "scratch": [{"name": name, "size": sizes[name][0], "align": sizes[name][1]} for name in SCRATCH_PARAMS[:extra]],
        "pointer_alignment": POINTER_ALIGNMENT,
    }
    return compiled.asm["cubin"], entry


def variant_to_json(variant: KernelVariant) -> dict:
    return {"kernel": variant.kernel, "signature": variant.signature, "constexprs": variant.constexprs,
            "num_warps": variant.num_warps, "num_stages": variant.num_stages}


def variant_from_json(data: dict) -> KernelVariant:
    return KernelVariant(kernel=data["kernel"], signature=tuple(tuple(p) for p in data["signature"]),
                         constexprs=tuple(tuple(c) for c in data["constexprs"]), num_warps=data["num_warps"],
                         num_stages=data["num_stages"])


def compile_variants(variants: list[KernelVariant], sm: str, out_dir: Path, progress=None,
                     jobs: int | None = None) -> list[dict]:
    """Compile every variant for `sm` into out_dir/<key>.cubin and write out_dir/kernels.json.

    The compiler runs in child Python processes (`jobs` of them, default: one per CPU up to 8,
    each taking a share of the variants): Triton's interpreter mode (TRITON_INTERPRET=1, as in
    the test suite) changes how `@triton.jit` library functions behave and breaks code
    generation in the same process, and the children keep the caller's Triton state untouched.
    progress: optional callable(total) returning an object with update(n) and close().
    Returns the index entries, in the order of `variants`."""
    import triton

    if sm not in SM_TO_CAPABILITY:
        raise ValueError(f"no Triton target for {sm!r}; known: {', '.join(SM_TO_CAPABILITY)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = max(1, min(jobs or min(os.cpu_count() or 1, 8), len(variants)))
    shares = [variants[i::jobs] for i in range(jobs)]
    children = []
    bar = progress(len(variants)) if progress else None
    found: dict[str, dict] = {}
    try:
        for share in shares:
            child = subprocess.Popen([sys.executable, "-m", "nemodiff.plugins.aot", sm, str(out_dir)], env=env,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            child.stdin.write(json.dumps([variant_to_json(v) for v in share]))
            child.stdin.close()
            children.append(child)
        for child, share in zip(children, shares):
            count = 0
            for line in child.stdout:
                entry = json.loads(line)
                found[entry["key"]] = entry
                count += 1
                if bar:
                    bar.update(1)
            errors = child.stderr.read()
            if child.wait() != 0 or count != len(share):
                raise KernelBuildError(f"compiling kernels for {sm} failed:\n{errors.strip()[-3000:]}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        if bar:
            bar.close()
    entries = [found[v.key] for v in variants]
    index = {"format": INDEX_FORMAT, "sm": sm, "capability": SM_TO_CAPABILITY[sm],
             "triton_version": triton.__version__, "kernels": {e["key"]: e for e in entries}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return entries


def _compile_worker(sm: str, out_dir: Path) -> None:
    """Child side of `compile_variants`: variants as JSON on stdin, one index entry per line on stdout."""
    for variant in [variant_from_json(v) for v in json.loads(sys.stdin.read())]:
        cubin, entry = compile_variant(variant, sm)
        (out_dir / entry["file"]).write_bytes(cubin)
        print(json.dumps(entry), flush=True)


# -- serve side ----------------------------------------------------------------------------------

def pack_arguments(params: list, args: tuple, pointer_alignment: int = POINTER_ALIGNMENT) -> list:
    """One ctypes value per kernel parameter, from the signature `params` ((name, type) pairs).

    Pointers ("*bf16", ...) take a tensor (its data_ptr(), checked for alignment) or None (NULL);
    scalars ("i32", "i64", "fp32", ...) take Python numbers."""
    if len(params) != len(args):
        raise KernelLaunchError(f"expected {len(params)} arguments ({', '.join(n for n, _ in params)}), "
                                f"got {len(args)}")
    values = []
    for (name, kind), arg in zip(params, args):
        if kind.startswith("*"):
            address = 0 if arg is None else arg.data_ptr()
            if address % pointer_alignment:
                raise KernelLaunchError(f"argument {name}: address {address:#x} is not {pointer_alignment}-byte "
                                        "aligned, but the kernel was compiled for aligned pointers")
            values.append(ctypes.c_uint64(address))
        elif kind in SCALAR_TYPES:
            if isinstance(arg, torch.Tensor):
                raise KernelLaunchError(f"argument {name}: expected a {kind} scalar, got a tensor")
            values.append(SCALAR_TYPES[kind](float(arg) if kind.startswith("fp") else int(arg)))
        else:
            raise KernelLaunchError(f"argument {name}: unsupported parameter type {kind!r}")
    return values


def parameter_array(values: list) -> ctypes.Array:
    """The `void**` array cuLaunchKernel reads: one pointer to each value (keep `values` alive)."""
    return (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])


def cuda_driver():
    """The CUDA driver API module of cuda-python (`cuda.bindings.driver`, or the older `cuda.cuda`)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6
    return driver


class AotLauncher:
    """Launches the cubins of one engine's kernels/<sm>/ folder; no compiler involved."""

    name = "aot"

    def __init__(self, kernel_dir: Path):
        self.kernel_dir = Path(kernel_dir)
        index_path = self.kernel_dir / INDEX_FILE
        if not index_path.is_file():
            raise KernelLaunchError(f"{index_path}: not found; build the engine with kernels for this GPU")
        index = json.loads(index_path.read_text())
        if index.get("format") != INDEX_FORMAT:
            raise KernelLaunchError(f"{index_path}: index format {index.get('format')!r} is not {INDEX_FORMAT}")
        self.sm = index["sm"]
        self.triton_version = index["triton_version"]
        self.entries: dict[str, dict] = index["kernels"]
        self._cu = None  # the CUDA driver module, imported with the first cubin
        self._functions: dict[str, object] = {}
        self._modules: list = []

    def _check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise KernelLaunchError(f"{what} failed: {err!r}")
        return rest[0] if len(rest) == 1 else rest

    def _ensure_context(self, device: torch.device | None) -> None:
        """Make torch's primary context current on this thread (the driver API needs one)."""
        cu = self._cu
        context = self._check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(context) == 0:
            index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
            device = self._check(cu.cuDeviceGet(index), "cuDeviceGet")
            primary = self._check(cu.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
            self._check(cu.cuCtxSetCurrent(primary), "cuCtxSetCurrent")

    def _function(self, variant: KernelVariant, device: torch.device | None):
        fn = self._functions.get(variant.key)
        if fn is not None:
            return fn
        entry = self.entries.get(variant.key)
        if entry is None:
            raise KernelLaunchError(
                f"kernel variant {variant.key} ({variant.kernel}, {dict(variant.constexprs)}) is not in "
                f"{self.kernel_dir / INDEX_FILE}; rebuild the engine with this nemodiff version")
        if self._cu is None:
            self._cu = cuda_driver()
        self._ensure_context(device)
        cu = self._cu
        module = self._check(cu.cuModuleLoadData((self.kernel_dir / entry["file"]).read_bytes()),
                             f"loading {entry['file']}")
        self._modules.append(module)
        fn = self._check(cu.cuModuleGetFunction(module, entry["name"].encode()), f"finding {entry['name']}")
        if entry["shared"] > 48 * 1024:
            self._check(cu.cuFuncSetAttribute(
                fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, entry["shared"]),
                f"allowing {entry['shared']} bytes of shared memory for {entry['name']}")
        self._functions[variant.key] = fn
        return fn

    def launch(self, variant: KernelVariant, grid: tuple[int, ...], args: tuple) -> None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        fn = self._function(variant, device)
        entry = self.entries[variant.key]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        values = pack_arguments(entry["params"], args, entry["pointer_alignment"])
        scratch = []
        for item in entry["scratch"]:
            if item["size"]:
                buffer = torch.empty(grid[0] * grid[1] * grid[2] * item["size"] + item["align"], dtype=torch.uint8,
                                     device=device)
                scratch.append(buffer)
                address = buffer.data_ptr()
                values.append(ctypes.c_uint64(address + (-address) % item["align"]))
            else:
                values.append(ctypes.c_uint64(0))
        params = parameter_array(values)
        stream = torch.cuda.current_stream(device).cuda_stream
        cu = self._cu

        def launch():
            return cu.cuLaunchKernel(fn, *grid, 32 * entry["num_warps"], 1, 1, entry["shared"], stream,
                                     ctypes.addressof(params), 0)

        result = launch()
        if result[0] == cu.CUresult.CUDA_ERROR_INVALID_CONTEXT:  # a thread that has not touched CUDA yet
            self._ensure_context(device)
            result = launch()
        self._check(result, f"launching {entry['name']}")


if __name__ == "__main__":
    _compile_worker(sys.argv[1], Path(sys.argv[2]))
