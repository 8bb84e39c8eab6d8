"""Kernel call plans (nemodiff/plugins/ops.py `KernelLibrary._planned`): a call's wrapper work done once per shape.

With `reuse_outputs` the first call of a shape runs the wrapper and records its launches; later calls
launch the recorded variants with their own inputs in place. The cached arguments must be what a fresh
wrapper call builds (the same variant, grid, scalars, and this call's tensors where the inputs go), the
results must equal the reference, and the output is the shape's one preallocated tensor. On a driver that
launches from parameter blocks the later calls are bound launches, which must hand it the same bytes.
"""

import ctypes
import json
import struct

import torch

from nemodiff.builder.convert import quantize_fp8
from nemodiff.plugins import norm
from nemodiff.plugins.aot_launch import AotLauncher
from nemodiff.plugins.launch import InterpretLauncher
from nemodiff.plugins.ops import KernelLibrary


class Recording(InterpretLauncher):
    def __init__(self):
        super().__init__()
        self.calls = []

    def launch(self, variant, grid, args):
        self.calls.append((variant, grid, args))
        super().launch(variant, grid, args)


def same_launch(planned, fresh, inputs) -> None:
    """The planned launch equals the fresh one: variant, grid, every scalar, and tensors of the same shape,
    dtype and contents (outputs after both ran); this call's input tensors stand in their places."""
    (pv, pg, pargs), (fv, fg, fargs) = planned, fresh
    assert pv.key == fv.key and pg == fg and len(pargs) == len(fargs)
    for p, f in zip(pargs, fargs):
        if isinstance(f, torch.Tensor):
            assert p.shape == f.shape and p.dtype == f.dtype and torch.equal(p.view(torch.uint8) if p.element_size() == 1 else p, f.view(torch.uint8) if f.element_size() == 1 else f)
        else:
            assert p == f
    assert all(any(p is t for p in pargs) for t in inputs)


def test_planned_calls_launch_what_fresh_calls_launch():
    gen = torch.Generator().manual_seed(0)
    planned, fresh = KernelLibrary(Recording()), KernelLibrary(Recording())
    planned.reuse_outputs = True
    weight = torch.randn(48, generator=gen)
    w8, scale = quantize_fp8(torch.randn(24, 48, generator=gen))
    outs = set()
    for _ in range(3):
        residual, delta = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
        gate_up = torch.randn(5, 64, generator=gen)
        want_sum, want = norm.reference_add_rmsnorm(residual, delta, weight, 1e-6)
        twin = residual.clone()
        got = planned.add_rmsnorm(residual, delta, weight, 1e-6)
        base = fresh.add_rmsnorm(twin, delta, weight, 1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(residual, want_sum)
        torch.testing.assert_close(got, base, rtol=0, atol=0)
        act, act_fresh = planned.silu_mul(gate_up), fresh.silu_mul(gate_up)
        torch.testing.assert_close(act, act_fresh, rtol=0, atol=0)
        y, y_fresh = planned.fp8_linear(got, w8, scale), fresh.fp8_linear(base, w8, scale)
        torch.testing.assert_close(y, y_fresh, rtol=0, atol=0)
        for p, f, inputs in zip(planned.launcher.calls[-3:], fresh.launcher.calls[-3:],
                                ((residual, delta, weight), (gate_up,), (got, w8, scale))):
            same_launch(p, f, inputs)
        outs.add((got.data_ptr(), act.data_ptr(), y.data_ptr()))
    assert len(outs) == 1  # one preallocated output per shape, reused
    other = planned.rms_norm(torch.randn(2, 48, generator=gen), weight, 1e-6)  # a new shape: a plan of its own
    assert other.shape == (2, 48) and other.data_ptr() not in outs.pop()


def test_without_reuse_every_call_gets_a_new_output():
    library = KernelLibrary(InterpretLauncher())
    x, weight = torch.randn(3, 32), torch.randn(32)
    first = library.rms_norm(x, weight, 1e-6)
    second = library.rms_norm(x, weight, 1e-6)
    assert first is not second and not library._plans


def test_plans_keep_within_their_memory_budget():
    library = KernelLibrary(InterpretLauncher())
    library.reuse_outputs, weight = True, torch.randn(32)
    library.plan_bytes = 3 * 32 * 4  # room for the output of a 3-row call
    library.rms_norm(torch.randn(3, 32), weight, 1e-6)
    assert len(library._plans) == 1
    out = library.rms_norm(torch.randn(2, 32), weight, 1e-6)  # over the budget: the older plan goes
    assert len(library._plans) == 1 and next(iter(library._plans.values())).out is out


class PackedRecorder:
    """A driver that launches from parameter blocks (as the CUDA one) and records the 8-byte value of every
    parameter slot each launch reads: the bytes cuLaunchKernel would copy."""

    packed = True

    def __init__(self):
        self.seen = []

    def load(self, kernel_dir, entry, variant):
        return None

    def scratch(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def _slots(self, prepared, address: int) -> list[bytes]:
        count = len(prepared.packer.params) + len(prepared.scratch)
        pointers = (ctypes.c_void_p * count).from_address(address)
        return [ctypes.string_at(pointers[i], 8) for i in range(count)]

    def launch(self, prepared, grid, args) -> None:
        self.seen.append(("args", prepared, grid, self._slots(prepared, prepared.packer.address)))

    def launch_packed(self, prepared, grid, address: int) -> None:
        self.seen.append(("bound", prepared, grid, self._slots(prepared, address)))


def test_bound_launches_pass_the_parameters_a_full_pack_passes(gpu_engines):
    """On a driver that launches from parameter blocks, a plan's later calls are bound launches (constants
    packed once, only the inputs' addresses written per call); every slot they hand the driver holds what
    packing the call's whole argument tuple writes, for calls with new input tensors each time."""
    engine = gpu_engines("h200", "bf16")
    hidden = json.loads((engine / "config.json").read_text())["model"]["hidden_size"]
    driver = PackedRecorder()
    launcher = AotLauncher(engine / "kernels" / "sm_90a", driver)
    library = KernelLibrary(launcher)
    library.reuse_outputs = True
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(hidden, generator=gen).to(torch.bfloat16)
    for call in range(3):
        residual = torch.randn(5, hidden, generator=gen).to(torch.bfloat16)
        delta = torch.randn(5, hidden, generator=gen).to(torch.bfloat16)
        library.add_rmsnorm(residual, delta, weight, 1e-6)
        kind, prepared, grid, slots = driver.seen[-1]
        assert kind == ("args" if call == 0 else "bound")
        plan = next(iter(library._plans.values()))
        variant, plan_grid, arguments = plan.launches[0]
        args = arguments(residual, delta, weight)
        assert args[0] is residual and (plan.bound is not None) and launcher.launches == call + 1
        prepared.packer.pack(args, prepared.null_scratch or launcher._scratch(prepared, grid))
        assert slots == driver._slots(prepared, prepared.packer.address)
        assert slots[0] == struct.pack("<Q", residual.data_ptr())
