"""Norm and SiLU kernels: their real Triton code under the interpreter against the PyTorch
references, on random seeded shapes, with poisoned outputs; the kernel library end to end. (RoPE
and the KV-cache write are fused into attention: tests/test_kernel_attention.py.)

Tolerances: float32 within 1e-5 relative. float16 follows the reference's rounding steps, so
results are bit-identical except where float32 intermediates (a sum's order, cos/sin) differ in
the last bit: at most one float16 ulp. bfloat16: the interpreter truncates float32 -> bfloat16
(the GPU rounds to nearest even), so results agree to two bfloat16 ulps; the GPU device checks
hold the compiled kernels to the reference.
"""

import pytest
import torch

from nemodiff.plugins import activation, norm
from nemodiff.plugins.attention import AttentionMeta
from nemodiff.plugins.launch import InterpretLauncher
from nemodiff.plugins.ops import KernelLibrary

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
    # attention straight from qkv: one causal segment of 3 tokens at positions 0..2, two of them stored;
    # token 0 sees only itself, at position 0 (no rotation): its output and its cached k are its v and k
    qkv = torch.randn(3, 4 * 32, generator=gen).half()
    k_cache, v_cache = torch.zeros(8, 1, 32).half(), torch.zeros(8, 1, 32).half()
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    meta = AttentionMeta(i32(0, 3), i32(0), i32(0), i32(0)[None], i32(0), i32(0), i32(0), i32(0), i32(0), page_size=8,
                         block_m=32, num_splits=1, workspace=None)
    rope = type("Rope", (), {"inv_freq": torch.rand(16), "attention_factor": 1.0, "beta": 0.1, "original_max": 64})
    out = library.segment_attention(qkv, torch.arange(3), torch.tensor([4, -1, 6]), rope, k_cache, v_cache, meta,
                                    32 ** -0.5, 2, 1, 32)
    assert out.shape == (3, 2, 32) and torch.isfinite(out).all()
    assert torch.equal(out[0], qkv[0, 96:].expand(2, 32)) and torch.equal(k_cache[4, 0], qkv[0, 64:96])
    assert torch.equal(v_cache[4, 0], qkv[0, 96:]) and torch.equal(v_cache[6, 0], qkv[2, 96:])
    assert not k_cache[[0, 1, 2, 3, 5, 7]].any() and not v_cache[[0, 1, 2, 3, 5, 7]].any()
