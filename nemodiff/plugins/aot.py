"""Ahead-of-time kernels, build side: compile variants to cubins, with the index a launcher reads.

checkpoint ──builder (`compile_variants`)──▶ engine dir/kernels/<sm>/ ──runtime (nemodiff/plugins/aot_launch.py)──▶ serving

Build side (no GPU needed): `triton.compile` turns each `KernelVariant` into a cubin for one
GPU architecture, written as `<variant.key>.cubin`, plus `kernels.json`, which records all a
launcher needs: the kernel's entry name, warps, dynamic shared memory, its runtime parameters
in order, the scratch pointers Triton appends to every kernel, and the Triton version.

Serve side (no compiler): nemodiff/plugins/aot_launch.py. Every pointer argument is compiled as 16-byte
aligned (the divisibility hint Triton's JIT gives aligned tensors); the launcher checks that
before every launch, and `kernels="aot-check"` checks every other assumption on the CPU
(nemodiff/plugins/aot_check.py).

Triton versions: 3.6 and 3.9 (the range this is checked against) take the same
`ASTSource(fn, signature, constexprs, attrs)`: the signature maps every argument name to its
type, constexprs included as "constexpr"; constexpr values and attributes are keyed by
`(argument index,)`. Both append two pointer parameters to every kernel (global and profile
scratch), which the index records from the PTX entry itself. Each cubin's PTX is checked to
target the requested architecture (`sm_90a`/`sm_100a` need their arch-specific features).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from .aot_launch import INDEX_FILE, INDEX_FORMAT
from .registry import kernel_function
from .spec import KernelVariant

POINTER_ALIGNMENT = 16
FP_FUSION = True  # Triton's JIT default (multiply-add contraction); stated so AOT builds do not depend on it
SM_TO_CAPABILITY = {"sm_80": 80, "sm_89": 89, "sm_90a": 90, "sm_100a": 100}
# Parameters Triton appends after the kernel's own, in order. Triton 3.6 and 3.9 both append a
# global-scratch and a profile-scratch pointer (NULL unless the kernel reports a scratch size).
SCRATCH_PARAMS = ("global_scratch", "profile_scratch")


REGISTER_FILE = 65536  # 32-bit registers one block may hold on sm_80 .. sm_100
REGISTER_UNIT = 8  # registers are given to threads in multiples of this
EIATTR_REGCOUNT = 0x2F  # the .nv.info attribute holding a function's register count


class KernelBuildError(RuntimeError):
    """Compiling the kernels failed; the message carries the compiler's error."""


def cubin_registers(cubin: bytes) -> int:
    """Registers per thread of the kernel in a cubin (an ELF file): the REGCOUNT attribute of its
    `.nv.info` section, which the driver reads at load. 0 when the file carries none."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise KernelBuildError("not a 64-bit ELF cubin")
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strings = sections[names][4]
    found = 0
    for section in sections:
        start = strings + section[0]
        if cubin[start:cubin.index(b"\0", start)] != b".nv.info":
            continue
        at, end = section[4], section[4] + section[5]
        while at + 4 <= end:  # entries: format u8, attribute u8, then a u16 size (format 4) or a u16 value
            form, attribute = cubin[at], cubin[at + 1]
            size = struct.unpack_from("<H", cubin, at + 2)[0] if form == 4 else 0
            if form == 4 and attribute == EIATTR_REGCOUNT:
                found = max(found, struct.unpack_from("<I", cubin, at + 8)[0])
            at += 4 + size
    return found


def register_demand(registers: int, num_warps: int) -> int:
    """Registers a block of `num_warps` warps takes: per thread rounded up to REGISTER_UNIT."""
    return -(-registers // REGISTER_UNIT) * REGISTER_UNIT * 32 * num_warps


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
    registers = cubin_registers(compiled.asm["cubin"])
    if register_demand(registers, meta.num_warps) > REGISTER_FILE:
        raise KernelBuildError(f"{variant.key}: {registers} registers x {32 * meta.num_warps} threads exceed the "
                               f"{REGISTER_FILE} registers of a block on {sm}: the kernel cannot launch")
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
        "registers": registers,
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


if __name__ == "__main__":
    _compile_worker(sys.argv[1], Path(sys.argv[2]))
