"""The whole model forward through the kernel path, run on the CPU by Triton's interpreter.

`kernels="interpret"` executes the real code of every kernel (fused norms, rotary + KV write, paged
attention, SiLU gate) on CPU tensors. Small on purpose: the interpreter is slow. Whole generations
through the ahead-of-time launch path (greedy AR against transformers, the spec modes against AR,
every dtype) are in tests/test_aot_check.py.
"""

import pytest
import torch

from helpers import make_engine, relative_error
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Pattern, Segment, quadratic_mask

PROMPTS = [[1, 200, 201, 202], [1, 150, 151, 152, 153, 154, 155, 156, 157]]


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-path")
    return {dtype: make_engine(checkpoint, root / dtype, dtype=dtype, kv_page_size=4, block_length=4)
            for dtype in ("fp32", "bf16")}


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


@pytest.mark.parametrize("dtype, bound", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_kernel_path_logits_match_the_reference_path(engines, dtype, bound):
    """The same cached steps through both paths give the same logits (bf16: within its rounding; the
    kernels accumulate in float32 where the reference rounds after each operation)."""
    kernel = cached_steps(load_engine(engines[dtype], device="cpu", kernels="interpret").model)
    plain = cached_steps(load_engine(engines[dtype], device="cpu", kernels="off").model)
    assert relative_error(kernel, plain) < bound
