"""How the GPU check scripts record results: one PASS/FAIL line each, a JSON file, an exit status.

checkpoint ──builder──▶ engine dir ──runtime (GPU)──▶ [check results: $OUT/<name>.json] ──▶ summary.py

Shared by device_checks.py, model_checks.py and tp_checks.py so their results read alike
(summary.py reads the same keys from all of them).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


class Report:
    def __init__(self, name: str):
        self.name = name
        self.results: list[dict] = []

    def record(self, check: str, ok: bool, detail: str) -> None:
        self.results.append({"check": check, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {check}: {detail}", flush=True)

    def run(self, steps: list[tuple[str, Callable[[], object]]]) -> None:
        """Run each step; one that raises is recorded as failed and the others still run."""
        for name, fn in steps:
            try:
                fn()
            except Exception as exc:  # report and go on: one broken part must not hide the others
                self.record(f"{name} checks", False, f"{type(exc).__name__}: {exc}")

    def finish(self) -> int:
        """Write $OUT/<name>.json, print the counts; the exit status (1 when anything failed)."""
        out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
        (out_dir / f"{self.name}.json").write_text(json.dumps(self.results, indent=2))
        failed = [r for r in self.results if not r["ok"]]
        print(f"{len(self.results) - len(failed)} passed, {len(failed)} failed")
        return 1 if failed else 0


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 on the host; inf when got is not finite."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp(min=1e-30))
