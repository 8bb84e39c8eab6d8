"""Host-overhead benchmark: how much of an engine step is Python and bookkeeping, per mode.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: host work per engine step]

For each mode and each number of running requests, the engine runs steady decode steps
(prefills done, every request in its decode loop) and the benchmark records the wall time of
`Engine.step` and the time spent inside the model forward (`Model._run`, synchronised on a
GPU). Their difference is the host work a faster forward cannot hide. Run it with a tiny
checkpoint, where the forward costs almost nothing, to see the host work alone. It also
reports the part of that host time spent enqueuing the batched decisions (`Decider.run`):
on a GPU that is launch overhead, on the CPU it includes the decisions' arithmetic (softmax
and argmax over every decided logit row), which a GPU would do on the device.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

from nemodiff.device import synchronize

MODE_SETTINGS = {
    "ar": {},
    "diffusion": {"threshold": 0.9},
    "linear-spec": {},
    "quadratic-spec": {"block_length": 8},
}


def _timed(inner, totals: list[float], index: int, sync=lambda: None):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        totals[index] += time.perf_counter() - start
        return out

    return run


def host_overhead(llm, modes: list[str], concurrency: list[int], steps: int = 40, warmup: int = 8,
                  prompt_len: int = 16, logprobs: int | None = None, guide=None) -> list[dict]:
    """Median wall ms per step, ms inside the forward and their difference, per (mode, requests); with
    `logprobs` K each row twice, without log-probabilities and with them (K alternatives), side by side;
    with a `guide` (nemodiff/runtime/request.py's Guide) each row twice, unguided and under the guide ("guided")."""
    from nemodiff import SamplingParams

    engine, results = llm.engine, []
    vocab = llm.config.model.vocab_size
    asks = [None] if logprobs is None else [None, logprobs]
    guides = [None] if guide is None else [None, guide]
    for mode, n, ask, rule in ((m, c, a, g) for m in modes for c in concurrency for a in asks for g in guides):
        params = SamplingParams(max_new_tokens=100000, ignore_eos=True, mode=mode, logprobs=ask, guide=rule,
                                **MODE_SETTINGS.get(mode, {}))
        budget = llm.engine.max_seq_len - prompt_len - 64
        params.max_new_tokens = budget
        prompts = [[1] + [(37 * i + 11 * j) % (vocab - 200) + 150 for j in range(prompt_len - 1)]
                   for i in range(n)]
        requests = [engine.add_request(p, params) for p in prompts]
        for _ in range(warmup):  # prefills and first cycles
            engine.step()
        walls, forwards, decides = [], [], []
        totals = [0.0, 0.0]
        sync = partial(synchronize, llm.model.device)
        run_forward, run_decisions = llm.model._run, engine.decider.run
        llm.model._run = _timed(run_forward, totals, 0, sync)
        engine.decider.run = _timed(run_decisions, totals, 1)
        try:
            for _ in range(steps):
                totals[:] = [0.0, 0.0]
                start = time.perf_counter()
                engine.step()
                walls.append(time.perf_counter() - start)
                forwards.append(totals[0])
                decides.append(totals[1])
        finally:
            llm.model._run, engine.decider.run = run_forward, run_decisions
            for request in requests:
                engine.abort(request)
        running = sum(1 for r in requests if not r.finished or r.finish_reason == "cancelled")
        host = [w - f for w, f in zip(walls, forwards)]
        results.append({
            "mode": mode, "requests": n, "logprobs": ask, "guided": rule is not None, "steps": steps, "running_at_end": running,
            "step_ms": statistics.median(walls) * 1e3, "forward_ms": statistics.median(forwards) * 1e3,
            "host_ms": statistics.median(host) * 1e3, "host_ms_p90": sorted(host)[int(0.9 * len(host))] * 1e3,
            "decide_ms": statistics.median(decides) * 1e3,
        })
    return results


def format_table(rows: list[dict]) -> str:
    lines = [f"{'mode':16s} {'requests':>8s} {'logprobs':>8s} {'step ms':>9s} {'forward ms':>11s} {'host ms':>9s} "
             f"{'host p90':>9s} {'of which decide':>16s}"]
    for r in rows:
        asked = "-" if r.get("logprobs") is None else str(r["logprobs"])
        lines.append(f"{r['mode']:16s} {r['requests']:8d} {asked:>8s} {r['step_ms']:9.3f} {r['forward_ms']:11.3f} "
                     f"{r['host_ms']:9.3f} {r['host_ms_p90']:9.3f} {r['decide_ms']:16.3f}")
    return "\n".join(lines)
