"""On a CPU device greedy needs are decided in numpy (`nemodiff/runtime/decoding/decision_pass_numpy.py`); a GPU runs the
tensor kinds. Both must give the same answers: here one step's worth of every kind of need, with
ragged groups, ties, mask-id candidates, ranked schedules and partial acceptances, is decided
both ways on the same logits and the packed answers are compared entry for entry."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nemodiff import SamplingParams
from nemodiff.runtime.decoding import decision_pass_numpy
from nemodiff.runtime.decoding.decision_pass import Decider

VOCAB, MASK = 50, 7


def strategy():
    return SimpleNamespace(params=SamplingParams(temperature=0.0), draw_counter=0, seed=1, draft_probs=None)


def register_step(decider: Decider, rng: np.random.Generator, logits: torch.Tensor, ids: torch.Tensor,
                  verify_lengths: tuple, quad_lengths: tuple, all_skip_mask: bool):
    """Registers needs of every kind over consecutive logit rows and fills `ids` with drafts that
    agree with the greedy tokens for a different number of positions per request. Returns (handles, rows used)."""
    handles, row, token = [], 0, 0
    ids[0] = logits[0].argmax()  # a seed token, never compared as a draft
    offset = int(rng.integers(0, 4))

    def drafts_matching(first_row: int, token_row: int, m: int, longest: int) -> None:
        if m < longest:  # padded to the longest: every target is row 0's token and every draft matches, so
            logits[first_row: first_row + m] = logits[0]  # a padding lane compared like a draft would match too
            agree = m - 1
        else:
            agree = (len(handles) + offset) % m  # drafts d_1..d_agree match their targets
        for j in range(1, m):
            target = int(logits[first_row + j - 1].argmax())
            ids[token_row + j] = target if j <= agree else (target + 1) % VOCAB

    for count in (1, 1, 3):
        handles.append(decider.sample(strategy(), row))
        row += 1
        handles.append(decider.drafts(strategy(), row, count))
        row += count
    for count, threshold, topk, last, skip in [(5, 0.9, 0, False, True), (1, 0.9, 0, False, True),
                                               (8, None, 3, False, True), (6, 0.05, 0, True, True),
                                               (4, 0.3, 0, False, False), (7, None, 2, True, True)]:
        lanes = np.sort(rng.choice(32, size=count, replace=False))
        handles.append(decider.candidates(strategy(), row, count, lanes, threshold, topk, last, skip or all_skip_mask))
        row += count
    # two rows whose confidences differ only in float64: the second is the more confident one
    logits[row] = logits[row + 1] = torch.linspace(0, 4, VOCAB)
    logits[row + 1, 5] = float(np.nextafter(np.float32(logits[row + 1, 5]), np.float32(-np.inf)))
    handles.append(decider.candidates(strategy(), row, 2, np.arange(2), None, 1, False, True))
    row += 2
    for m in verify_lengths:
        drafts_matching(row, token, m, max(verify_lengths))
        handles.append(decider.verify(strategy(), row, m, token))
        row, token = row + m, token + m
    for k in quad_lengths:
        drafts_matching(row, token, k, max(quad_lengths))
        handles.append(decider.quad(strategy(), row, k, token))
        row, token = row + k + k * (k - 1), token + k * (k + 1)
    return handles, row


def make_logits(rng: np.random.Generator, rows: int) -> torch.Tensor:
    logits = torch.from_numpy(rng.normal(size=(rows, VOCAB)).astype(np.float32) * 3)
    logits[rng.integers(0, rows, size=rows // 4), MASK] = 30.0  # the mask id is some rows' best candidate
    logits[2::9] = logits[1::9][: len(logits[2::9])]  # identical rows: ties for a block's best
    sharp = rng.integers(0, rows, size=rows // 3)
    logits[sharp, 0] = 40.0  # confident rows, above any threshold
    return logits


@pytest.mark.parametrize("verify_lengths, quad_lengths, all_skip_mask",
                         [((4, 4, 2, 1), (3, 3, 2), False), ((4, 4, 4, 4), (3, 3, 3), True)], ids=["ragged", "steady"])
@pytest.mark.parametrize("seed", range(6))
def test_numpy_and_tensor_decisions_agree(seed, verify_lengths, quad_lengths, all_skip_mask):
    rng = np.random.default_rng(seed)
    logits = make_logits(rng, 200)
    ids = torch.from_numpy(rng.integers(0, VOCAB, size=200))
    answers = []
    for host_arrays in (True, False):
        decider = Decider(torch.device("cpu"), MASK, host_arrays=host_arrays)
        decider.begin()
        step_rng = np.random.default_rng(seed)
        handles, rows = register_step(decider, step_rng, logits, ids, verify_lengths, quad_lengths, all_skip_mask)
        decider.run(logits[:rows], ids)
        decider.fetch()
        assert isinstance(decider._packed, np.ndarray) == host_arrays
        answers.append([decider.result(h).tolist() for h in handles] + [decider.bad_rows().tolist()])
    host, tensor = answers
    assert host == tensor
    verify, quad = host[-1 - len(quad_lengths) - len(verify_lengths): -1 - len(quad_lengths)], host[-4:-1]
    assert len({a[0] for a in verify}) > 1 and len({a[0] for a in quad}) > 1  # acceptances differ
    assert host[-2 - len(quad_lengths) - len(verify_lengths)] == [MASK, VOCAB - 1]  # the float64 tie-break


def test_host_decisions_fall_back_to_tensors_for_sampled_needs():
    decider = Decider(torch.device("cpu"), MASK)
    decider.begin()
    hot = SimpleNamespace(params=SamplingParams(temperature=1.0, seed=5), draw_counter=0, seed=5, draft_probs=None)
    greedy, sampled = decider.sample(strategy(), 0), decider.sample(hot, 1)
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 1.0
    decider.run(logits, torch.zeros(2, dtype=torch.int64))
    decider.fetch()
    assert decider.result(greedy).tolist() == [3]
    assert 0 <= int(decider.result(sampled)[0]) < VOCAB


@pytest.mark.parametrize("threshold, topk, last, skip", [(0.9, 0, False, True), (0.1, 0, True, True),
                                                         (None, 3, False, True), (0.5, 0, False, False)])
@pytest.mark.parametrize("seed", range(4))
def test_one_block_decisions_agree(seed, threshold, topk, last, skip):
    """A step with one denoising request takes the host path's one-block reductions."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(12, VOCAB)).astype(np.float32))  # no row is confident
    logits[4, 3] = logits[9, 3] = 2.5  # the two best rows, tied, below every threshold but 0.1
    logits[6, MASK] = 2.0
    answers = []
    for host_arrays in (True, False):
        decider = Decider(torch.device("cpu"), MASK, host_arrays=host_arrays)
        decider.begin()
        handle = decider.candidates(strategy(), 0, 12, np.arange(1, 13), threshold, topk, last, skip)
        decider.run(logits, torch.zeros(12, dtype=torch.int64))
        decider.fetch()
        answers.append(decider.result(handle).tolist())
    assert answers[0] == answers[1]


