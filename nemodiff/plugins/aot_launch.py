"""Launching ahead-of-time kernels: the cubins of an engine's kernels/<sm>/ folder, no compiler.

checkpoint ──builder──▶ engine dir/kernels/<sm>/ ──[runtime: AotLauncher]──▶ serving

`AotLauncher.launch(variant, grid, args)` finds the variant's entry in `kernels.json` (by its key),
packs the arguments into the parameter buffer `cuLaunchKernel` reads and hands it to a driver:
- `CudaDriver` (nemodiff/cuda_driver.py) on a GPU: the cubin, in its device's context, on torch's current stream;
- `InterpretDriver` (nemodiff/plugins/aot_check.py) on the CPU under `kernels="aot-check"`: every argument
  is first checked against what the cubin was compiled to assume, then the same Triton function
  runs under the interpreter on the same tensors.

Everything up to the driver call is the same code on both, so CI runs it.

Host cost per launch is kept small (it is paid ~12 times per layer on every forward that is not
replayed from a CUDA graph): a variant's entry, its loaded function and an argument packer are
prepared once and found by the variant's key; the packer is a function generated for the
kernel's signature that writes every value into a reused parameter buffer with one
`struct.pack_into` and checks pointer alignment with one bitwise test. A call plan's launches
(nemodiff/plugins/ops.py) go further: `bind` packs a launch's constant arguments once into a block of its
own, and each later call writes only its input tensors' addresses.
"""

from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import torch

from nemodiff.device import KernelLaunchError
from nemodiff.engine_format import size_problem

from .spec import KernelVariant

INDEX_FILE = "kernels.json"
INDEX_FORMAT = 1
SLOT_BYTES = 8  # every kernel parameter gets its own 8-byte slot in the parameter buffer
PACK_ERRORS = (TypeError, ValueError, RuntimeError, struct.error)
STRUCT_CODES = {"i32": "i", "i64": "q", "u32": "I", "u64": "Q", "fp32": "f", "fp64": "d", "i1": "b"}


