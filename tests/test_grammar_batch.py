"""Structured output, batched (nemodiff/runtime/decoding/grammar_batch.py): the step's grammar work in lockstep.

The batched jobs must decide what one request's per-row work (grammar.py's `masks` and `walk`) decides:
batch fills equal per-row fills, try-accept at temperature 0 gives the tokens full masks give, walks and
denoising reveals pick the same tokens, and every matcher stands after its output again afterwards. The
greedy jobs run twice, in the Python rounds and in the native walk (grammar_native.py), which must agree
row for row, NaN logits and follow-ups included.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nemodiff.runtime.decoding import grammar_native
from nemodiff.runtime.decoding.grammar import apply_only, greedy_pick, unpack
from nemodiff.runtime.decoding.grammar_batch import run_jobs
from nemodiff.runtime.decoding.grammar_jobs import DIFFUSE, MASKS, VERIFY, WALK, FollowUp, GuideJob, OnlyTokens
from nemodiff.runtime.decoding.grammar_reveal import Diffuse
from nemodiff.runtime.request import Guide

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
          "required": ["name", "n"]}
REQUESTS, ROWS = 6, 5


@pytest.fixture(scope="module")
def grammars(served_llm):
    return served_llm.engine.grammars()


def matchers(grammars, seed: int):
    """REQUESTS matchers of one schema, each advanced by a different number of masked-greedy tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(REQUESTS):
        m = grammars.matcher(Guide("json_schema", json.dumps(SCHEMA)))
        x = torch.randn(i, grammars.vocab_size, generator=gen)
        if i:
            walked = masked_argmax(x, m.walk(x, greedy_pick))
            assert m.advance(walked)[0] == len(walked)
        out.append(m)
    return out


def masked_argmax(x: torch.Tensor, rows) -> list[int]:
    """The rows' first maxima under bitmask rows, or under a job's OnlyTokens (each row one token or all)."""
    if isinstance(rows, OnlyTokens):
        x = x.clone()
        if rows.tokens is not None:
            forced = np.flatnonzero(rows.tokens >= 0)
            apply_only(x, forced, rows.tokens[forced], keep=False)
        return x.numpy().argmax(1).tolist()
    return x.masked_fill(~unpack(torch.from_numpy(rows), x.shape[1]), float("-inf")).numpy().argmax(1).tolist()


def masked_rows(rows) -> int:
    if isinstance(rows, OnlyTokens):
        return 0 if rows.tokens is None else int((rows.tokens >= 0).sum())
    return int((rows != -1).any(axis=1).sum())


def greedy_walks(ms, x: torch.Tensor, rows: int = ROWS) -> list[list[int]]:
    """Each request's greedy tokens under its grammar, walked one row at a time (the per-row reference)."""
    return [masked_argmax(x[i * ROWS: i * ROWS + rows], m.walk(x[i * ROWS: i * ROWS + rows], greedy_pick))
            for i, m in enumerate(ms)]


def state(m) -> np.ndarray:
    return m.masks()[0].copy()


def logits(grammars, seed: int, boosted: list[list[int]] | None = None) -> torch.Tensor:
    """[REQUESTS * ROWS, vocab] random rows; boosted[i][j]: a token made row j's greedy choice (or -1)."""
    x = torch.randn(REQUESTS * ROWS, grammars.vocab_size, generator=torch.Generator().manual_seed(seed))
    for i, tokens in enumerate(boosted or []):
        for j, token in enumerate(tokens):
            if token >= 0:
                x[i * ROWS + j, token] += 50.0
    return x


