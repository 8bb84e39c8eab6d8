"""Weight-holding building blocks of the forward pass: RMSNorm and linear layers.

checkpoint ──builder──▶ engine dir ──[runtime: model layers]──▶ Triton

`DenseLinear` holds fp32/bf16/fp16 weights. `Fp8Linear` holds e4m3 weights with one
float32 scale per output channel; it dequantizes into the activation dtype (the portable
path that also runs on CPU).
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back, then scale (the order transformers uses)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, kernels=None) -> torch.Tensor:
        return x @ self.weight.T


class Fp8Linear:
    """e4m3 weights with per-output-channel scales.

    With kernels, up to `WEIGHT_ONLY_MAX_ROWS` rows (decode) run the weight-only fp8 kernel:
    bf16 activations, weights dequantized in registers. Larger products run as an fp8 GEMM
    (`torch._scaled_mm`, per-token activation scales) on GPUs with fp8 tensor cores (sm_89+);
    elsewhere the weight is dequantized into the activation dtype.
    """

    WEIGHT_ONLY_MAX_ROWS = 64

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        if weight.dtype != torch.float8_e4m3fn:
            raise TypeError(f"Fp8Linear wants float8_e4m3fn weights, got {weight.dtype}")
        self.weight = weight
        self.scale = scale.float()
        self.dtype = dtype
        self.use_scaled_mm = (weight.is_cuda and torch.cuda.get_device_capability(weight.device) >= (8, 9)
                              and hasattr(torch, "_scaled_mm"))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized(self) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(self.dtype)

    def __call__(self, x: torch.Tensor, kernels=None) -> torch.Tensor:
        if kernels is not None and x.shape[0] <= self.WEIGHT_ONLY_MAX_ROWS:
            return kernels.fp8_linear(x, self.weight, self.scale)
        if self.use_scaled_mm:
            try:
                return self._fp8_gemm(x)
            except RuntimeError:  # this GPU/torch lacks row-wise scaled GEMMs: stay on the portable path
                self.use_scaled_mm = False
        return x @ self.dequantized().T

    def _fp8_gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = -(-rows // 16) * 16  # fp8 GEMMs want dimensions in multiples of 16
        if padded != rows:
            x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
        x_fp8 = (x.float() / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x_fp8, self.weight.T, scale_a=x_scale, scale_b=self.scale[None, :],
                               out_dtype=self.dtype)
        return out[:rows]


def make_linear(weights: dict[str, torch.Tensor], name: str, dtype: torch.dtype, device) -> DenseLinear | Fp8Linear:
    weight = weights[name].to(device)
    if weight.dtype == torch.float8_e4m3fn:
        return Fp8Linear(weight, weights[name + ".scale"].to(device), dtype)
    return DenseLinear(weight.to(dtype))