def test_steady_quadratic_checks_the_rows_it_reads():
    """Back-to-back QuadraticSpec needs read only their k target rows and the k-1 rows of the
    accepted group: a non-finite value there is reported, one in a group nobody reads is not."""
    k, rng = 3, np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(2 * k * k, VOCAB)).astype(np.float32))
    ids = torch.full((2 * k * (k + 1),), VOCAB - 1)  # drafts no target matches: each request accepts n = 1
    logits[:, VOCAB - 1] = -100.0

    def bad_rows(poisoned: int) -> list[int]:
        decider = Decider(torch.device("cpu"), MASK)
        decider.begin()
        for i in range(2):
            decider.quad(strategy(), i * k * k, k, i * k * (k + 1))
        x = logits.clone()
        x[poisoned, 5] = float("nan")
        decider.run(x, ids)
        decider.fetch()
        return decider.bad_rows().tolist()

    # request 1's rows: targets 9..11, group 0 (read at n = 1) 12..13, groups 1-2 14..17
    assert bad_rows(10) == [10]
    assert bad_rows(12) == [12]
    assert bad_rows(15) == []


@pytest.mark.parametrize("case", ["usual", "last step", "near threshold", "rival", "mask id best"])
@pytest.mark.parametrize("seed", range(3))
def test_usual_denoising_steps_agree(seed, case, monkeypatch):
    """Many blocks under one threshold (the usual diffusion step) take the host path's few array
    operations; a confidence near the threshold or a rival of a block's best sends the step to the
    general path. Either way the answers are the tensor kinds'."""
    usual = decision_pass_numpy._usual_denoising
    took = []
    monkeypatch.setattr(decision_pass_numpy, "_usual_denoising", lambda *a: took.append(usual(*a) is not None) or usual(*a))
    rng = np.random.default_rng(seed)
    counts = [5, 3, 8, 1, 6]
    rows = sum(counts)
    logits = torch.from_numpy(rng.normal(size=(rows, VOCAB)).astype(np.float32) * 2)
    logits[[0, 3, 20], 0] = 40.0  # confident rows, above the threshold (block 0 has two: rivals, both written)
    threshold = 0.9
    if case == "near threshold":  # softmax(row)[0] = 0.9 + 1e-6: float32 cannot tell which side it is on
        logits[2] = 0.0
        logits[2, 0] = float(np.log(0.900001 * (VOCAB - 1) / 0.099999))
    if case == "rival":  # block 2's two best rows, below the threshold, are one float32 step apart
        logits[8:16] = 0.0
        logits[8, 5] = 4.0
        logits[9, 5] = float(np.nextafter(np.float32(4.0), np.float32(-np.inf)))
    if case == "mask id best":
        logits[[0, 5, 10], MASK] = 50.0
    answers = []
    for host_arrays in (True, False):
        decider = Decider(torch.device("cpu"), MASK, host_arrays=host_arrays)
        decider.begin()
        handles, row = [], 0
        for i, count in enumerate(counts):
            last = case == "last step" and i % 2 == 0
            handles.append(decider.candidates(strategy(), row, count, np.arange(1, count + 1), threshold, 0, last,
                                              True))
            row += count
        decider.run(logits, torch.zeros(rows, dtype=torch.int64))
        decider.fetch()
        answers.append([decider.result(h).tolist() for h in handles])
    assert answers[0] == answers[1]
    assert took == [case not in ("near threshold", "rival")]
    written = [t for block in answers[0] for t in block]
    assert any(t != MASK for t in written)
    if case == "last step":
        assert all(t != MASK for block in answers[0][0::2] for t in block)