def test_batch_fills_equal_per_row_fills(grammars):
    ms = matchers(grammars, 0)
    before = [state(m) for m in ms]
    x = logits(grammars, 1)
    drafts = greedy_walks(ms, x, ROWS - 1)
    drafts[1][1] = 0  # a draft the grammar refuses: the rows after it allow everything
    expected = [m.masks(d) for m, d in zip(ms, drafts)]
    jobs = [(i * ROWS, GuideJob(m, ROWS, MASKS, drafts=d)) for i, (m, d) in enumerate(zip(ms, drafts))]
    for got, want in zip(run_jobs(jobs, x), expected):
        np.testing.assert_array_equal(got, want)
    assert all((state(m) == b).all() for m, b in zip(ms, before))  # every look-ahead rolled back


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_try_accept_verification_gives_the_tokens_of_full_masks(grammars, native):
    ms = matchers(grammars, 2)
    before = [state(m) for m in ms]
    plain = logits(grammars, 3)
    # greedy rows: half of them made the grammar's own choice (taken by try-accept, never filled)
    walks = greedy_walks(ms, plain)
    x = logits(grammars, 3, [[t if (i + j) % 2 else -1 for j, t in enumerate(w)] for i, w in enumerate(walks)])
    drafts = [w[:ROWS - 1] for w in walks]
    drafts[2][2] = (drafts[2][2] + 1) % grammars.vocab_size  # a mismatch mid-way
    jobs = [(i * ROWS, GuideJob(m, ROWS, VERIFY, drafts=d)) for i, (m, d) in enumerate(zip(ms, drafts))]
    results = run_jobs(jobs, x, native)
    masked = 0
    for i, (m, d, rows) in enumerate(zip(ms, drafts, results)):
        full = masked_argmax(x[i * ROWS: (i + 1) * ROWS], m.masks(d))
        tried = masked_argmax(x[i * ROWS: (i + 1) * ROWS], rows)
        n = next((j + 1 for j in range(ROWS - 1) if full[j] != d[j]), ROWS)
        assert tried[:n] == full[:n], i  # the verification's tokens: accepted drafts and the bonus
        masked += masked_rows(rows)
    assert 0 < masked < REQUESTS * ROWS  # some rows needed a mask, the try-accepted ones did not
    assert all((state(m) == b).all() for m, b in zip(ms, before))


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_batched_walks_and_reveals_pick_what_one_request_picks(grammars, native):
    ms = matchers(grammars, 4)
    before = [state(m) for m in ms]
    plain = logits(grammars, 5)
    walks = greedy_walks(ms, plain)
    x = logits(grammars, 5, [[t if j % 2 else -1 for j, t in enumerate(w)] for w in walks])
    expected = greedy_walks(ms, x)
    jobs = [(i * ROWS, GuideJob(m, ROWS, WALK)) for i, m in enumerate(ms)]
    got = [masked_argmax(x[i * ROWS: (i + 1) * ROWS], rows) for i, rows in enumerate(run_jobs(jobs, x, native))]
    for job, g, e in zip((j for _, j in jobs), got, expected):
        walked = len(job.picks)
        assert walked and g[:walked] == e[:walked] == job.picks
    # denoising reveals (thresholds, a top-k schedule, a block's last step): the per-row rule of
    # grammar.py's walk with a decide function
    for tau, k, last in ((0.05, 0, False), (0.5, 0, False), (None, 2, False), (0.5, 0, True)):
        picks = []
        for i, m in enumerate(ms):
            seen: list[int] = []

            def decide(j, row, seen=seen, tau=tau, k=k, last=last):
                probs = torch.softmax(row.double(), dim=-1)
                token = int(row.numpy().argmax())
                if j == 0 or last or (probs[token] >= tau if tau is not None else j < k):
                    seen.append(token)
                    return token
                return None
            m.walk(x[i * ROWS: (i + 1) * ROWS], decide)
            picks.append(seen)
        jobs = [(i * ROWS, GuideJob(m, ROWS, DIFFUSE, diffuse=Diffuse(tau, k, last, 0.0))) for i, m in enumerate(ms)]
        run_jobs(jobs, x, native)
        assert [job.picks for _, job in jobs] == picks, (tau, k, last)
    assert all((state(m) == b).all() for m, b in zip(ms, before))


