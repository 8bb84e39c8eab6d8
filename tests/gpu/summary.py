"""The table printed last by run_device_checks.sh: steps and their time, check counts, failures, and one
table whose last rows are the speed targets of docs/performance.md, each measured and passed or failed.

checkpoint ──builder──▶ engine dir ──runtime (GPU)──▶ [this summary of $OUT/*.json]──▶ docs/performance.md

Reads device_checks.json, model_checks.json, exact_checks.json, tp_checks.json (two-GPU machines) and the
benchmark JSONs (bench_bf16.json, bench_fp8.json, bench_tp2.json) from the folder given (default $OUT), and the step
timings the script kept (--steps FILE: name, budget, seconds, exit status per line); prints the summary
and writes it to summary.md there, ready to paste into docs/performance.md with the date and the card.
Spec-mode and diffusion figures at the published tokens per forward are labelled projected: with
random weights the drafts are rejected, so only the step latencies behind them are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TARGET_ROWS = 6  # the last rows of the table: docs/performance.md "Targets", in its order
GiB = 1 << 30


def load(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # a file cut short (the writers replace it whole, so only by a foreign hand)
        return None


def step(report: dict | None, kind: str, batch: int) -> dict | None:
    return next((r for r in (report or {}).get("steps", []) if r["kind"] == kind and r["batch"] == batch), None)


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else "pass" if ok else "FAIL"


def info_rows(bf16: dict | None, fp8: dict | None) -> list[tuple[str, str, str, str]]:
    """What the run measured besides the targets: kernels, launches, host time, weights, end to end, projections."""
    rows = []
    for label, report in (("bf16", bf16), ("fp8", fp8)):
        if not report:
            continue
        kernels = report.get("kernels", {})
        mode = kernels.get("mode", "?")
        what = f"{mode}, {kernels['variants']} variants for {kernels['sm']}" if "sm" in kernels else mode
        rows.append((f"kernels timed, {label}", "cubins for this GPU through the AOT launcher", what,
                     _verdict(mode in ("aot", "aot-check"))))
        launch = report.get("launch")
        if launch:
            rows.append((f"launches per layer, AR batch 1, {label}", "8 (docs/design.md)",
                         f"{launch['launches_per_layer']:.1f}", _verdict(launch["launches_per_layer"] <= 8)))
            rows.append((f"host time per launch, eager AR step, {label}", "—",
                         f"{launch['host_us_per_launch']:.1f} us ({launch['host_ms_per_forward']:.3f} ms host for "
                         f"{launch['launches_per_forward']:.0f} launches; device {launch['device_ms_per_forward']:.3f} ms)",
                         "—"))
        memory = report.get("host_memory")
        if memory:
            grown, plain = memory["rss_growth_bytes"], memory["plain_weight_bytes"]
            rows.append((f"random weights made on the device, {label}", "host memory grows < max(1 GiB, weights / 4)",
                         f"+{grown / GiB:.2f} GiB host for {plain / GiB:.2f} GiB of weights",
                         _verdict(grown < max(GiB, plain / 4))))
        for r in report.get("end_to_end", []):
            rows.append((f"end to end {r['mode']} x{r['concurrency']}, {label} (measured, random weights)", "—",
                         f"{r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_forward']:.2f} tokens/forward", "—"))
        for mode, value in report.get("projected_tokens_per_s_at_published_tpf", {}).items():
            rows.append((f"{mode} tokens/s, {label}, projected at the published tokens/forward", "—",
                         f"{value:.1f} tokens/s (projected, not measured)", "—"))
    return rows


def exact_rows(results: list[dict]) -> list[tuple[str, str, str, str]]:
    """exact_checks.json in a few rows: bit-exactness per dtype, graph replays, the decode GEMM's bandwidth."""
    rows = []
    for dtype in ("bf16", "fp8"):
        exact = [r for r in results if r["check"].startswith(f"{dtype} ") and "equals AR alone" in r["check"]]
        if exact:
            rows.append((f"bit-exact vs AR alone (batch of 5, mixed batch of 8, both spec modes), {dtype}",
                         "tokens and log-probabilities bit-identical",
                         f"{sum(r['ok'] for r in exact)} of {len(exact)}", _verdict(all(r["ok"] for r in exact))))
        gemm = [r for r in results if r["check"].startswith(f"decode GEMM {dtype} ")]
        if gemm:
            fracs = [float(r["detail"].split(" of the copy rate")[0]) for r in gemm]
            rows.append((f"decode GEMM HBM bandwidth, {dtype}, M = 1, 4, 16", ">= 0.9 of the copy rate",
                         f"{min(fracs):.2f} to {max(fracs):.2f}", _verdict(all(r["ok"] for r in gemm))))
    for r in results:
        if "graph replays" in r["check"] and "equal the first" in r["check"]:
            rows.append((r["check"].split(" (")[0] + " vs the first", "bit-identical", r["detail"].split(";")[0],
                         _verdict(r["ok"])))
    return rows


