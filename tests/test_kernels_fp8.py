"""The weight-only fp8 GEMM (split K merged in the same launch) under Triton's interpreter, against
the dequantised weights, and its independence of M.

Tolerances: the kernel accumulates in float32 like the reference, so the only difference is
where float32 rounding falls; float16 outputs are then mostly bit-identical and at most one ulp
apart. bfloat16 outputs agree within one bfloat16 ulp plus the interpreter's truncation of
float32 -> bfloat16 (the GPU rounds to nearest even), i.e. within 2 ulps.
"""

import pytest
import torch

from nemodiff.builder.convert import quantize_fp8
from nemodiff.plugins import fp8_gemm
from nemodiff.plugins.launch import InterpretLauncher
from nemodiff.plugins.scratch import Counters

LAUNCHER = InterpretLauncher()
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def quantized(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8(torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen)))


def check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, num_sms: int) -> torch.Tensor:
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"), dtype=x.dtype)
    fp8_gemm.fp8_linear(LAUNCHER, x, weight, scale, num_sms=num_sms, out=out)
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T
    assert torch.isfinite(out).all(), "an output element was never written"
    error = (out.double() - exact).abs() / exact.abs().clamp(min=exact.abs().max() * 1e-3)
    ulps = 1.5 if x.dtype == torch.float16 else 2.5
    assert error.max() <= ulps * ULP[x.dtype], f"max error {error.max():.2e}"
    return out


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("m, n, k", [(1, 100, 300), (7, 33, 257), (64, 64, 512), (65, 48, 1040), (300, 40, 96),
                                     (33, 7, 96), (3, 50, 2050), (1, 40, 2048), (7, 96, 2048), (65, 40, 2048),
                                     (300, 32, 2048)])
