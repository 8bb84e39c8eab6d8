"""Weight-holding building blocks of the forward pass: the linear layers (RMSNorm is nemodiff/plugins/reference.py's).

checkpoint ──builder──▶ engine dir ──[runtime: model layers]──▶ Triton

`DenseLinear` holds fp32/bf16/fp16 weights; with kernels, bf16/fp16 products run the project's own
GEMM (the fp8 kernel's tiles and K chunks, nemodiff/plugins/fp8_gemm.py), whose row results do not
depend on how many rows ride along (cuBLAS picks its kernel and split by M). `Fp8Linear` holds e4m3 weights with one
float32 scale per output channel: the weight-only fp8 kernel on the kernel path, else it
dequantizes into the activation dtype (the portable path that also runs on CPU).
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # fp32 engines keep torch's product: the exact reference


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, kernels=None) -> torch.Tensor:
        if kernels is not None and self.weight.dtype in KERNEL_DTYPES:
            return kernels.dense_linear(x, self.weight)
        return x @ self.weight.T


class Fp8Linear:
    """e4m3 weights with per-output-channel scales.

    With kernels, every product runs the weight-only fp8 kernel (bf16 activations, weights
    converted in registers, one launch), whatever the number of rows: its per-row reduction
    does not depend on M, so a 32-row verify forward gives the rows a one-row AR step gives.
    Without kernels (the reference path, any device) the weight is dequantized into the
    activation dtype and multiplied.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        if weight.dtype != torch.float8_e4m3fn:
            raise TypeError(f"Fp8Linear wants float8_e4m3fn weights, got {weight.dtype}")
        self.weight = weight
        self.scale = scale.float()
        self.dtype = dtype

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized(self) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(self.dtype)

    def __call__(self, x: torch.Tensor, kernels=None) -> torch.Tensor:
        if kernels is not None:
            return kernels.fp8_linear(x, self.weight, self.scale)
        return x @ self.dequantized().T


def make_linear(weights: dict[str, torch.Tensor], name: str, dtype: torch.dtype, device) -> DenseLinear | Fp8Linear:
    weight = weights[name].to(device)
    if weight.dtype == torch.float8_e4m3fn:
        return Fp8Linear(weight, weights[name + ".scale"].to(device), dtype)
    return DenseLinear(weight.to(dtype))