def read_index(kernel_dir: Path) -> dict:
    index_path = Path(kernel_dir) / INDEX_FILE
    if not index_path.is_file():
        raise KernelLaunchError(f"{index_path}: not found; build the engine with kernels for this GPU")
    problem = size_problem(index_path)
    if problem:
        raise KernelLaunchError(problem)
    index = json.loads(index_path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise KernelLaunchError(f"{index_path}: index format {index.get('format')!r} is not {INDEX_FORMAT}")
    return index


class ArgumentPacker:
    """Writes one kernel's arguments (and its scratch pointers) into a reused parameter buffer.

    `address` is the `void**` array cuLaunchKernel reads (one pointer to each slot); the driver copies
    the values at launch, so the buffer is rewritten by the next launch of the same kernel."""

    def __init__(self, kernel: str, params: list, scratch: int, alignment: int):
        self.kernel, self.params, self.alignment = kernel, [tuple(p) for p in params], alignment
        count = len(self.params) + scratch
        self.buffer = ctypes.create_string_buffer(SLOT_BYTES * max(count, 1))
        base = ctypes.addressof(self.buffer)
        self.pointers = (ctypes.c_void_p * max(count, 1))(*[base + SLOT_BYTES * i for i in range(max(count, 1))])
        self.address = ctypes.addressof(self.pointers)
        codes = []
        for name, kind in self.params:
            if kind.startswith("*"):
                code = "Q"
            elif kind in STRUCT_CODES:
                code = STRUCT_CODES[kind]
            else:
                raise KernelLaunchError(f"{kernel}: argument {name}: unsupported parameter type {kind!r}")
            codes.append(code + "x" * (SLOT_BYTES - struct.calcsize("<" + code)))
        codes += ["Q"] * scratch
        self.struct = struct.Struct("<" + "".join(codes))
        self.pack = self._generate(scratch)

    def _generate(self, scratch: int):
        """pack(args, scratch_addresses): a function written for this signature (no per-argument loop)."""
        names = [f"a{i}" for i in range(len(self.params))]
        lines = ["def pack(args, extra):", f"    if len(args) != {len(names)}:", "        wrong_count(args)"]
        if names:
            lines.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = args")
        values, pointers = [], []
        for i, (_, kind) in enumerate(self.params):
            if kind.startswith("*"):
                lines.append(f"    p{i} = 0 if a{i} is None else a{i}.data_ptr()")
                values.append(f"p{i}")
                pointers.append(f"p{i}")
            else:
                values.append(f"{'float' if kind.startswith('fp') else 'int'}(a{i})")
        if pointers:
            lines += [f"    if ({' | '.join(pointers)}) & {self.alignment - 1}:",
                      f"        misaligned(({', '.join(pointers)},))"]
        values += [f"extra[{j}]" for j in range(scratch)]
        lines.append(f"    pack_into(buffer, 0{''.join(', ' + v for v in values)})")
        scope = {"pack_into": self.struct.pack_into, "buffer": self.buffer, "wrong_count": self._wrong_count,
                 "misaligned": self._misaligned}
        exec(compile("\n".join(lines), f"<pack {self.kernel}>", "exec"), scope)  # noqa: S102 (generated from the signature)
        self.fast = scope["pack"]  # the launcher calls this and explains a failure itself

        def pack(args: tuple, extra: tuple = ()) -> None:
            try:
                self.fast(args, extra)
            except PACK_ERRORS as exc:
                self.explain(args, exc)
        return pack

    def explain(self, args: tuple, exc: Exception) -> None:
        """Why packing failed, naming the argument (the fast path says nothing useful)."""
        for (name, kind), arg in zip(self.params, args):
            if kind.startswith("*"):
                if arg is not None and not isinstance(arg, torch.Tensor):
                    raise KernelLaunchError(f"{self.kernel}: argument {name}: expected a tensor or None for {kind}, "
                                            f"got {type(arg).__name__}") from exc
            elif isinstance(arg, torch.Tensor):
                raise KernelLaunchError(f"{self.kernel}: argument {name}: expected a {kind} scalar, got a tensor") from exc
        raise KernelLaunchError(f"{self.kernel}: the arguments do not fit the signature {self.params}: {exc}") from exc

    def _wrong_count(self, args) -> None:
        raise KernelLaunchError(f"{self.kernel}: expected {len(self.params)} arguments "
                                f"({', '.join(n for n, _ in self.params)}), got {len(args)}")

    def _misaligned(self, addresses: tuple) -> None:
        names = [n for n, kind in self.params if kind.startswith("*")]
        for name, address in zip(names, addresses):
            if address % self.alignment:
                raise KernelLaunchError(f"{self.kernel}: argument {name}: address {address:#x} is not "
                                        f"{self.alignment}-byte aligned, but the kernel was compiled for aligned "
                                        "pointers")

    def values(self) -> tuple:
        """The values of the last pack (tests and checks)."""
        return self.struct.unpack_from(self.buffer)


class _Prepared:
    __slots__ = ("entry", "variant", "fn", "packer", "fast", "grid_scratch", "scratch", "null_scratch", "threads",
                 "shared", "name")

    def __init__(self, entry: dict, variant: KernelVariant, fn, packer: ArgumentPacker):
        self.entry, self.variant, self.fn, self.packer, self.fast = entry, variant, fn, packer, packer.fast
        self.scratch = [(item["size"], item["align"]) for item in entry["scratch"]]
        # Triton's scratch pointers are NULL unless the kernel asked for scratch: then they never change
        self.null_scratch = (0,) * len(self.scratch) if not any(size for size, _ in self.scratch) else None
        self.grid_scratch: dict[tuple, tuple] = {}  # grid -> (buffers, addresses)
        self.threads, self.shared, self.name = 32 * entry["num_warps"], entry["shared"], entry["name"]


class AotLauncher:
    """Launches the cubins of one engine's kernels/<sm>/ folder through a driver (see the module docstring)."""

    name = "aot"

    def __init__(self, kernel_dir: Path, driver, checker=None):
        self.kernel_dir = Path(kernel_dir)
        index = read_index(self.kernel_dir)
        self.sm = index["sm"]
        self.triton_version = index["triton_version"]
        self.entries: dict[str, dict] = index["kernels"]
        self.driver = driver
        self.checker = checker  # plugins.aot_check.LaunchChecker under aot-check, else None
        self._prepared: dict[str, _Prepared] = {}
        self.launches = 0

    def _prepare(self, variant: KernelVariant) -> _Prepared:
        entry = self.entries.get(variant.key)
        if entry is None:
            raise KernelLaunchError(
                f"kernel variant {variant.key} ({variant.kernel}, {dict(variant.constexprs)}) is not in "
                f"{self.kernel_dir / INDEX_FILE}; rebuild the engine with this nemodiff version")
        if [tuple(p) for p in entry["params"]] != list(variant.signature):
            raise KernelLaunchError(f"{variant.kernel}: {self.kernel_dir / INDEX_FILE} records parameters "
                                    f"{entry['params']}, the runtime passes {list(variant.signature)}")
        fn = self.driver.load(self.kernel_dir, entry, variant)
        packer = ArgumentPacker(variant.kernel, entry["params"], len(entry["scratch"]), entry["pointer_alignment"])
        prepared = self._prepared[variant.key] = _Prepared(entry, variant, fn, packer)
        return prepared

    def _scratch(self, prepared: _Prepared, grid: tuple) -> tuple:
        """Addresses of the scratch buffers Triton appended to the kernel (NULL when it needs none)."""
        known = prepared.grid_scratch.get(grid)
        if known is None:
            buffers, addresses = [], []
            programs = grid[0] * grid[1] * grid[2]
            for size, align in prepared.scratch:
                if size:
                    buffer = self.driver.scratch(programs * size + align)
                    buffers.append(buffer)
                    address = buffer.data_ptr()
                    addresses.append(address + (-address) % align)
                else:
                    addresses.append(0)
            known = prepared.grid_scratch[grid] = (buffers, tuple(addresses))
        return known[1]

    def launch(self, variant: KernelVariant, grid: tuple[int, ...], args: tuple) -> None:
        prepared = self._prepared.get(variant.key) or self._prepare(variant)
        if len(grid) != 3:
            grid = (*grid, 1, 1)[:3]
        extra = prepared.null_scratch
        try:
            prepared.fast(args, extra if extra is not None else self._scratch(prepared, grid))
        except PACK_ERRORS as exc:
            prepared.packer.explain(args, exc)
        if self.checker is not None:
            self.checker.check(prepared.entry, variant, grid, args, self.sm)
        self.launches += 1
        self.driver.launch(prepared, grid, args)

    def bind(self, variant: KernelVariant, grid: tuple[int, ...], args: tuple, inputs: tuple):
        """This launch, bound: a function of `inputs` (tensors) that launches `variant` on `grid` with `args`,
        each input tensor of `args` replaced by the one the call passes in its place. Every other argument
        (outputs, workspaces, scalars, scratch) is packed once into a parameter block of the binding's own,
        so a call writes only its inputs' addresses (a call plan's launches, nemodiff/plugins/ops.py). None
        where a launch must see every argument: under checks, or a driver that runs the kernel itself."""
        if self.checker is not None or not getattr(self.driver, "packed", False):
            return None
        prepared = self._prepared.get(variant.key) or self._prepare(variant)
        grid = (*grid, 1, 1)[:3]
        extra = prepared.null_scratch if prepared.null_scratch is not None else self._scratch(prepared, grid)
        return BoundLaunch(self, prepared, grid, args, extra, inputs).go


class BoundLaunch:
    """A launch with its constant arguments packed once (see `AotLauncher.bind`): cuLaunchKernel reads one
    pointer per parameter, so the constants' slots and the inputs' slots need not be one block."""

    def __init__(self, launcher: AotLauncher, prepared: _Prepared, grid: tuple, args: tuple, extra: tuple,
                 inputs: tuple):
        packer = prepared.packer
        if len(args) != len(packer.params):
            packer._wrong_count(args)
        self.prepared, self.grid = prepared, grid
        places = [next((i for i, t in enumerate(inputs) if t is arg), None) if isinstance(arg, torch.Tensor) else None
                  for arg in args]
        # the constant tensors (outputs, workspaces) stay alive with the binding; the first call's inputs do not
        self.held = [arg for arg, place in zip(args, places) if place is None and isinstance(arg, torch.Tensor)]
        used = sorted({i for i in places if i is not None})
        codes, values = [], []
        for (name, kind), arg, place in zip(packer.params, args, places):
            if place is not None:
                continue
            if kind.startswith("*"):
                value = 0 if arg is None else arg.data_ptr()
                if value % packer.alignment:
                    raise KernelLaunchError(f"{packer.kernel}: argument {name}: address {value:#x} is not "
                                            f"{packer.alignment}-byte aligned, but the kernel was compiled for "
                                            "aligned pointers")
                codes.append("Q")
            else:
                code = STRUCT_CODES[kind]
                value = float(arg) if kind.startswith("fp") else int(arg)
                codes.append(code + "x" * (SLOT_BYTES - struct.calcsize("<" + code)))
            values.append(value)
        codes += ["Q"] * len(extra)
        values += list(extra)
        constants = struct.Struct("<" + "".join(codes))
        self.constants = ctypes.create_string_buffer(max(constants.size, 1))
        constants.pack_into(self.constants, 0, *values)
        self.inputs = ctypes.create_string_buffer(SLOT_BYTES * max(len(used), 1))
        base_c, base_i = ctypes.addressof(self.constants), ctypes.addressof(self.inputs)
        slots, c = [], 0
        for place in places:
            if place is None:
                slots.append(base_c + SLOT_BYTES * c)
                c += 1
            else:
                slots.append(base_i + SLOT_BYTES * used.index(place))
        slots += [base_c + SLOT_BYTES * (c + j) for j in range(len(extra))]
        self.pointers = (ctypes.c_void_p * max(len(slots), 1))(*slots)
        self.go = self._generate(launcher, used, len(inputs), ctypes.addressof(self.pointers))

    def _generate(self, launcher: AotLauncher, used: list[int], count: int, address: int):
        """go(*inputs): the inputs' addresses into their slots (one pack_into), then the driver's launch."""
        lines = [f"def go({', '.join(f'i{i}' for i in range(count))}):"]
        pointers = [f"p{i}" for i in used]
        lines += [f"    p{i} = i{i}.data_ptr()" for i in used]
        if pointers:
            lines += [f"    if ({' | '.join(pointers)}) & {self.prepared.packer.alignment - 1}:",
                      f"        misaligned(({', '.join(pointers)},))",
                      f"    pack_into(inputs, 0, {', '.join(pointers)})"]
        lines += ["    counter.launches += 1", "    launch(prepared, grid, address)"]
        scope = {"inputs": self.inputs, "pack_into": struct.Struct("<" + "Q" * len(used)).pack_into,
                 "counter": launcher, "launch": launcher.driver.launch_packed, "prepared": self.prepared,
                 "grid": self.grid, "address": address, "misaligned": self._misaligned,
                 "binding": self}  # the parameter block and the constant tensors live as long as `go`
        exec(compile("\n".join(lines), f"<bound {self.prepared.name}>", "exec"), scope)  # noqa: S102 (generated from the launch)
        return scope["go"]

    def _misaligned(self, addresses: tuple) -> None:
        packer = self.prepared.packer
        raise KernelLaunchError(f"{packer.kernel}: an input address among {[hex(a) for a in addresses]} is not "
                                f"{packer.alignment}-byte aligned, but the kernel was compiled for aligned pointers")


class CudaLaunch:
    """The GPU driver of an AotLauncher: loads cubins and launches them with the packed parameters."""

    def __init__(self, cuda_driver):
        self.cuda = cuda_driver  # nemodiff.cuda_driver.CudaDriver

    def load(self, kernel_dir: Path, entry: dict, variant: KernelVariant):
        path = kernel_dir / entry["file"]
        problem = size_problem(path, f"kernels/{entry['file']}")
        if problem:
            raise KernelLaunchError(problem)
        return self.cuda.load(path.read_bytes(), entry["name"], entry["shared"], entry["file"])

    packed = True  # launches from a parameter block alone (`AotLauncher.bind`)

    def launch(self, prepared: _Prepared, grid: tuple, args: tuple) -> None:
        self.cuda.launch(prepared.fn, grid, prepared.threads, prepared.shared, prepared.packer.address, prepared.name)

    def launch_packed(self, prepared: _Prepared, grid: tuple, params_address: int) -> None:
        self.cuda.launch(prepared.fn, grid, prepared.threads, prepared.shared, params_address, prepared.name)

    def scratch(self, nbytes: int) -> torch.Tensor:
        return self.cuda.scratch(nbytes)
