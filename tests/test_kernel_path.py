"""The whole model forward through the kernel path, run on the CPU by Triton's interpreter.

`kernels="interpret"` executes the real code of every kernel (fused norms, attention fused with RoPE
and the KV write, SiLU gate, weight-only fp8 GEMMs) on CPU tensors, and a counting launcher checks
how many launches a layer takes. Small on purpose: the interpreter is slow. Whole generations
through the ahead-of-time launch path (greedy AR against transformers, the spec modes against AR,
fp8 spec modes against fp8 AR, every dtype) are in tests/test_aot_check.py.
"""

from collections import Counter

import pytest
import torch

from helpers import make_engine, relative_error
from nemodiff.plugins.launch import InterpretLauncher
from nemodiff.plugins.ops import KernelLibrary
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.layers import KERNEL_DTYPES, DenseLinear
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Pattern, Segment, quadratic_mask

PROMPTS = [[1, 200, 201, 202], [1, 150, 151, 152, 153, 154, 155, 156, 157]]


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-path")
    return {dtype: make_engine(checkpoint, root / dtype, dtype=dtype, kv_page_size=4, block_length=4)
            for dtype in ("fp32", "bf16", "fp8")}


def cached_steps(model):
    """Prefills of three requests, then one batch with a causal, a full and a QuadraticSpec segment."""
    cfg = model.config
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, 64, model.dtype)
    prompts = {0: PROMPTS[1], 1: PROMPTS[0], 2: [1, 9, 8, 7, 6, 5, 4]}
    logits = []
    for rid, ids in prompts.items():
        cache.add_request(rid)
        cache.reserve(rid, len(ids) + 8)
        logits += model.forward([Segment(rid, ids, list(range(len(ids))), 0, write_kv=True)], cache)
        cache.set_length(rid, len(ids))
        cache.reserve(rid, len(ids) + 8)
    k, p2 = 2, len(prompts[2])
    positions = [p2, p2 + 1] + [p2 + i + 1 + j for i in range(k) for j in range(k)]
    logits += model.forward([
        Segment(0, [60, 61, 62], [9, 10, 11], 9, Pattern.CAUSAL, write_kv=True),
        Segment(1, [100] * 4, [4, 5, 6, 7], 4, Pattern.FULL),
        Segment(2, [50, 51] + [100] * 4, positions, p2, Pattern.MASK, write_kv=[True] * k + [False] * k * k,
                mask=quadratic_mask(k)),
    ], cache)
    return torch.cat(logits)


@pytest.mark.parametrize("dtype, bound", [("fp32", 1e-5), ("bf16", 3e-2), ("fp8", 3e-2)])
def test_kernel_path_logits_match_the_reference_path(engines, dtype, bound):
    """The same cached steps through both paths give the same logits (bf16: within its rounding; the
    kernels accumulate in float32 where the reference rounds after each operation)."""
    kernel = cached_steps(load_engine(engines[dtype], device="cpu", kernels="interpret").model)
    plain = cached_steps(load_engine(engines[dtype], device="cpu", kernels="off").model)
    assert relative_error(kernel, plain) < bound


class CountingLauncher(InterpretLauncher):
    def __init__(self):
        super().__init__()
        self.kernels = Counter()

    def launch(self, variant, grid, args):
        self.kernels[variant.kernel] += 1
        super().launch(variant, grid, args)


class CountedLinear:
    """A layer's linear that counts the dense GEMMs it runs (torch matmuls: one launch each)."""

    def __init__(self, inner, counts: Counter):
        self.inner, self.counts = inner, counts

    def __call__(self, x, kernels=None):
        if isinstance(self.inner, DenseLinear) and (kernels is None or self.inner.weight.dtype not in KERNEL_DTYPES):
            self.counts["dense GEMM"] += 1
        return self.inner(x, kernels)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_a_layer_takes_at_most_eight_launches(engines, dtype):
    """Per layer, counting each dense GEMM as a launch: add+norm, qkv, attention (RoPE, KV write and the
    split merge fused in), o, add+norm, gate_up, SiLU gate, down. Prefill, an AR step at batch 1, and the
    same step with its keys split over three programs."""
    model = load_engine(engines[dtype], device="cpu", kernels="interpret").model
    launcher, dense = CountingLauncher(), Counter()
    model.kernels = KernelLibrary(launcher)
    for layer in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, CountedLinear(getattr(layer, name), dense))
    cfg, layers = model.config, model.config.num_hidden_layers
    cache = PagedKVCache(layers, cfg.num_key_value_heads, cfg.head_dim, 4, 64, model.dtype)
    cache.add_request(0)
    cache.reserve(0, 16)
    prompt = PROMPTS[1]

    def per_layer(run) -> tuple[Counter, torch.Tensor]:
        launcher.kernels.clear()
        dense.clear()
        logits = run()
        counts = launcher.kernels + dense
        counts["add_rmsnorm"] -= 1  # the final norm and the head, outside the layers
        counts["fp8_gemm"] -= 1
        assert all(n % layers == 0 for n in counts.values()), counts
        return Counter({kernel: n // layers for kernel, n in counts.items()}), logits

    prefill, _ = per_layer(lambda: model.forward([Segment(0, prompt, list(range(9)), 0, write_kv=True)], cache))
    cache.set_length(0, 9)
    step = [Segment(0, [7], [9], 9, Pattern.CAUSAL, write_kv=True)]
    ar, want_logits = per_layer(lambda: model.forward(step, cache)[0])
    batch = model.build_batch(step, cache)
    split, logits = per_layer(lambda: model._run(batch, cache, model.attention_meta(batch, cache, num_splits=3)))
    want = Counter({"add_rmsnorm": 2, "segment_attention": 1, "silu_mul": 1, "fp8_gemm": 4})  # no dense GEMM
    assert prefill == ar == split == want
    assert sum(want.values()) <= 8
    assert torch.equal(logits, want_logits)  # the merged splits compute the same step, bit for bit
