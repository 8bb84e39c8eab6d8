"""Diffusion never outputs the mask token from a denoised position (docs/design.md §5.2).

The checkpoint's head favours the mask id at masked positions, so the best candidate is often
the mask id itself. Such a position stays masked and is predicted again; a block still masked
after B denoising steps takes each position's best non-mask candidate from the last denoising
forward. The engine is checked against a dense, no-cache implementation written here, and the
same implementation without the rule shows that the checkpoint really puts mask ids in the way.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers import make_checkpoint, make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.segments import Pattern, Segment

MASK = 100
PROMPTS = [[1, 30, 31, 32], [1, 200, 201], [1, 17, 18, 19, 20, 21]]


def dense_logits(model, tokens, block_start):
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[block_start:, block_start:] = True
    return model.forward([Segment(0, tokens, list(range(n)), 0, Pattern.MASK, mask=mask)])[0]


def reference(model, prompt, block, tau, max_new, mask_rule=True):
    """Returns (output ids, positions of the output that were denoised)."""
    seq, out, denoised = list(prompt), [], []
    out.append(int(dense_logits(model, seq, len(seq))[-1].argmax()))
    while len(out) < max_new:
        x, masked = [out[-1]] + [MASK] * (block - 1), [False] + [True] * (block - 1)
        steps = 0
        while any(masked):
            logits = dense_logits(model, seq + x, len(seq))[len(seq):]
            conf, cand = torch.softmax(logits.double(), -1).max(-1)
            open_pos = [j for j in range(block) if masked[j]]
            pick = {j for j in open_pos if conf[j] >= tau} | {max(open_pos, key=lambda j: (conf[j], -j))}
            for j in pick:
                if mask_rule and int(cand[j]) == MASK:
                    continue  # the position stays masked
                x[j], masked[j] = int(cand[j]), False
            steps += 1
            if mask_rule and steps >= block and any(masked):
                best = logits.clone()
                best[:, MASK] = float("-inf")
                for j in range(block):
                    if masked[j]:
                        x[j], masked[j] = int(best[j].argmax()), False
        denoised += range(len(out), len(out) + block - 1)
        out += x[1:]
        seq += x
        out.append(int(dense_logits(model, seq, len(seq))[-1].argmax()))
    return out[:max_new], [i for i in denoised if i < max_new]


@pytest.fixture(scope="module")
def mask_loving_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask-head")
    checkpoint = make_checkpoint(root / "ckpt", seed=4)
    weights = load_file(str(checkpoint / "model.safetensors"))
    head = weights["diffusion_head.weight"]
    probe = LLM(make_engine(checkpoint, root / "probe", kv_page_size=4), device="cpu")
    # the direction the final hidden states of masked positions share: make the mask id's row point there
    states = []
    for prompt in PROMPTS:
        logits = dense_logits(probe.model, prompt + [MASK] * 7, len(prompt))[len(prompt):]
        states.append(logits @ torch.linalg.pinv(head.T.float()))
    direction = F.normalize(torch.cat(states).mean(0), dim=0)
    head[MASK] = direction * head.norm(dim=1).max() * 2.5
    save_file(weights, str(checkpoint / "model.safetensors"))
    return make_engine(checkpoint, root / "engine", kv_page_size=4)


@pytest.mark.parametrize("tau", [0.9, None])
def test_denoised_positions_never_output_the_mask_token(mask_loving_engine, tau):
    llm = LLM(mask_loving_engine, device="cpu")
    block = 8
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, mode="diffusion", block_length=block, threshold=tau)
    outputs = llm.generate(PROMPTS, params)
    collided = 0
    for prompt, out in zip(PROMPTS, outputs):
        want, denoised = reference(llm.model, prompt, block, tau if tau is not None else 2.0, 30)
        assert out.output_ids == want
        assert all(out.output_ids[i] != MASK for i in denoised)
        old, _ = reference(llm.model, prompt, block, tau if tau is not None else 2.0, 30, mask_rule=False)
        collided += sum(old[i] == MASK for i in denoised)
    assert collided > 0, "the checkpoint was meant to make the mask id the best candidate"
