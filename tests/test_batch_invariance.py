"""Batch invariance on the GPU launch path, run on the CPU (docs/design.md, "What is bit-exact where").

Engines built for h200 (sm_90a, the cubins an H100 runs too) in bf16 and fp8 run under
`kernels="aot-check"` with the plans of a 132-SM GPU (`sm_count=132`): split classes, grids and
GEMM chunks as on that GPU, every launch checked against its cubin and interpreted. A request's AR
log-probabilities are the same bits alone, in a batch of 5 and in a batch of 8 requests of every
mode; LinearSpec and QuadraticSpec return AR's tokens with AR's log-probabilities, bit for bit; and no
product is left to torch (cuBLAS on a GPU). Tiny shapes and few tokens: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from helpers import record_splits
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.kv_cache import PagedKVCache
from nemodiff.runtime.model.segments import Segment

PROMPT = [1, 150, 151, 152, 153]
OTHERS = [[1, 40 + i, 41 + i, 42 + i][: 2 + i % 3] for i in range(7)]
MODES = ["ar", "linear-spec", "quadratic-spec", "diffusion", "ar", "linear-spec", "quadratic-spec"]
TOKENS = 2


def params(mode: str = "ar") -> SamplingParams:
    return SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, logprobs=1, mode=mode, block_length=2,
                          threshold=0.5)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_ar_logprobs_alone_batched_mixed_and_in_the_spec_modes(gpu_engines, dtype):
    llm = LLM(gpu_engines("h200", dtype), device="cpu", kernels="aot-check", sm_count=132, max_batch_size=8)
    assert llm.platform.sm_count == 132 and llm.model.kernels.num_sms(llm.model.device) == 132
    alone = llm.generate([PROMPT], params())[0]
    assert len(alone.output_ids) == TOKENS and alone.logprob_source == "causal"
    batched = llm.generate([PROMPT] + OTHERS[:4], params())[0]
    mixed = llm.generate([PROMPT] + OTHERS, [params()] + [params(mode) for mode in MODES])[0]
    for got in (batched, mixed):
        assert got.output_ids == alone.output_ids and got.logprobs == alone.logprobs  # exact floats
    for mode in ("linear-spec", "quadratic-spec"):
        got = llm.generate([PROMPT], params(mode))[0]
        assert got.output_ids == alone.output_ids, mode
        assert got.logprobs == alone.logprobs, mode
    assert llm.model.graphs is not None and llm.model.graphs.replays > 0  # the padded graph path took part


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_a_decode_row_over_split_chunks_is_the_same_bits_in_any_batch(gpu_engines, dtype):
    """The model's logits for one decode token after 90 committed keys (two key chunks: split-KV programs and
    their merge at 132 SMs) equal that row's logits in a forward with three other requests beside it."""
    llm = LLM(gpu_engines("h200", dtype), device="cpu", kernels="aot-check", sm_count=132, max_batch_size=4,
              cuda_graphs=False)
    model, cfg = llm.model, llm.model.config
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, 4, 120, model.dtype, llm.platform,
                         max_pages_per_request=34)
    gen = torch.Generator().manual_seed(0)
    for pool in (cache.k, cache.v):  # committed keys and values: random, the same in both runs
        pool.copy_(torch.randn(pool.shape, generator=gen))
    contexts = (90, 7, 60, 33)
    for rid, context in enumerate(contexts):
        cache.add_request(rid)
        cache.reserve(rid, context + 1)
        cache.set_length(rid, context)
    seen = record_splits(model)

    def step(rids):
        return model.forward([Segment(rid, [9 + rid], [contexts[rid]], contexts[rid], write_kv=False)
                              for rid in rids], cache)
    alone = step([0])[0]
    together = step([3, 1, 0, 2])[2]
    assert seen[0] > 1  # the lone step split its two chunks over programs of their own
    assert alone.equal(together)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_no_product_is_left_to_torch(gpu_engines, dtype):
    """`bench --launch-overhead`: 0 dense GEMMs (cuBLAS launches on a GPU) per forward in every step shape."""
    from nemodiff.bench.launches import launch_overhead

    report = launch_overhead(gpu_engines("h200", dtype), iters=2, sm_count=132)
    assert {row["shape"]: row["dense_gemms"] for row in report["shapes"]} == {
        row["shape"]: 0.0 for row in report["shapes"]}
    assert report["launches_per_layer"] == 8  # two norms, qkv, attention, o, gate_up, SiLU gate, down
