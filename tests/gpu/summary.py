"""The table printed last by run_device_checks.sh: check counts, failures, and the speed targets.

checkpoint ──builder──▶ engine dir ──runtime (GPU)──▶ [this summary of $OUT/*.json]──▶ docs/performance.md

Reads device_checks.json, model_checks.json, tp_checks.json (two-GPU machines) and the nld-8b bench JSONs from the folder given
(default $OUT) and prints one markdown table of the targets (issue targets, docs/design.md §7), ready
to paste into docs/performance.md with the date and the card.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def step(report: dict, kind: str, batch: int) -> dict | None:
    return next((r for r in report.get("steps", []) if r["kind"] == kind and r["batch"] == batch), None)


def targets(bf16: dict | None, fp8: dict | None) -> list[tuple[str, str, str, str]]:
    rows = []

    def add(name, requirement, value, ok):
        rows.append((name, requirement, value, "yes" if ok else "NO"))

    if bf16 and step(bf16, "ar", 1):
        ar1 = step(bf16, "ar", 1)["ms"]
        frac = bf16["roofline"]["forward_ms"] / ar1
        add("AR batch 1, bf16", ">= 85 % of the bf16 roofline", f"{ar1:.3f} ms = {100 * frac:.0f} %", frac >= 0.85)
        for kind, bound in (("verify-32", 1.2), ("quad-k8", 1.4)):
            row = step(bf16, kind, 1)
            if row:
                add(f"{kind} forward", f"<= {bound} x the AR forward", f"{row['ms'] / ar1:.2f} x ({row['ms']:.3f} ms)",
                    row["ms"] / ar1 <= bound)
        if step(bf16, "ar", 32):
            ratio = step(bf16, "ar", 32)["ms"] / ar1
            add("AR batch 32 step", "<= 2 x the batch-1 step", f"{ratio:.2f} x", ratio <= 2)
        if "speedup_vs_transformers" in bf16:
            add("vs transformers AR, batch 1", ">= 15 x", f"{bf16['speedup_vs_transformers']:.1f} x",
                bf16["speedup_vs_transformers"] >= 15)
    if fp8 and step(fp8, "ar", 1):
        ar1 = step(fp8, "ar", 1)["ms"]
        frac = fp8["roofline"]["forward_ms"] / ar1
        add("AR batch 1, fp8", ">= 75 % of the fp8 roofline", f"{ar1:.3f} ms = {100 * frac:.0f} %", frac >= 0.75)
    return rows


def main(out: Path) -> int:
    lines = []
    for name in ("device_checks", "model_checks", "tp_checks"):
        if name == "tp_checks" and not (out / f"{name}.json").is_file():
            continue  # run only on machines with two GPUs
        results = load(out / f"{name}.json") or []
        failed = [r for r in results if not r["ok"]]
        lines.append(f"{name}: {len(results) - len(failed)} passed, {len(failed)} failed"
                     + ("" if results else " (no results: did it run?)"))
        lines += [f"  FAIL {r['check']}: {r['detail']}" for r in failed]
    bf16, fp8 = load(out / "bench_nld8b_bf16.json"), load(out / "bench_nld8b_fp8.json")
    for label, report in (("bf16", bf16), ("fp8", fp8)):
        if report:
            lines.append(f"nld-8b {label} steps (ms): " + ", ".join(
                f"{r['kind']}x{r['batch']} {r['ms']:.3f}{' graph' if r.get('graph') else ''}" for r in report["steps"]))
    lines.append("")
    lines.append("| target | requirement | measured | met |")
    lines.append("| --- | --- | --- | --- |")
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(bf16, fp8)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))))
