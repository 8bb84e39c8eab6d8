"""Diffusion mode against a straightforward, dense, no-cache implementation of docs/design.md §5.2."""

import pytest
import torch

from helpers import make_engine, make_sticky_checkpoint
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.segments import Pattern, Segment

MASK = 100


def dense_logits(model, tokens, block_start, image_embeds=None):
    """Every row's logits: causal over tokens[:block_start], the block after it fully bidirectional.
    image_embeds: feature rows for the image tokens of tokens (VLM prompts)."""
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[block_start:, block_start:] = True
    return model.forward([Segment(0, tokens, list(range(n)), 0, Pattern.MASK, mask=mask,
                                  image_embeds=image_embeds)])[0]


def reference_diffusion(model, prompt, block, tau, max_new, eos_ids, image_embeds=None):
    seq = list(prompt)
    out = [int(dense_logits(model, seq, len(seq), image_embeds)[-1].argmax())]
    while len(out) < max_new:
        x = [out[-1]] + [MASK] * (block - 1)
        masked = [False] + [True] * (block - 1)
        steps, num_masks = 0, block - 1
        per_step = [num_masks // block + (1 if s < num_masks % block else 0) for s in range(block)]
        while any(masked):
            logits = dense_logits(model, seq + x, len(seq), image_embeds)[len(seq):]
            probs = torch.softmax(logits.double(), dim=-1)
            conf, cand = probs.max(dim=-1)
            open_pos = [j for j in range(block) if masked[j]]
            scores = torch.tensor([conf[j].item() for j in open_pos])
            if tau is not None:
                pick = {open_pos[i] for i in range(len(open_pos)) if scores[i] >= tau}
                pick.add(open_pos[int(scores.argmax())])
            else:
                k = max(1, per_step[steps]) if steps < block else 1
                pick = {open_pos[i] for i in torch.topk(scores, min(k, len(open_pos))).indices.tolist()}
            for j in pick:
                x[j], masked[j] = int(cand[j]), False
            steps += 1
            first_eos = next((j for j in range(1, block) if not masked[j] and x[j] in eos_ids), None)
            if first_eos is not None and not any(masked[:first_eos]):
                return out + x[1:first_eos + 1]
        out += x[1:]
        if len(out) >= max_new:
            break
        seq += x
        out.append(int(dense_logits(model, seq, len(seq), image_embeds)[-1].argmax()))
    return out[:max_new]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    return LLM(make_engine(make_sticky_checkpoint(root / "ckpt", seed=1), root / "engine", kv_page_size=4),
               device="cpu")


@pytest.mark.parametrize("tau", [0.9, 0.5, None])
@pytest.mark.parametrize("block", [4, 8, 32])
def test_diffusion_equals_reference(llm, tau, block, engine_fp32):
    prompts = [[1, 200, 201, 202], [1] + list(range(130, 150)), [1, 9, 100, 9, 44]]
    params = SamplingParams(max_new_tokens=37, ignore_eos=True, mode="diffusion", block_length=block, threshold=tau)
    for engine in (llm, LLM(engine_fp32, device="cpu")):
        outs = engine.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            assert out.output_ids == reference_diffusion(engine.model, prompt, block, tau, 37, set())
            assert len(out.output_ids) == 37
            steps = out.stats["denoise_steps_per_block"]
            commits = out.num_forward_passes - 1 - sum(steps)  # prefill + denoise steps + commits
            assert commits in (len(steps), len(steps) - 1)


def test_diffusion_eos_rule_matches_reference(llm):
    prompt = [1, 200, 201, 202]
    free = llm.generate(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True, mode="diffusion", block_length=8))
    eos = free[0].output_ids[10]
    llm.engine.eos_ids = frozenset({eos})
    try:
        out = llm.generate(prompt, SamplingParams(max_new_tokens=20, mode="diffusion", block_length=8))[0]
    finally:
        llm.engine.eos_ids = frozenset({2})
    want = reference_diffusion(llm.model, prompt, 8, 0.9, 20, {eos})
    want = want[: want.index(eos) + 1] if eos in want else want
    assert out.output_ids == want and out.finish_reason == "eos"


def test_diffusion_takes_fewer_forwards_than_tokens_on_a_confident_model(llm):
    out = llm.generate([1, 200, 201, 202], SamplingParams(max_new_tokens=64, ignore_eos=True, mode="diffusion",
                                                          block_length=32))[0]
    assert out.tokens_per_forward > 2.0
