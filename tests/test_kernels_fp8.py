"""The weight-only fp8 GEMM under Triton's interpreter, against the dequantised weights.

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
@pytest.mark.parametrize("m, n, k", [(1, 100, 300), (5, 33, 257), (16, 64, 512), (17, 48, 1040), (33, 7, 96),
                                     (64, 130, 160), (40, 96, 2048), (3, 50, 2050)])
def test_fp8_gemm_matches_the_dequantised_weights(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    weight, scale = quantized(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    check(x, weight, scale, num_sms=1)
    if k >= 2048:  # enough K tiles to split: the partial sums and their reduction
        tiles = fp8_gemm.tile_config(m)
        assert fp8_gemm.choose_split(m, n, k, tiles, num_sms=132) > 1
        check(x, weight, scale, num_sms=132)


def test_every_m_from_1_to_64_and_the_large_tiles():
    gen = torch.Generator().manual_seed(11)
    weight, scale = quantized(40, 80, gen)
    x_all = torch.randn(80, 80, generator=gen).half()
    for m in list(range(1, 65, 3)) + [64, 65, 80]:  # 65 and 80: the large-M tiles
        check(x_all[:m], weight, scale, num_sms=1)


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
    except where N alone already gives more; large M never splits."""
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        for m in (1, 8, 16, 32, 64):
            tiles = fp8_gemm.tile_config(m)
            split = fp8_gemm.choose_split(m, n, k, tiles, 132)
            programs = -(-m // tiles.block_m) * -(-n // tiles.block_n) * split
            assert programs >= 2 * 132 and k // split >= 4 * tiles.block_k
        assert fp8_gemm.choose_split(256, n, k, fp8_gemm.tile_config(256), 132) == 1
