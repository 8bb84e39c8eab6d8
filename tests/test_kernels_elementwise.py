"""Norm, rotary + KV-cache write and SiLU kernels: their real Triton code under the interpreter
against the PyTorch references, on random seeded shapes, with poisoned outputs.

Tolerances: float32 within 1e-5 relative. float16 follows the reference's rounding steps, so
results are bit-identical except where float32 intermediates (a sum's order, cos/sin) differ in
the last bit: at most one float16 ulp. bfloat16: the interpreter truncates float32 -> bfloat16
(the GPU rounds to nearest even), so results agree to two bfloat16 ulps; the GPU device checks
hold the compiled kernels to the reference.
"""

import pytest
import torch

from nemodiff.engine_format import RopeConfig
from nemodiff.plugins import activation, norm, rotary
from nemodiff.plugins.launch import InterpretLauncher
from nemodiff.plugins.ops import KernelLibrary
from nemodiff.runtime.model.rope import inverse_frequencies

LAUNCHER = InterpretLauncher()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: int = 2,
                 elementwise: bool = True) -> None:
    """fp32: within 1e-5 of the largest reference value. fp16/bf16: within `ulps` units in the last place,
    of each element (floored at 1e-3 of the largest value) or, when a difference of rounded products
    cancels (rotary), of the largest value."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all(), "an output element was never written"
    got, want = got.double(), want.double()
    if dtype == torch.float32:
        scale, limit = want.abs().max(), 1e-5
    else:
        floor = want.abs().max() * (1e-3 if elementwise else 1.0)
        scale, limit = want.abs().clamp(min=floor), ulps * ULP[dtype]
    rel = ((got - want).abs() / scale).max().item()
    assert rel <= limit, f"relative error {rel:.2e} > {limit:.2e}"


def cases(seed: int, largest: int = 70):
    """A seeded generator and token counts: 1, one drawn from 2..largest-1, and `largest`."""
    gen = torch.Generator().manual_seed(seed)
    return gen, [1, int(torch.randint(2, largest, (1,), generator=gen)), largest]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", (64, 96, 128))
def test_add_rmsnorm_matches_the_runtime_norm(dtype, hidden):
    gen, lengths = cases(hidden)
    for tokens in lengths:
        residual = (torch.randn(tokens, hidden, generator=gen) * 3).to(dtype)
        delta = torch.randn(tokens, hidden, generator=gen).to(dtype)
        weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
        want_sum, want = norm.reference_add_rmsnorm(residual, delta, weight, 1e-5)
        out = poisoned(tokens, hidden, dtype=dtype)
        got = norm.add_rmsnorm(LAUNCHER, residual, delta, weight, 1e-5, out=out)
        assert got is out
        if dtype == torch.bfloat16:
            assert_close(residual, want_sum, dtype, ulps=1)
            want = norm.reference_add_rmsnorm(residual, None, weight, 1e-5)[1]  # the norm of what the add stored
        else:  # the add rounds once, exactly like PyTorch's
            assert torch.equal(residual, want_sum)
        assert_close(out, want, dtype, ulps=1 if dtype == torch.float16 else 2)

        before = residual.clone()
        out = poisoned(tokens, hidden, dtype=dtype)
        norm.rms_norm(LAUNCHER, residual, weight, 1e-5, out=out)
        assert torch.equal(residual, before)  # plain RMSNorm leaves its input alone
        assert_close(out, norm.reference_add_rmsnorm(before, None, weight, 1e-5)[1], dtype)


def test_norm_fp16_is_bit_exact_on_most_elements():
    gen = torch.Generator().manual_seed(5)
    residual = torch.randn(64, 128, generator=gen).half()
    delta, weight = torch.randn(64, 128, generator=gen).half(), torch.randn(128, generator=gen).half()
    _, want = norm.reference_add_rmsnorm(residual, delta, weight, 1e-5)
    got = norm.add_rmsnorm(LAUNCHER, residual, delta, weight, 1e-5)
    assert (got == want).float().mean() > 0.99


def paged_slots(gen, tokens: int, page_size: int, num_pages: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of positions start..start+tokens-1 through a shuffled page table, some left unwritten (-1)."""
    table = torch.randperm(num_pages, generator=gen)
    positions = torch.arange(start, start + tokens)
    slots = table[positions // page_size] * page_size + positions % page_size
    skip = torch.rand(tokens, generator=gen) < 0.25
    return positions, torch.where(skip, torch.full_like(slots, -1), slots)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, kv_heads, ratio, largest", [(64, 2, 1, 70), (128, 2, 4, 33), (64, 1, 8, 21),
                                                                  (128, 1, 1, 47)])
