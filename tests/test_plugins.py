"""The kernel layout: every module registered and consistent with its kernels, host wrappers that
launch exactly the variants an engine compiles, `load_kernels` modes, and the engine format."""

import dataclasses
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_engine
from nemodiff.builder.convert import quantize_fp8
from nemodiff.device import Platform
from nemodiff.engine_format import ARCH_TO_SM, EngineConfig, EngineFormatError
from nemodiff.plugins import aot, fp8_gemm, registry
from nemodiff.plugins.launch import InterpretLauncher
from nemodiff.plugins.ops import KernelLibrary, load_kernels
from nemodiff.runtime.model.kernel_meta import KernelMeta
from nemodiff.runtime.model.rope import RotaryEmbedding

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def i32(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32)


class RecordingLauncher(InterpretLauncher):
    """The interpreter, remembering every variant it ran."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def launch(self, variant, grid, args):
        self.seen.append(variant)
        super().launch(variant, grid, args)


@pytest.fixture(scope="module")
def model_config(engine_fp32):
    return EngineConfig.load(engine_fp32).model


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp8"])
def test_variants_match_their_kernels(model_config, dtype):
    variants = registry.engine_variants(model_config, dtype)
    assert len({v.key for v in variants}) == len(variants)
    for variant in variants:
        names = aot._jit_function(registry.kernel_function(variant.kernel)).arg_names
        runtime = [name for name, _ in variant.signature]
        assert runtime == [n for n in names if n in runtime]  # in the kernel's order
        assert sorted(names) == sorted(runtime + [name for name, _ in variant.constexprs])
    kernels = {v.kernel for v in variants}
    assert {"add_rmsnorm", "segment_attention", "silu_mul"} <= kernels
    assert ("fp8_gemm" in kernels) == (dtype != "fp32")  # fp32 engines keep torch's products (the reference)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp8"])
def test_host_wrappers_launch_only_variants_the_engine_compiles(model_config, dtype):
    cfg, act = model_config, TORCH[dtype]
    launcher = RecordingLauncher()
    library = KernelLibrary(launcher)
    hq, hkv, hd, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, hidden, generator=gen).to(act)
    weight = torch.ones(hidden, dtype=act)
    library.add_rmsnorm(x, x.clone(), weight, cfg.rms_norm_eps)
    library.rms_norm(x, weight, cfg.rms_norm_eps)
    cache = torch.zeros(64, hkv, hd, dtype=act)
    qkv = torch.randn(3, (hq + 2 * hkv) * hd, generator=gen).to(act)
    rope = RotaryEmbedding(cfg.rope, hd, torch.device("cpu"))
    for lengths, splits in (([1, 1, 1], 1), ([1, 1, 1], 3), ([3], 1), ([3], 2)):  # decode and prefill tiles, split or not
        batch = SimpleNamespace(bounds=[(a, a + n) for a, n in zip(np.cumsum([0] + lengths), lengths)], prefix_lens=[5]
                                * len(lengths), num_tokens=3, seg_start=i32(np.cumsum([0] + lengths)),
                                seg_prefix=i32([5] * len(lengths)), seg_table_row=i32(range(len(lengths))),
                                seg_pattern=i32([0] * len(lengths)), mask_offset=i32([0] * len(lengths)),
                                mask_bits=i32([0]))
        cache_view = SimpleNamespace(block_tables=torch.arange(4 * len(lengths), dtype=torch.int32).view(-1, 4),
                                     page_size=4)
        meta = KernelMeta(Platform("cpu"), cfg).attention(batch, cache_view, num_splits=splits)
        library.segment_attention(qkv, torch.arange(5, 8), torch.tensor([20, -1, 22]), rope, cache, cache.clone(), meta,
                                  hd ** -0.5, hq, hkv, hd)
    library.silu_mul(torch.randn(3, 2 * cfg.intermediate_size, generator=gen).to(act))
    if dtype == "fp8":
        for n, k in fp8_gemm.linear_shapes(cfg):
            w, s = quantize_fp8(torch.randn(n, k, generator=gen))
            for m in (1, 20, 40, 70):
                library.fp8_linear(torch.randn(m, k, generator=gen).to(act), w, s)
        w, s = quantize_fp8(torch.randn(32, 2048, generator=gen))  # deep enough to split K on a big GPU
        fp8_gemm.fp8_linear(launcher, torch.randn(2, 2048, generator=gen).to(act), w, s, num_sms=132)
    if dtype != "fp32":  # the dense products: linears (bf16/fp16), the head, the draft adapter (rank 8: unaligned)
        for n, k in fp8_gemm.linear_shapes(cfg) + [(cfg.vocab_size, hidden), (8, hq * hd), (hidden, 8)]:
            for m in (1, 20):
                library.dense_linear(torch.randn(m, k, generator=gen).to(act), torch.randn(n, k, generator=gen).to(act))
        fp8_gemm.dense_linear(launcher, torch.randn(2, 2048, generator=gen).to(act),
                              torch.randn(32, 2048, generator=gen).to(act), num_sms=132)
    listed = {v.key for v in registry.engine_variants(cfg, dtype)}
    # the interpreter runs the GEMM with INTERPRET on; the GPU launchers build the same variant with it off
    on_gpu = [dataclasses.replace(v, constexprs=tuple((n, False if n == "INTERPRET" else value)
                                                      for n, value in v.constexprs)) for v in launcher.seen]
    assert {v.kernel for v in on_gpu} == ({"add_rmsnorm", "segment_attention", "silu_mul"}
                                          | ({"fp8_gemm"} if dtype != "fp32" else set()))
    assert {v.key for v in on_gpu} <= listed, [v for v in on_gpu if v.key not in listed]
    # one attention tile for decode and prefill, split and unsplit; GEMMs: split and serial, aligned and not
    # (dense), and the fp8 ones
    assert len({v.key for v in on_gpu if v.kernel == "segment_attention"}) == 2
    gemms = len({v.key for v in on_gpu if v.kernel == "fp8_gemm"})
    assert gemms == {"fp32": 0, "bf16": 3, "fp16": 3, "fp8": 5}[dtype]  # no unaligned split: K = 8


def test_load_kernels_modes(engine_fp32, caplog):
    build = EngineConfig.load(engine_fp32).build
    with caplog.at_level(logging.INFO):
        assert load_kernels(engine_fp32, build, "cpu") is None  # CPU: the reference path, silently
    assert not caplog.records
    assert load_kernels(engine_fp32, build, "cpu", mode="off") is None
    assert load_kernels(None, None, "cpu", mode="interpret").name == "interpret"
    with pytest.raises(RuntimeError, match="JIT launcher needs a CUDA device"):
        load_kernels(None, None, "cpu", mode="jit")
    with pytest.raises(RuntimeError, match="need a CUDA GPU"):
        load_kernels(engine_fp32, build, "cpu", mode="aot")
    with pytest.raises(ValueError, match="choose one of"):
        load_kernels(engine_fp32, build, "cpu", mode="fast")


def test_every_gpu_arch_has_a_triton_target():
    assert {sm for sm in ARCH_TO_SM.values() if sm} <= set(aot.SM_TO_CAPABILITY)


def test_no_kernels_build(tmp_path, checkpoint):
    engine = make_engine(checkpoint, tmp_path / "plain", arch="h100", kernels=False)
    assert not (engine / "kernels").exists()
    assert EngineConfig.load(engine).build.kernels == []


def test_engines_of_the_old_format_are_refused(engine_fp32):
    data = EngineConfig.load(engine_fp32).to_dict() | {"format_version": 1}
    with pytest.raises(EngineFormatError, match="version 1 is not supported.*rebuild the engine"):
        EngineConfig.from_dict(data)


def test_kernels_call_no_other_jit_function():
    """The interpreter launcher wraps each kernel's Python function alone: a kernel calling another
    @triton.jit function would run on the GPU and break under the interpreter."""
    import triton

    from nemodiff.plugins import attention_kernels

    kernels = {name: registry.kernel_function(name) for module in registry.KERNEL_MODULES
               for name in registry._module(module).KERNELS}
    assert attention_kernels.segment_attention_kernel in kernels.values()
    for name, kernel in kernels.items():
        fn = kernel.fn
        called = [n for n in fn.__code__.co_names  # jit functions are KernelInterfaces, interpreted or not
                  if isinstance(fn.__globals__.get(n), triton.runtime.jit.KernelInterface)]
        assert not called, f"{name} calls jit functions {called}"
