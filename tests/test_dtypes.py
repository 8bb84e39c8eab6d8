"""Reduced-precision engines against the fp32 engine of the same checkpoint.

Stated bounds (max |logit error| / max |fp32 logit|, over a 48-token causal forward):
bf16 <= 3e-2 and fp8 (e4m3 weights, per-channel scales, bf16 activations) <= 1e-1.
Both must still agree with fp32 on the argmax of most positions.
"""

import pytest
import torch

from helpers import make_engine, relative_error
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Segment

BOUNDS = {"bf16": 3e-2, "fp8": 1e-1}


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_reduced_precision_logits_close_to_fp32(dtype, checkpoint, engine_fp32, tmp_path):
    ids = torch.randint(0, 384, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    seg = Segment(0, ids, list(range(48)), 0)
    want = load_engine(engine_fp32, device="cpu").model.forward([seg])[0]
    engine = load_engine(make_engine(checkpoint, tmp_path / dtype, dtype=dtype, arch="h100"), device="cpu")
    got = engine.model.forward([seg])[0]
    error = relative_error(got, want)
    assert error <= BOUNDS[dtype], f"{dtype}: relative error {error:.4f}"
    assert error > 0  # really a different precision
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"{dtype}: argmax agreement {agree:.2f}"
