"""The GPU device script runs in CI: `run_device_checks.sh --cpu-dry-run` on a tiny shape on the CPU.

Code that only runs on a GPU is code CI never runs. The dry run takes the script's own steps and Python
entry points end to end (kernel checks, engine checks, the bf16 and fp8 benchmarks through the
ahead-of-time path, the summary) with the kernels compiled for sm_90a, every launch checked against its
cubin and interpreted (kernels="aot-check"); only the CUDA driver calls and the timing source differ.
About a minute on 2 cores (the cubins are the test checkpoints' and come from Triton's cache when the
aot-check tests ran first).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "gpu" / "run_device_checks.sh"
TARGETS = ["AR batch 1, bf16", "AR batch 1, fp8", "32-token verify/draft forward", "QuadraticSpec k = 8 (72 tokens)",
           "AR batch 32 step", "vs transformers AR, batch 1"]  # docs/performance.md "Targets", in its order
MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("device-out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("NEMODIFF_DEVICE_BUDGET_S", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True, env=env,
                          timeout=400)
    failed = [line for line in proc.stdout.splitlines() if "FAIL" in line and not line.startswith("| ")]
    assert proc.returncode == 0, "\n".join(failed) + "\n" + (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout


def test_the_dry_run_passes_every_check_and_writes_its_json(dry_run):
    out, _ = dry_run
    device = json.loads((out / "device_checks.json").read_text())
    model = json.loads((out / "model_checks.json").read_text())
    exact = json.loads((out / "exact_checks.json").read_text())
    for results in (device, model, exact):
        assert results and all(r["ok"] for r in results), [r for r in results if not r["ok"]]
        assert not any("did not finish" in r["detail"] for r in results)
    names = [r["check"] for r in device]
    assert names[0] == "compile" and "sm_90a" in device[0]["detail"]
    for prefix in ("aot add_rmsnorm", "aot rms_norm", "aot silu_mul", "aot fp8_gemm", "aot attention",
                   "jit attention", "fp8 speed", "attention speed"):
        assert any(n.startswith(prefix) for n in names), prefix
    names = [r["check"] for r in model]
    assert {"bf16 teacher-forced kernel path vs reference path", "fp8 teacher-forced kernel path vs reference path",
            "kernels and graphs", "nothing captured while serving"} <= set(names)
    assert {f"3 requests {m}: graphs vs eager kernel path" for m in MODES} <= set(names)
    assert {f"{m} temperature 0.8" for m in MODES} | {"linear-spec equals ar", "quadratic-spec equals ar"} <= set(names)
    names = [r["check"] for r in exact]
    for dtype in ("bf16", "fp8"):
        assert {f"{dtype} {label} equals AR alone" for label in ("AR in a batch of 5", "AR in a mixed-mode batch of 8",
                                                                 "linear-spec alone", "quadratic-spec alone")} <= set(names)
        assert sum(n.startswith(f"decode GEMM {dtype} ") for n in names) == 6  # gate_up and down at M = 1, 4, 16
    replays = [re.fullmatch(r"3 graph replays \(split-KV up to (\d+)\) equal the first", n) for n in names]
    assert max(int(m.group(1)) for m in replays if m) >= 2  # the dry run's context splits the KV
    assert "skipped: CPU dry run" in next(r["detail"] for r in exact if r["check"].startswith("compute-sanitizer"))
    second = next(r for r in exact if r["check"] == "engine on the emulated GPU 1")
    assert "0 on another device" in second["detail"] and "launch" in second["detail"]


def test_the_dry_run_benchmarks_the_aot_path(dry_run):
    out, _ = dry_run
    for dtype in ("bf16", "fp8"):
        report = json.loads((out / f"bench_{dtype}.json").read_text())
        assert report["kernels"]["mode"] == "aot-check" and report["kernels"]["sm"] == "sm_90a"
        assert report["kernels"]["compiled"] == 0  # the kernel checks compiled them; the benchmark reused them
        kinds = {r["kind"] for r in report["steps"]}
        assert kinds == {"ar", "verify-32", "draft-32", "quad-k8"}
        assert all(r["graph"] and not r["captured"] for r in report["steps"])  # the static graph path, eagerly
        assert report["launch"]["launches_per_layer"] == 8 and report["launch"]["launcher"] == "aot"
        assert report["host_memory"]["plain_weight_bytes"] > 0
        projected = report["projected_tokens_per_s_at_published_tpf"]
        assert set(projected) == {"diffusion", "linear-spec", "quadratic-spec (k=8)"} and min(projected.values()) > 0
        assert set(report["projection_basis"]) == set(projected)
        assert (out / f"bench_{dtype}.png").stat().st_size > 1000
    bf16 = json.loads((out / "bench_bf16.json").read_text())
    assert {(r["mode"], r["concurrency"]) for r in bf16["end_to_end"]} == {(m, 1) for m in MODES}
    assert all(r["tokens"] == 2 and r["tokens_per_s"] > 0 for r in bf16["end_to_end"])
    assert "random weights" in bf16["end_to_end_note"]
    assert bf16["transformers_ar_tokens_per_s"] > 0 and {r["batch"] for r in bf16["steps"]} == {1, 2}


def test_the_summary_ends_with_the_targets(dry_run):
    out, stdout = dry_run
    summary = (out / "summary.md").read_text()
    assert summary.strip() in stdout  # printed last, and kept
    assert (out / "run.log").read_text().count("== ") >= 4  # every step logged
    steps = re.findall(r"^\| (kernel checks|engine checks|exactness checks|bench micro bf16|bench micro fp8) \| (\d+) "
                       r"\| (\d+) \| 0 \|$", summary, re.MULTILINE)
    assert [s[0] for s in steps] == ["kernel checks", "engine checks", "exactness checks", "bench micro bf16",
                                     "bench micro fp8"]
    assert "device_checks: " in summary and "model_checks: " in summary and " 0 failed" in summary
    assert "exact_checks: " in summary and "| bit-exact vs AR alone" in summary
    table = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and " | " in line]
    header = table.index(["| what", "requirement", "measured", "met |"])
    rows = [(r[0][2:], r[1], r[2], r[3][:-2]) for r in table[header + 2:]]
    assert [r[0] for r in rows[-len(TARGETS):]] == TARGETS
    assert all(r[3] in ("pass", "FAIL", "—") and r[2] for r in rows)
    labels = [r[0] for r in rows]
    assert any(label.startswith("launches per layer") for label in labels)
    assert any(label.startswith("host time per launch") for label in labels)
    projected = [r for r in rows if "projected" in r[0]]
    assert {r[0].split(" tokens/s")[0] for r in projected} == {"diffusion", "linear-spec", "quadratic-spec (k=8)"}
    assert all("projected" in r[2] for r in projected)
    assert any(label.startswith("end to end diffusion") for label in labels)


def test_a_check_step_cut_short_is_recorded_as_not_finished(tmp_path, monkeypatch):
    """The JSON is written after every result; a step in progress reads as failed until it ends."""
    monkeypatch.setenv("OUT", str(tmp_path))
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    try:
        from check_report import Report
    finally:
        sys.path.pop(0)
    report = Report("probe")
    seen = []

    def step():
        report.record("first", True, "done")
        seen.append(json.loads((tmp_path / "probe.json").read_text()))
    report.run([("probing", step)])
    assert seen[0] == [{"check": "first", "ok": True, "detail": "done"},
                       {"check": "probing checks", "ok": False, "detail": seen[0][1]["detail"]}]
    assert "did not finish" in seen[0][1]["detail"]
    assert json.loads((tmp_path / "probe.json").read_text()) == [{"check": "first", "ok": True, "detail": "done"}]
