"""Causal-mode logits equal transformers' Ministral3ForCausalLM on the same weights."""

import pytest
import torch

from helpers import make_checkpoint, make_engine, relative_error, transformers_model
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Pattern, Segment

ROPE_CASES = {
    # the published NLD parameters (factor 0.25 -> attention factor 1)
    "nld-default": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 0.25, "beta_fast": 32.0, "beta_slow": 1.0,
                    "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 16384,
                    "llama_4_scaling_beta": 0.1},
    # a small original length so the YaRN ramp and the llama-4 query scale both act within the test
    "yarn-long": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                  "original_max_position_embeddings": 8, "llama_4_scaling_beta": 0.1},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "original_max_position_embeddings": 16,
                    "llama_4_scaling_beta": 0.3},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_causal_logits_match_transformers(case, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", rope=ROPE_CASES[case], seed=3, num_hidden_layers=3)
    engine = load_engine(make_engine(ckpt, tmp_path / "engine"), device="cpu")
    reference = transformers_model(ckpt)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 384, (70,), generator=gen).tolist()  # 70 > 8 * e^(1) positions: scale steps
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    seg = Segment(0, ids, list(range(len(ids))), prefix_len=0, pattern=Pattern.CAUSAL)
    got = engine.model.forward([seg])[0]
    assert got.shape == want.shape
    assert relative_error(got, want) < 1e-5


def test_query_scale_is_active_beyond_original_length():
    from nemodiff.engine_format import RopeConfig
    from nemodiff.runtime.model.rope import RotaryEmbedding

    rope = RotaryEmbedding(RopeConfig(original_max_position_embeddings=8, llama_4_scaling_beta=0.1), 16, "cpu")
    scale = rope.query_scale(torch.tensor([0, 7, 8, 23, 24]))
    expected = torch.tensor([1.0, 1.0, 1 + 0.1 * torch.log(torch.tensor(2.0)), 1 + 0.1 * torch.log(torch.tensor(3.0)),
                             1 + 0.1 * torch.log(torch.tensor(4.0))])
    assert torch.allclose(scale, expected)