def targets(bf16: dict | None, fp8: dict | None) -> list[tuple[str, str, str, str]]:
    """The six targets of docs/performance.md, in its order; a target without data says why."""
    missing = "not measured"
    ar1 = step(bf16, "ar", 1)

    def roofline(report, row, bound, label):
        if not row:
            return (f"AR batch 1, {label}", f">= {int(100 * bound)} % of the {label} roofline", missing, "FAIL")
        frac = report["roofline"]["forward_ms"] / row["ms"]
        return (f"AR batch 1, {label}", f">= {int(100 * bound)} % of the {label} roofline",
                f"{row['ms']:.3f} ms = {100 * frac:.0f} % ({report['roofline']['forward_ms']:.3f} ms roofline)",
                _verdict(frac >= bound))

    rows = [roofline(bf16, ar1, 0.85, "bf16"), roofline(fp8, step(fp8, "ar", 1), 0.75, "fp8")]
    forwards = [r for r in (step(bf16, "verify-32", 1), step(bf16, "draft-32", 1)) if r]
    if ar1 and forwards:
        worst = max(forwards, key=lambda r: r["ms"])
        rows.append(("32-token verify/draft forward", "<= 1.2 x the 1-token AR forward",
                     ", ".join(f"{r['kind']} {r['ms'] / ar1['ms']:.2f} x" for r in forwards),
                     _verdict(worst["ms"] / ar1["ms"] <= 1.2)))
    else:
        rows.append(("32-token verify/draft forward", "<= 1.2 x the 1-token AR forward", missing, "FAIL"))
    quad = step(bf16, "quad-k8", 1)
    rows.append(("QuadraticSpec k = 8 (72 tokens)", "<= 1.4 x the AR forward",
                 f"{quad['ms'] / ar1['ms']:.2f} x ({quad['ms']:.3f} ms)" if quad and ar1 else missing,
                 _verdict(quad["ms"] / ar1["ms"] <= 1.4) if quad and ar1 else "FAIL"))
    batches = sorted(r["batch"] for r in (bf16 or {}).get("steps", []) if r["kind"] == "ar" and r["batch"] > 1)
    if ar1 and batches:
        big = 32 if 32 in batches else batches[-1]
        ratio = step(bf16, "ar", big)["ms"] / ar1["ms"]
        rows.append(("AR batch 32 step", "<= 2 x the batch-1 step",
                     f"{ratio:.2f} x" + ("" if big == 32 else f" at batch {big} (batch 32 not run)"),
                     _verdict(ratio <= 2) if big == 32 else "—"))
    else:
        rows.append(("AR batch 32 step", "<= 2 x the batch-1 step", missing, "FAIL"))
    speedup = (bf16 or {}).get("speedup_vs_transformers")
    why = (bf16 or {}).get("transformers_error", "transformers is not installed" if bf16 else "no bf16 benchmark")
    rows.append(("vs transformers AR, batch 1", ">= 15 x",
                 f"{speedup:.1f} x ({bf16['transformers_ar_tokens_per_s']:.1f} tokens/s)" if speedup else
                 f"{missing} ({why})", _verdict(speedup >= 15) if speedup else "FAIL"))
    return rows


def step_lines(steps_file: Path | None) -> list[str]:
    if steps_file is None or not steps_file.is_file():
        return []
    lines = ["| step | budget s | took s | exit |", "| --- | --- | --- | --- |"]
    for line in steps_file.read_text().splitlines():
        name, budget, took, rc = line.split("\t")
        verdict = {"0": "0", "124": "124 (out of time)", "137": "137 (killed)", "skipped": "skipped (no time left)"}
        lines.append(f"| {name} | {budget} | {took} | {verdict.get(rc, rc)} |")
    return lines + [""]


def summary(out: Path, steps_file: Path | None = None) -> str:
    lines = step_lines(steps_file)
    for name in ("device_checks", "model_checks", "exact_checks", "tp_checks"):
        if name == "tp_checks" and not (out / f"{name}.json").is_file():
            continue  # run only on machines with two GPUs
        results = load(out / f"{name}.json") or []
        failed = [r for r in results if not r["ok"]]
        lines.append(f"{name}: {len(results) - len(failed)} passed, {len(failed)} failed"
                     + ("" if results else " (no results: did it run?)"))
        lines += [f"  FAIL {r['check']}: {r['detail']}" for r in failed]
    bf16, fp8, tp = load(out / "bench_bf16.json"), load(out / "bench_fp8.json"), load(out / "bench_tp2.json")
    for label, report in (("bf16", bf16), ("fp8", fp8)):
        if report:
            lines.append(f"{report.get('title', label)}, steps (ms): " + ", ".join(
                f"{r['kind']}x{r['batch']} {r['ms']:.3f}{' graph' if r.get('graph') else ''}" for r in report["steps"]))
        else:
            lines.append(f"no {label} benchmark results (bench_{label}.json)")
    if tp and "tp" in tp:
        lines.append(f"tensor parallel x{tp['tp']['size']}: AR batch 1 {tp['tp']['ar_batch1_ms']:.3f} ms, "
                     f"{tp['tp']['ratio_to_tp1']:.3f} of one GPU's")
    rows = info_rows(bf16, fp8) + exact_rows(load(out / "exact_checks.json") or []) + targets(bf16, fp8)
    lines += ["", "| what | requirement | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT", "."), type=Path)
    parser.add_argument("--steps", type=Path, default=None)
    args = parser.parse_args()
    text = summary(args.out, args.steps)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