def test_native_walk_builds_and_agrees_with_the_rounds(grammars):
    """The native walk is built here (a missing compiler would silently leave the Python rounds), and on
    verifications with a follow-up walk (QuadraticSpec's cycle), walks after look-ahead tokens and rows
    holding NaN it decides exactly what the Python rounds decide: the same tokens, picks, and matchers
    standing after their outputs."""
    import shutil

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert (grammar_native.walker() is not None) == bool(compiler)  # without one, both runs below are Python
    ms = matchers(grammars, 6)
    before = [state(m) for m in ms]
    walks = greedy_walks(ms, logits(grammars, 7))
    rows = ROWS * ROWS  # a verification of ROWS rows, then ROWS groups of ROWS - 1 rows (QuadraticSpec's layout)
    x = torch.randn(REQUESTS * rows, grammars.vocab_size, generator=torch.Generator().manual_seed(8))
    for i, w in enumerate(walks):
        for j, t in enumerate(w[:ROWS - 1]):
            if (i + j) % 3:
                x[i * rows + j, t] += 50.0  # mostly the grammar's choice: verifications run on
    x[2, 7] = x[rows + 3, 0] = float("nan")

    def jobs():
        out = []
        for i, (m, w) in enumerate(zip(ms, walks)):
            if i % 2:
                job = GuideJob(m, rows, VERIFY, drafts=w[:ROWS - 1], walk=ROWS, then=FollowUp(ROWS, ROWS - 1, ROWS - 1, 3))
            else:
                job = GuideJob(m, rows, WALK, after=w[:1], walk=rows - i)
            out.append((i * rows, job))
        return out

    native_jobs, python_jobs = jobs(), jobs()
    native, python = run_jobs(native_jobs, x, True), run_jobs(python_jobs, x, False)
    for (_, a), (_, b), got, want in zip(native_jobs, python_jobs, native, python):
        assert a.picks == b.picks and a.depth == b.depth
        assert (got.tokens is None) == (want.tokens is None)
        if got.tokens is not None:
            np.testing.assert_array_equal(got.tokens, want.tokens)
    assert any(r.tokens is not None and (r.tokens[ROWS:] >= 0).any() for r in python)  # a follow-up walked
    # applied in place by the native walk: the logits apply_only gives the Python rounds' rows
    applied, expected = x.clone(), x.clone()
    assert not len(run_jobs(jobs(), applied, True, apply=True).rows)
    for (first, _), rows in zip(python_jobs, python):
        if rows.tokens is not None:
            chosen = np.flatnonzero(rows.tokens >= 0)
            apply_only(expected, first + chosen, rows.tokens[chosen], keep=False)
    torch.testing.assert_close(applied, expected, rtol=0, atol=0, equal_nan=True)
    assert all((state(m) == b).all() for m, b in zip(ms, before))
    # a follow-up that would reach past its job's rows: that job alone fails (all ones) before it accepts a token
    short = [(0, GuideJob(ms[1], 2 * ROWS, VERIFY, drafts=walks[1][:ROWS - 1], walk=ROWS,
                          then=FollowUp(ROWS, ROWS - 1, ROWS - 1, 3))), (2 * ROWS, GuideJob(ms[2], ROWS, WALK))]
    failed, fine = run_jobs(short, x[:3 * ROWS], True)
    assert failed.tokens is None and short[1][1].picks
    assert all((state(m) == b).all() for m, b in zip(ms, before))


