"""Prefix-cache benchmark: time to first token of a request whose long prefix an earlier request computed.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: TTFT with and without the prefix cache]

For each repeat a first request computes a prompt of `prefix_tokens` tokens; a second one shares that
prefix and adds `suffix_tokens` of its own. The second request's time to its first token (one token
generated, so the whole request) is measured with the engine's prefix cache on, where only its suffix
and the rest of the last shared page are computed, and off, where the whole prompt is. Each repeat
uses another prefix, so only the request before it can have cached it. The report gives the median
TTFT of both, the prompt tokens the cache supplied, and their ratio.
"""

from __future__ import annotations

import statistics
from pathlib import Path


def _prompt(vocab: int, seed: int, length: int, first: int = 150) -> list[int]:
    span = max(vocab - first - 8, 1)
    return [1] + [first + (seed * 131 + 17 * j + (j * j) % 7) % span for j in range(length - 1)]


def prefix_ttft(engine_dir: Path, device: str | None = None, kernels: str = "auto", prefix_tokens: int = 1000,
                suffix_tokens: int = 16, repeats: int = 5) -> dict:
    """{"prefix_tokens", "suffix_tokens", "repeats", "with_cache": {...}, "without_cache": {...}, "speedup"}; each
    side: ttft_ms (median), ttft_ms_all, cached_prompt_tokens (of the last second request)."""
    from nemodiff import LLM, SamplingParams

    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    report = {"prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "repeats": repeats}
    for label, cache in (("with_cache", True), ("without_cache", False)):
        with LLM(engine_dir, device=device, kernels=kernels, prefix_cache=cache) as llm:
            vocab, room = llm.config.model.vocab_size, llm.config.build.max_seq_len - 2
            if prefix_tokens + suffix_tokens > room:
                raise ValueError(f"a prefix of {prefix_tokens} and a suffix of {suffix_tokens} tokens do not fit "
                                 f"the engine's max_seq_len ({room + 2}); rebuild it longer or ask for less")
            llm.generate(_prompt(vocab, 999, prefix_tokens + suffix_tokens), params)  # warm up
            times, cached = [], 0
            for repeat in range(repeats):
                prefix = _prompt(vocab, repeat, prefix_tokens)
                llm.generate(prefix + _prompt(vocab, 500 + repeat, suffix_tokens + 1)[1:], params)
                second = llm.generate(prefix + _prompt(vocab, 700 + repeat, suffix_tokens + 1)[1:], params)[0]
                times.append(second.seconds * 1e3)
                cached = second.cached_prompt_tokens
            report[label] = {"ttft_ms": statistics.median(times), "ttft_ms_all": times,
                             "cached_prompt_tokens": cached}
    report["speedup"] = report["without_cache"]["ttft_ms"] / max(report["with_cache"]["ttft_ms"], 1e-9)
    return report


def format_report(report: dict) -> str:
    on, off = report["with_cache"], report["without_cache"]
    return (f"TTFT of a request sharing a {report['prefix_tokens']}-token prefix (+{report['suffix_tokens']} tokens "
            f"of its own), median of {report['repeats']}:\n"
            f"  prefix cache on:  {on['ttft_ms']:9.2f} ms ({on['cached_prompt_tokens']} prompt tokens from the cache)\n"
            f"  prefix cache off: {off['ttft_ms']:9.2f} ms ({off['cached_prompt_tokens']} from the cache)\n"
            f"  ratio off/on: {report['speedup']:.1f}x")