def test_rotary_kv_write_matches_the_runtime_path(dtype, head_dim, kv_heads, ratio, largest):
    gen, lengths = cases(head_dim + ratio, largest)  # the interpreter runs two programs per token: keep T modest
    heads, page = kv_heads * ratio, 16
    rope = RopeConfig(rope_type="yarn", rope_theta=1e6, factor=16.0, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, llama_4_scaling_beta=0.1)
    inv_freq, attention_factor = inverse_frequencies(rope, head_dim)
    ulps = 4 if dtype == torch.bfloat16 else 2  # a chain of truncated roundings under the interpreter
    for tokens, start, index_dtype in zip(lengths, (8190, 5, 4090), (torch.int32, torch.int64, torch.int64)):
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        num_pages = (start + tokens) // page + 3
        positions, slots = paged_slots(gen, tokens, page, num_pages, start)
        k_cache = torch.randn(num_pages * page, kv_heads, head_dim, generator=gen).to(dtype)
        v_cache = torch.randn(num_pages * page, kv_heads, head_dim, generator=gen).to(dtype)
        want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
        args = (qkv, positions.to(index_dtype), slots.to(index_dtype), inv_freq, attention_factor, 0.1, 4096)
        want = rotary.reference_rotary_kv_write(*args, want_k_cache, want_v_cache, heads, kv_heads, head_dim)
        out = (poisoned(tokens, heads, head_dim, dtype=dtype), poisoned(tokens, kv_heads, head_dim, dtype=dtype),
               poisoned(tokens, kv_heads, head_dim, dtype=dtype))
        before_k, before_v = k_cache.clone(), v_cache.clone()
        q, k, v = rotary.rotary_kv_write(LAUNCHER, *args, k_cache, v_cache, heads, kv_heads, head_dim, out=out)
        assert_close(q, want[0], dtype, ulps, elementwise=False)
        assert_close(k, want[1], dtype, ulps, elementwise=False)
        assert torch.equal(v, want[2])
        written = slots >= 0
        untouched = torch.ones(num_pages * page, dtype=torch.bool)
        untouched[slots[written]] = False
        assert torch.equal(k_cache[untouched], before_k[untouched])
        assert torch.equal(v_cache[untouched], before_v[untouched])
        assert torch.equal(k_cache[slots[written]], k[written])  # the cache holds exactly the returned k
        assert torch.equal(v_cache[slots[written]], want_v_cache[slots[written]])
        assert_close(k_cache, want_k_cache, dtype, ulps, elementwise=False)


def test_query_scale_steps_at_the_original_context():
    """Beyond original_max the query is scaled by 1 + beta * ln(1 + floor(pos / original_max))."""
    heads, kv_heads, head_dim = 2, 1, 64
    qkv = torch.ones(2, (heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor([0, 2 * 4096])  # angle 0 at position 0: q is unrotated there
    inv_freq = torch.zeros(head_dim // 2)  # no rotation anywhere: only the scale remains
    cache = torch.zeros(4, kv_heads, head_dim)
    q, _, _ = rotary.rotary_kv_write(LAUNCHER, qkv, positions, torch.tensor([-1, -1]), inv_freq, 1.0, 0.5, 4096,
                                     cache, cache.clone(), heads, kv_heads, head_dim)
    first_half = q[:, :, : head_dim // 2]
    assert torch.allclose(first_half[0], torch.ones_like(first_half[0]))
    assert torch.allclose(first_half[1], torch.full_like(first_half[1], 1 + 0.5 * torch.log(torch.tensor(3.0))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", (96, 77, 1100))
def test_silu_mul_matches_pytorch(dtype, intermediate):
    gen, lengths = cases(intermediate)
    for tokens in lengths:
        gate_up = (torch.randn(tokens, 2 * intermediate, generator=gen) * 4).to(dtype)
        out = poisoned(tokens, intermediate, dtype=dtype)
        activation.silu_mul(LAUNCHER, gate_up, out=out)
        want = activation.reference_silu_mul(gate_up)
        if dtype == torch.float16:
            assert torch.equal(out, want) or ((out != want).float().mean() < 0.01 and torch.isfinite(out).all())
        assert_close(out, want, dtype)


def test_library_runs_every_operation_on_the_interpreter():
    library = KernelLibrary(InterpretLauncher())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen).half()
    w = torch.randn(64, generator=gen).half()
    assert torch.equal(library.rms_norm(x, w, 1e-5), norm.rms_norm(LAUNCHER, x, w, 1e-5))
    assert torch.equal(library.silu_mul(torch.cat([x, x], 1)), activation.silu_mul(LAUNCHER, torch.cat([x, x], 1)))
    residual = x.clone()
    library.add_rmsnorm(residual, x, w, 1e-5)
    assert torch.equal(residual, x + x)
    qkv = torch.randn(3, 4 * 16, generator=gen).half()
    cache = torch.zeros(8, 1, 16).half()
    q, k, v = library.rotary_kv_write(qkv, torch.arange(3), torch.tensor([4, -1, 6]), torch.rand(8), 1.0, 0.1, 64,
                                      cache, cache.clone(), 2, 1, 16)
    assert q.shape == (3, 2, 16) and k.shape == v.shape == (3, 1, 16) and torch.equal(cache[4], k[0])
