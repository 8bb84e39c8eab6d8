"""What the GPU check scripts share: where they run (`Rig`) and how they record results (`Report`).

checkpoint ──builder──▶ engine dir ──runtime (GPU)──▶ [check results: $OUT/<name>.json] ──▶ summary.py

`Rig` is the GPU, or in the CPU dry run (NEMODIFF_CPU_DRY_RUN=1, set by `run_device_checks.sh
--cpu-dry-run`) the CPU standing in for it: kernels compiled for sm_90a and launched through the same
`AotLauncher`, with the driver call replaced by a check of every launch against its cubin and the
interpreter (nemodiff/plugins/aot_check.py); the interpreter also stands in for Triton's JIT, and the host clock
for CUDA events. Everything else is the code a GPU runs. Dry runs use tiny shapes and few iterations.

`Report` writes $OUT/<name>.json after every result, with the step in progress recorded as failed
("did not finish"), so a run killed by its time budget loses nothing and says where it stopped.
Shared by device_checks.py, model_checks.py and tp_checks.py (summary.py reads their files).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nemodiff.cuda_driver import Timer
from nemodiff.device import CPU_SM_COUNT, gpu_sm, multiprocessor_count, synchronize
from nemodiff.engine_format import ARCH_TO_SM

DRY_RUN = os.environ.get("NEMODIFF_CPU_DRY_RUN") == "1"
DRY_RUN_SM = "sm_90a"


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    return out


class Rig:
    """The device the checks run on, and how they launch and time kernels there."""

    def __init__(self, index: int = 0):
        self.dry = DRY_RUN
        if self.dry:
            self.device, self.sm, self.num_sms = torch.device("cpu"), DRY_RUN_SM, CPU_SM_COUNT
            self.name = f"CPU dry run (kernels for {self.sm}, checked and interpreted)"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: nothing to check (run_device_checks.sh --cpu-dry-run runs the "
                                 "same checks on the CPU)")
            self.device = torch.device("cuda", index)
            self.sm, self.num_sms = gpu_sm(self.device), multiprocessor_count(self.device)
            self.name = f"{torch.cuda.get_device_name(self.device)} ({self.sm}, {self.num_sms} SMs)"
        # the engine arch an engine build for this GPU names (h100 and h200 share sm_90a)
        self.arch = next(arch for arch, sm in ARCH_TO_SM.items() if sm == self.sm)

    def aot_launcher(self, kernel_dir: Path):
        """The ahead-of-time launcher over a kernels/<sm>/ folder, as the runtime builds it."""
        from nemodiff.plugins.aot_launch import AotLauncher

        if self.dry:
            from nemodiff.plugins.aot_check import InterpretDriver, LaunchChecker

            return AotLauncher(kernel_dir, InterpretDriver(), LaunchChecker(self.device))
        from nemodiff.cuda_driver import CudaDriver
        from nemodiff.plugins.aot_launch import CudaLaunch

        return AotLauncher(kernel_dir, CudaLaunch(CudaDriver(self.device)))

    def jit_launcher(self):
        """Triton's JIT on the GPU; its interpreter in a dry run."""
        from nemodiff.plugins.launch import InterpretLauncher, JitLauncher

        return InterpretLauncher() if self.dry else JitLauncher()

    def sync(self) -> None:
        synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], iters: int = 50, flush_cache: bool = False) -> float:
        """Mean device time of `fn` over `iters` calls after one warm-up call (CUDA events; the host clock
        in a dry run, where one call is timed). flush_cache: each call on a cold L2 cache (Triton's do_bench)."""
        if flush_cache and not self.dry:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100)
        iters = 1 if self.dry else iters
        fn()
        with Timer(self.device) as timer:
            for _ in range(iters):
                fn()
        return timer.ms / iters


class Report:
    def __init__(self, name: str):
        self.name = name
        self.results: list[dict] = []
        self.pending: str | None = None
        self.path = out_dir() / f"{name}.json"
        self.started = time.time()
        self._save()

    def record(self, check: str, ok: bool, detail: str) -> None:
        self.results.append({"check": check, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {check}: {detail}", flush=True)
        self._save()

    def _save(self) -> None:
        rows = list(self.results)
        if self.pending is not None:
            rows.append({"check": f"{self.pending} checks", "ok": False,
                         "detail": f"did not finish (started {time.time() - self.started:.0f} s into the run: "
                                   "killed by its time budget, or the process died)"})
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(self.path)  # readers never see half a file

    def run(self, steps: list[tuple[str, Callable[[], object]]]) -> None:
        """Run each step; one that raises is recorded as failed and the others still run."""
        for name, fn in steps:
            self.pending = name
            self._save()
            start = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # report and go on: one broken part must not hide the others
                self.pending = None
                self.record(f"{name} checks", False, f"{type(exc).__name__}: {exc}")
            self.pending = None
            self._save()
            print(f"-- {name}: {time.perf_counter() - start:.1f} s", flush=True)

    def finish(self) -> int:
        """Write $OUT/<name>.json, print the counts; the exit status (1 when anything failed)."""
        self._save()
        failed = [r for r in self.results if not r["ok"]]
        print(f"{len(self.results) - len(failed)} passed, {len(failed)} failed")
        return 1 if failed else 0


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 on the host; inf when got is not finite."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp(min=1e-30))