def test_fp8_gemm_matches_the_dequantised_weights(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    weight, scale = quantized(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    check(x, weight, scale, num_sms=1)
    # enough K tiles to cut K into chunks: summed by split programs, or serially at large M (M = 300: in bf16
    # only, the interpreter is slow)
    if k >= 2048 and (m < 300 or dtype == torch.bfloat16):
        chunks, _, parallel = fp8_gemm.plan(m, n, k, num_sms=132)
        assert chunks > 1 and parallel
        check(x, weight, scale, num_sms=132)
        chunks, _, parallel = fp8_gemm.plan(m, n, k, num_sms=2)
        assert chunks == 2 and parallel == (-(-m // 16) * -(-n // 32) < 2 * 2)
        check(x, weight, scale, num_sms=2)


def test_every_m_from_1_to_80():
    gen = torch.Generator().manual_seed(11)
    weight, scale = quantized(40, 80, gen)
    x_all = torch.randn(80, 80, generator=gen).half()
    for m in list(range(1, 81, 5)) + [64, 65, 80]:
        check(x_all[:m], weight, scale, num_sms=1)


@pytest.mark.parametrize("num_sms", (1, 2, 132))
def test_a_row_is_the_same_alone_and_in_a_batch_of_80(num_sms):
    """fp8 means one thing at every M: row i of an 80-row product is bit-identical to the same row computed
    alone. num_sms 2: K in two chunks, summed by split programs at M = 1 and serially at M = 80; 132: split
    programs at both M; 1: no chunks."""
    gen = torch.Generator().manual_seed(14)
    weight, scale = quantized(40, 2048, gen)
    x = torch.randn(80, 2048, generator=gen).bfloat16()
    counters = Counters()
    batch = fp8_gemm.fp8_linear(LAUNCHER, x, weight, scale, num_sms=num_sms, counters=counters)
    for i in (0, 1, 15, 16, 47, 79):
        alone = fp8_gemm.fp8_linear(LAUNCHER, x[i:i + 1], weight, scale, num_sms=num_sms, counters=counters)
        assert torch.equal(alone[0], batch[i]), f"row {i} differs"
    assert not counters.get(1, "cpu").any(), "an arrival counter was left non-zero"
    if num_sms == 2:
        assert fp8_gemm.plan(1, 40, 2048, 2) == (2, 1024, True) and fp8_gemm.plan(80, 40, 2048, 2) == (2, 1024, False)


def test_float16_results_round_like_the_reference():
    gen = torch.Generator().manual_seed(12)
    weight, scale = quantized(64, 256, gen)
    x = torch.randn(16, 256, generator=gen).half()
    out = fp8_gemm.fp8_linear(LAUNCHER, x, weight, scale)
    want = fp8_gemm.reference_fp8_linear(x, weight, scale)
    assert (out == want).float().mean() > 0.98


def test_strided_rows_and_shape_errors():
    gen = torch.Generator().manual_seed(13)
    weight, scale = quantized(32, 64, gen)
    wide = torch.randn(8, 128, generator=gen).half()
    x = wide[:, :64]  # row stride 128, unit column stride
    out = fp8_gemm.fp8_linear(LAUNCHER, x, weight, scale)
    assert torch.allclose(out.float(), fp8_gemm.reference_fp8_linear(x.contiguous(), weight, scale).float(), rtol=2e-3,
                          atol=2e-3)
    with pytest.raises(ValueError, match="shapes do not match"):
        fp8_gemm.fp8_linear(LAUNCHER, x[:, :32], weight, scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm.fp8_linear(LAUNCHER, x, weight.half(), scale)


def test_split_choice_fills_the_gpu_at_decode_sizes():
    """The NLD-8B projections at M = 1 on 132 SMs: every GEMM launches at least two programs per SM,
    except where N alone already gives more; the chunks never depend on M, and large M sums them serially."""
    tiles = fp8_gemm.TILES
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        split = fp8_gemm.choose_split(n, k, 132)
        assert -(-n // tiles.block_n) * split >= 2 * 132 and k // split >= 4 * tiles.block_k
        plans = {m: fp8_gemm.plan(m, n, k, 132) for m in (1, 8, 16, 32, 64, 300, 1056)}
        assert len({(chunks, per) for chunks, per, _ in plans.values()}) == 1
        assert plans[1][2] == (split > 1) and not plans[1056][2]


@pytest.mark.parametrize("num_sms", (1, 132))
def test_the_dense_gemm_is_the_same_product_for_a_row_alone_and_in_any_batch(num_sms):
    """bf16 weights (the linears of bf16 engines, every head, the draft adapter) on the same kernel: row i of
    a 40-row product is bit-identical to the row alone (132 SMs: K in two chunks, split programs at M = 1,
    serial at M = 40), and both are x @ w.T to bf16 rounding."""
    gen = torch.Generator().manual_seed(15)
    weight = (torch.randn(40, 2048, generator=gen) / 40).bfloat16()
    x = torch.randn(40, 2048, generator=gen).bfloat16()
    counters = Counters()
    batch = fp8_gemm.dense_linear(LAUNCHER, x, weight, num_sms=num_sms, counters=counters)
    exact = x.double() @ weight.double().T
    assert ((batch.double() - exact).abs() <= 3 * ULP[torch.bfloat16] * exact.abs() + 1e-3).all()
    for i in (0, 17, 39):
        alone = fp8_gemm.dense_linear(LAUNCHER, x[i:i + 1], weight, num_sms=num_sms, counters=counters)
        assert torch.equal(alone[0], batch[i]), f"row {i} differs"
    assert fp8_gemm.plan(1, 40, 2048, num_sms)[0] == (2 if num_sms == 132 else 1)
    with pytest.raises(ValueError, match="weight must be a contiguous torch.bfloat16"):
        fp8_gemm.dense_linear(LAUNCHER, x, weight.half())


def test_launch_sites_count_arrivals_in_buffers_of_their_own():
    """Counters are zero between launches only on one stream, one kernel at a time: an attention launch still
    in flight (its tile counters part-way) must not be seen by a split GEMM. Each site has its own buffer."""
    gen = torch.Generator().manual_seed(16)
    weight, scale = quantized(40, 2048, gen)
    x = torch.randn(1, 2048, generator=gen).bfloat16()
    want = fp8_gemm.fp8_linear(LAUNCHER, x, weight, scale, num_sms=1)
    counters = Counters()
    in_flight = counters.site("attention").get(8, "cpu")
    in_flight[:4] = 1  # one split of each of four attention tiles has arrived
    got = fp8_gemm.fp8_linear(LAUNCHER, x, weight, scale, num_sms=132, counters=counters.site("gemm"))
    assert fp8_gemm.plan(1, 40, 2048, 132)[2]  # split programs merged through their counters
    assert torch.equal(got, want)
    assert in_flight[:4].tolist() == [1] * 4 and not counters.site("gemm").get(1, "cpu").any()
    assert counters.site("gemm").get(1, "cpu").data_ptr() != in_flight.data_ptr()
