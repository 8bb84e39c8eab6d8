"""Ahead-of-time kernels: GPU engine builds on a machine without a GPU carry a cubin for every
kernel variant and the index the launcher reads; such an engine still runs on CPU; the launcher's
argument packing is right byte for byte."""

import ctypes
import json
import logging
import struct

import pytest
import torch
import triton
from click.testing import CliRunner

from helpers import make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.cli import main as nemodiff_cli
from nemodiff.device import KernelLaunchError
from nemodiff.engine_format import EngineConfig
from nemodiff.plugins import aot
from nemodiff.plugins.aot_check import InterpretDriver, LaunchChecker
from nemodiff.plugins.aot_launch import AotLauncher, ArgumentPacker
from nemodiff.plugins.norm import norm_variant
from nemodiff.plugins.registry import engine_variants


def inspect_json(engine) -> dict:
    result = CliRunner().invoke(nemodiff_cli, ["inspect", str(engine), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def check_engine_kernels(engine, dtype: str, sm: str) -> dict:
    config = EngineConfig.load(engine)
    variants = engine_variants(config.model, dtype)
    kernel_dir = engine / "kernels" / sm
    index = json.loads((kernel_dir / "kernels.json").read_text())
    assert index["sm"] == sm and index["triton_version"] == triton.__version__
    assert set(index["kernels"]) == {v.key for v in variants}
    for variant in variants:
        entry = index["kernels"][variant.key]
        assert (kernel_dir / entry["file"]).read_bytes()[:4] == b"\x7fELF"
        assert entry["kernel"] == variant.kernel and entry["name"].endswith("_kernel")
        assert entry["params"] == [list(p) for p in variant.signature]
        assert entry["num_warps"] == variant.num_warps and entry["shared"] >= 0
        assert [s["name"] for s in entry["scratch"]] == ["global_scratch", "profile_scratch"]
        # the cubin's register count, read from its ELF notes, within a block's register file
        assert 0 < entry["registers"] <= 255 and aot.register_demand(entry["registers"], entry["num_warps"]) <= 65536
    info = inspect_json(engine)
    assert info["build"]["sm"] == sm and info["format_version"] == 2
    listed = info["build"]["kernels"]
    assert sorted(k["key"] for k in listed) == sorted(v.key for v in variants)
    assert all(k["file"] in info["files"] for k in listed)  # the manifest covers every cubin
    return index


@pytest.fixture(scope="module")
def h200_engine(checkpoint, tmp_path_factory):
    return make_engine(checkpoint, tmp_path_factory.mktemp("aot") / "h200", arch="h200", kernels=True)


def test_h200_engine_carries_every_variant_and_runs_on_cpu(h200_engine, engine_fp32, caplog):
    engine = h200_engine
    check_engine_kernels(engine, "fp32", "sm_90a")
    plain = CliRunner().invoke(nemodiff_cli, ["inspect", str(engine)])
    compiled = len(json.loads((engine / "config.json").read_text())["build"]["kernels"])
    assert compiled >= 5 and f"kernels {compiled} compiled for sm_90a" in plain.output

    with caplog.at_level(logging.WARNING):
        llm = LLM(engine, device="cpu")
    assert llm.model.kernels is None  # no GPU here: the PyTorch reference path runs
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert llm.generate([1, 5, 6], params)[0].output_ids == LLM(engine_fp32, device="cpu").generate(
        [1, 5, 6], params)[0].output_ids


def test_b200_fp8_engine_compiles_the_gemm_for_sm_100a(tmp_path, checkpoint):
    engine = make_engine(checkpoint, tmp_path / "b200", arch="b200", dtype="fp8", kernels=True)
    index = check_engine_kernels(engine, "fp8", "sm_100a")
    assert index["capability"] == 100
    # no reduce passes and no rotary kernel of their own: split K, split KV and RoPE live in the kernels
    assert {e["kernel"] for e in index["kernels"].values()} == {"fp8_gemm", "add_rmsnorm", "segment_attention",
                                                               "silu_mul"}


def test_compile_refuses_unknown_targets(tmp_path):
    with pytest.raises(ValueError, match="no Triton target for 'sm_75'"):
        aot.compile_variants([norm_variant(torch.float16, 64, True)], "sm_75", tmp_path)


def test_missing_variant_is_named(h200_engine):
    launcher = AotLauncher(h200_engine / "kernels" / "sm_90a", InterpretDriver())
    other = norm_variant(torch.float32, 96, True)  # this model's hidden size is 64
    with pytest.raises(KernelLaunchError, match=f"kernel variant {other.key} \\(add_rmsnorm"):
        launcher.launch(other, (1,), ())


def test_registers_times_threads_are_checked(h200_engine):
    """A variant whose registers x threads exceed the 65,536 of a block cannot launch: aot-check refuses it by
    name (registers are given in units of 8 per thread: 254 x 256 threads needs 256 x 256, which fits)."""
    index = json.loads((h200_engine / "kernels" / "sm_90a" / "kernels.json").read_text())
    entry = next(e for e in index["kernels"].values() if e["kernel"] == "add_rmsnorm")
    variant = next(v for v in engine_variants(EngineConfig.load(h200_engine).model, "fp32") if v.key == entry["key"])
    hidden = dict(variant.constexprs)["N_COLS"]
    x, weight = torch.zeros(2, hidden), torch.ones(hidden)
    args = (x, x.clone(), weight, x.clone(), 1e-5)
    checker = LaunchChecker(torch.device("cpu"))
    assert aot.register_demand(254, 8) == 65536
    checker.check(entry | {"registers": 254, "num_warps": 8}, variant, (2, 1, 1), args, "sm_90a")
    with pytest.raises(KernelLaunchError, match="add_rmsnorm .*: 129 registers x 512 threads exceed the 65536"):
        checker.check(entry | {"registers": 129, "num_warps": 16}, variant, (2, 1, 1), args, "sm_90a")


def test_argument_packing():
    signature = [["x_ptr", "*bf16"], ["n", "i32"], ["eps", "fp32"], ["offset", "i64"], ["unused_ptr", "*fp32"]]
    x = torch.zeros(64, dtype=torch.bfloat16)
    packer = ArgumentPacker("k", signature, scratch=1, alignment=16)
    packer.pack((x, 4096, 1e-5, -(2 ** 40), None), (0xABC0,))
    raw = bytes(packer.buffer)
    assert raw[0:8] == struct.pack("<Q", x.data_ptr())
    assert raw[8:12] == struct.pack("<i", 4096)
    assert raw[16:20] == struct.pack("<f", 1e-5)
    assert raw[24:32] == struct.pack("<q", -(2 ** 40))
    assert raw[32:40] == bytes(8)  # None is a NULL pointer
    assert raw[40:48] == struct.pack("<Q", 0xABC0)  # the scratch pointer Triton appends
    base = ctypes.addressof(packer.buffer)
    assert [packer.pointers[i] for i in range(6)] == [base + 8 * i for i in range(6)]  # one slot per parameter

    with pytest.raises(KernelLaunchError, match="argument x_ptr: address .* is not 16-byte aligned"):
        packer.pack((x[1:], 1, 1.0, 1, None), (0,))
    with pytest.raises(KernelLaunchError, match="expected 5 arguments"):
        packer.pack((x, 1), (0,))
    with pytest.raises(KernelLaunchError, match="argument n: expected a i32 scalar, got a tensor"):
        packer.pack((x, x, 1.0, 1, None), (0,))