def test_without_a_compiler_the_rounds_walk(grammars, monkeypatch, tmp_path, caplog):
    """No compiler (and nothing cached): one warning, no native walk, and run_jobs still decides."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(grammar_native, "_LOADED", [])
    assert grammar_native.walker() is None and "native walk is unavailable" in caplog.text
    ms = matchers(grammars, 12)
    x = logits(grammars, 13)
    jobs = [(i * ROWS, GuideJob(m, ROWS, WALK)) for i, m in enumerate(ms)]
    run_jobs(jobs, x)
    assert [job.picks for _, job in jobs] == [w[:len(job.picks)] for w, (_, job) in zip(greedy_walks(ms, x), jobs)]
    assert all(job.picks for _, job in jobs)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_kept_look_ahead_is_the_state_of_the_committed_output(grammars, native):
    """A verification keeps the tokens its rows decided accepted (`ahead`): committing exactly them, a
    part of them, or other tokens leaves each matcher where a fresh matcher given the same output stands,
    and a denoising step's next `after` starting with what it kept is not accepted twice."""
    ms, fresh = matchers(grammars, 9), matchers(grammars, 9)
    x = logits(grammars, 10)
    walks = greedy_walks(ms, x)
    jobs = [(i * ROWS, GuideJob(m, ROWS, VERIFY, drafts=w[:ROWS - 1])) for i, (m, w) in enumerate(zip(ms, walks))]
    run_jobs(jobs, x, native)
    assert all(m.ahead == job.picks and job.picks for m, (_, job) in zip(ms, jobs))
    picks = [job.picks for _, job in jobs]
    commits = [picks[0], picks[1][:1], [], walks[3][:2], walks[4][:1] + [0], picks[5] + [0]]
    for m, f, commit in zip(ms, fresh, commits):
        assert m.advance(commit) == f.advance(commit) and m.ahead == []
        np.testing.assert_array_equal(state(m), state(f))
    # a denoising step keeps what it revealed; the next step's `after` starts with it
    m, f = ms[0], fresh[0]
    job = GuideJob(m, ROWS, DIFFUSE, diffuse=Diffuse(None, 2, False, 0.0), only=0)
    run_jobs([(0, job)], x[:ROWS], native)
    revealed = list(job.picks)
    assert m.ahead == revealed and len(revealed) == 2
    again = GuideJob(m, ROWS - 2, DIFFUSE, after=revealed, diffuse=Diffuse(None, 2, False, 0.0), only=0)
    run_jobs([(0, again)], x[2:ROWS], native)
    assert again.settled == 0 and m.ahead == revealed + again.picks  # the kept tokens were not accepted again
    reference = GuideJob(f, ROWS - 2, DIFFUSE, after=revealed, diffuse=Diffuse(None, 2, False, 0.0), only=0)
    run_jobs([(0, reference)], x[2:ROWS], native)
    assert reference.settled == 2 and reference.picks == again.picks
    assert m.advance(revealed + again.picks) == f.advance(revealed + again.picks)
    np.testing.assert_array_equal(state(m), state(f))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_token_rows_equal_their_bitmasks_and_give_back_the_originals(dtype):
    """apply_only (a walked row allows its token alone) sets the logits a one-hot bitmask sets, on the numpy
    path (float32 on the host) and the tensor path alike, and returns the rows as they were."""
    from nemodiff.runtime.decoding.grammar import apply_masks, one_hot, words

    vocab = 100
    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(7)).to(dtype)
    rows, tokens = np.array([1, 4, 5]), np.array([3, 99, 0])
    by_tokens, by_bits = x.clone(), x.clone()
    original = apply_only(by_tokens, rows, tokens, keep=True)
    apply_masks(by_bits, rows, np.stack([one_hot(int(t), words(vocab)) for t in tokens]), keep=False)
    assert torch.equal(by_tokens, by_bits)
    assert torch.equal(original, x[rows])
    assert torch.equal(by_tokens[[0, 2, 3]], x[[0, 2, 3]])


def test_host_uniforms_are_the_device_uniforms():
    """A guided denoising step samples its walked rows with numpy's twin of the counter-based uniforms
    (batched_sampling.row_hash and uniform_lane): the same numbers as the tensor version for the same seed, counter,
    stream and lane, seeds past 2**32 included."""
    from nemodiff.runtime.decoding.batched_sampling import STREAM_GRAMMAR, row_hash, uniform, uniform_lane

    gen = torch.Generator().manual_seed(11)
    seeds = torch.randint(0, 2**62, (64,), generator=gen)
    counters = torch.randint(0, 2**31, (64,), generator=gen)
    lanes = torch.randint(0, 2**20, (64,), generator=gen)
    want = uniform(seeds, counters, STREAM_GRAMMAR, lanes[:, None])[:, 0].numpy()
    got = np.array([uniform_lane(row_hash(seed, counter, STREAM_GRAMMAR), lane)
                    for seed, counter, lane in zip(seeds.tolist(), counters.tolist(), lanes.tolist())])
    np.testing.assert_array_equal(got, want)
    assert ((got > 0) & (got < 1)).all()
    # a guided denoising step's rule draws them too, with its row hash computed once for all its rows
    rule = Diffuse(0.5, 0, False, 1.0, (int(seeds[0]), int(counters[0])))
    assert [rule.uniform(int(lane)) for lane in lanes[:8]] == uniform(seeds[:1], counters[:1], STREAM_GRAMMAR,
                                                                       lanes[:8])[0].tolist()
