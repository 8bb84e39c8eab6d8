"""CUDA plugins: ahead-of-time compilation per arch, loading with fallback, and the PyTorch
references the kernels must match (checked here against the runtime's own paths on CPU;
tests/gpu/run_device_checks.sh checks the kernels against them on a GPU)."""

import ctypes
import json

import pytest
import torch

from helpers import make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.plugins import reference
from nemodiff.plugins.compile import GENCODE, KERNELS, compile_kernels, find_nvcc
from nemodiff.runtime.cuda_graphs import StepShape
from nemodiff.runtime.layers import rms_norm
from nemodiff.runtime.segments import Pattern, Segment
from nemodiff.runtime.strategies.diffusion import DiffusionStrategy
from nemodiff.runtime.strategies.speculative import verify

EXPORTED = ["nd_abi_version"] + [f"nd_{name}" for name in KERNELS]


@pytest.mark.parametrize("sm", ["sm_90a", "sm_100a"])
def test_kernels_compile_for_hopper_and_blackwell(sm, tmp_path):
    assert find_nvcc() is not None, "nvcc is required to build GPU engines (CI installs it)"
    library = compile_kernels(sm, tmp_path)
    lib = ctypes.CDLL(str(library))
    assert lib.nd_abi_version() == 1
    for symbol in EXPORTED:
        assert hasattr(lib, symbol)


def test_every_supported_arch_has_a_target():
    from nemodiff.engine_format import ARCH_TO_SM

    assert {sm for sm in ARCH_TO_SM.values() if sm} <= set(GENCODE)


def test_gpu_engine_lists_kernels_and_falls_back_on_cpu(tmp_path, checkpoint, engine_fp32):
    engine = make_engine(checkpoint, tmp_path / "h200", arch="h200", kernels=True)
    config = json.loads((engine / "config.json").read_text())
    assert config["build"]["kernels"] == list(KERNELS)
    assert (engine / config["build"]["kernel_library"]).is_file()
    llm = LLM(engine, device="cpu")
    assert llm.model.kernels is None  # no GPU here: the reference path runs
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert llm.generate([1, 5, 6], params)[0].output_ids == LLM(engine_fp32, device="cpu").generate(
        [1, 5, 6], params)[0].output_ids


def test_no_kernels_build(tmp_path, checkpoint):
    engine = make_engine(checkpoint, tmp_path / "plain", arch="h100", kernels=False)
    assert not (engine / "kernels").exists()


def test_attention_reference_matches_the_model_path(engine_fp32):
    gen = torch.Generator().manual_seed(0)
    page, heads, kv_heads, dim = 4, 4, 2, 16
    k_cache, v_cache = torch.randn(64, kv_heads, dim, generator=gen), torch.randn(64, kv_heads, dim, generator=gen)
    lengths, prefixes = [3, 1, 5], [6, 9, 0]
    tables = torch.tensor([[3, 1, 0], [5, 2, 7], [0, 0, 0]], dtype=torch.int32)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=gen)
    k_new, v_new = torch.randn(total, kv_heads, dim, generator=gen), torch.randn(total, kv_heads, dim, generator=gen)
    seg_start = torch.tensor([0, 3, 4, 9])
    quad = torch.rand(5, 5, generator=gen) > 0.4
    quad.fill_diagonal_(True)
    out = reference.paged_segment_attention(q, k_new, v_new, k_cache, v_cache, seg_start, torch.tensor(prefixes),
                                            tables, page, [0, 1, 2], [None, None, quad])
    # the first segment by hand: keys = its prefix (through the page table) then causal own keys
    slots = torch.tensor([3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 1 * 4 + 0, 1 * 4 + 1])
    keys = torch.cat([k_cache[slots], k_new[:3]]).repeat_interleave(2, dim=1)
    values = torch.cat([v_cache[slots], v_new[:3]]).repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q[:3], keys) / dim ** 0.5
    visible = torch.cat([torch.ones(3, 6, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool).tril()], dim=1)
    want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), values)
    assert torch.allclose(out[:3], want, atol=1e-5)


def test_denoise_reference_matches_the_diffusion_strategy():
    gen = torch.Generator().manual_seed(1)
    for tau, k in ((0.3, 0), (0.0, 3)):
        rows = torch.randn(6, 50, generator=gen) * 3
        argmax, prob = reference.row_argmax_prob(rows)
        block = torch.tensor([[7, 100, 100, 100, 100, 100, 100, 9]], dtype=torch.int32)
        masked = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.uint8)
        tokens, flags, remaining = reference.denoise_select(
            argmax, prob, torch.tensor([0, 6]), torch.arange(1, 7), torch.tensor([tau]), torch.tensor([k]), block, masked)
        strategy = DiffusionStrategy.__new__(DiffusionStrategy)  # only the selection logic is exercised
        strategy.params = SamplingParams(threshold=tau if tau > 0 else None)
        strategy.block, strategy.masked = block[0].tolist(), [bool(m) for m in masked[0]]
        strategy.schedule, strategy.steps, strategy.B = [k], 0, 8
        strategy.request = type("R", (), {"eos_ids": set()})()
        strategy.steps_per_block = []
        strategy._denoise_step(rows)
        assert tokens[0].tolist() == strategy.block and [bool(f) for f in flags[0]] == strategy.masked
        assert int(remaining[0]) == sum(strategy.masked)


def test_spec_accept_reference_matches_verify():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2 * 5, 20, generator=gen)
    argmax = logits.argmax(-1).int()
    drafts = torch.stack([argmax[0:4], torch.tensor([int(argmax[5]), int(argmax[6]), 0, 0], dtype=torch.int32)])
    accepted, bonus, new_committed = reference.spec_accept(argmax, torch.tensor([0, 5, 10]), drafts,
                                                           torch.tensor([10, 20]))
    for s in range(2):
        tokens = verify(logits[5 * s: 5 * s + 5], drafts[s].tolist(), None, SamplingParams(), None)
        assert int(accepted[s]) == len(tokens) and int(bonus[s]) == tokens[-1]
        assert int(new_committed[s]) == [10, 20][s] + len(tokens)
    assert accepted.tolist() == [5, 3]


def test_add_rmsnorm_reference_is_the_runtime_norm():
    x, delta, w = torch.randn(4, 32).bfloat16(), torch.randn(4, 32).bfloat16(), torch.randn(32).bfloat16()
    summed, normed = reference.add_rmsnorm(x, delta, w, 1e-5)
    assert torch.equal(normed, rms_norm(x + delta, w, 1e-5)) and torch.equal(summed, x + delta)


def test_graph_step_shapes_group_uniform_steps_only():
    ar = [Segment(i, [5], [10 + i], 10 + i, Pattern.CAUSAL, write_kv=True) for i in range(3)]
    assert StepShape.of(ar) is not None and StepShape.of(ar).length == 1
    mixed = ar + [Segment(9, [1, 2], [4, 5], 4, Pattern.FULL)]
    assert StepShape.of(mixed) is None
