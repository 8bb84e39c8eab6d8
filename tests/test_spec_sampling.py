"""At temperature > 0 the spec modes sample the AR distribution exactly (rejection sampling).

A goodness-of-fit test: the first three generated tokens of many seeded linear-spec and
quadratic-spec requests against the exact AR probabilities of every 3-token continuation
(computed here from dense forwards and a top-k softmax written in this file). Cells with
an expected count under 5 are pooled. The test fails when the chi-square p-value is below
1e-3: with a correct sampler that happens once in a thousand seeds (the seeds are fixed,
so the outcome is deterministic).
"""

import pytest
import torch

from helpers import make_checkpoint, make_engine
from nemodiff import LLM, SamplingParams
from nemodiff.runtime.model.segments import Segment

TOP_K, TEMPERATURE, SAMPLES = 3, 1.0, 2000
PROMPT = [1, 200, 37, 41]


def topk_softmax(row):
    values, ids = torch.topk(row.double() / TEMPERATURE, TOP_K)
    return dict(zip(ids.tolist(), torch.softmax(values, -1).tolist()))


def exact_ar_distribution(model):
    def next_probs(seq):
        return topk_softmax(model.forward([Segment(0, seq, list(range(len(seq))), 0)])[0][-1])

    table = {}
    for t1, p1 in next_probs(PROMPT).items():
        for t2, p2 in next_probs(PROMPT + [t1]).items():
            for t3, p3 in next_probs(PROMPT + [t1, t2]).items():
                table[(t1, t2, t3)] = p1 * p2 * p3
    return table


def chi_square_p_value(counts, expected_probs, n):
    cells = sorted(expected_probs, key=lambda c: -expected_probs[c])
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell in cells:
        e = expected_probs[cell] * n
        if e >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(e)
        else:
            pool_o += counts.get(cell, 0)
            pool_e += e
    outside = n - sum(counts.get(c, 0) for c in cells)  # sequences with zero AR probability
    assert outside == 0, f"{outside} samples outside the AR support"
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0))), dof


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    engine = make_engine(make_checkpoint(root / "ckpt", seed=2, lora_rank=8), root / "engine", kv_page_size=4)
    return LLM(engine, device="cpu", max_batch_size=SAMPLES, num_kv_pages=SAMPLES * 6)


@pytest.mark.parametrize("mode, block", [("ar", 4), ("linear-spec", 4), ("quadratic-spec", 3)])
def test_spec_sampling_matches_ar_distribution(llm, mode, block):
    table = exact_ar_distribution(llm.model)
    params = [SamplingParams(max_new_tokens=3, temperature=TEMPERATURE, top_k=TOP_K, seed=seed, ignore_eos=True,
                             mode=mode, block_length=block) for seed in range(SAMPLES)]
    outputs = llm.generate([PROMPT] * SAMPLES, params)
    counts = {}
    for out in outputs:
        counts[tuple(out.output_ids)] = counts.get(tuple(out.output_ids), 0) + 1
    p_value, dof = chi_square_p_value(counts, table, SAMPLES)
    assert dof >= 5  # the test has cells enough to see a wrong distribution
    assert p_value > 1e-3, f"{mode}: chi-square p = {p_value:.2e} over {dof} degrees of freedom"
    if mode != "ar":
        accepted = sum(sum(n * c for n, c in o.stats["accepted_length_histogram"].items() if n > 1) for o in outputs)
        assert accepted > 0  # some drafts were accepted, so the accept path was exercised too


def test_a_subtly_wrong_sampler_would_be_detected(llm):
    """Power check: rejection sampling that forgets the residual (resamples from p instead of
    normalise(max(p - q, 0)) after a rejection) is biased toward the draft; the test must see it."""
    table = exact_ar_distribution(llm.model)
    gen = torch.Generator().manual_seed(0)

    def draw(probs):
        tokens, weights = zip(*probs.items())
        return tokens[int(torch.multinomial(torch.tensor(weights), 1, generator=gen))]

    def conditional(prefix):
        mass = {}
        for cell, p in table.items():
            if cell[: len(prefix)] == prefix:
                mass[cell[len(prefix)]] = mass.get(cell[len(prefix)], 0.0) + p
        total = sum(mass.values())
        return {t: p / total for t, p in mass.items()}

    counts = {}
    for _ in range(SAMPLES):
        seq = ()
        for _ in range(3):
            p = conditional(seq)
            q = {t: 1.0 / len(p) for t in p}  # a draft that proposes the same tokens uniformly
            d = draw(q)
            u = float(torch.rand((), generator=gen))
            seq += (d,) if u < min(1.0, p[d] / q[d]) else (draw(p),)
        counts[seq] = counts.get(seq, 0) + 1
    p_value, _ = chi_square_p_value(counts, table, SAMPLES)
    assert p_value < 1e-3
