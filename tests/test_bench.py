"""`nemodiff bench` runs on CPU and writes its JSON and PNG (numbers are measured, not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run_bench(*args):
    proc = subprocess.run([str(BIN / "nemodiff"), "bench", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_random_shape_writes_json_and_plot(tmp_path):
    out = run_bench("--shape", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--context", "64", "--iters", "1",
                    "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    report = json.loads((tmp_path / "b.json").read_text())
    kinds = {(r["kind"], r["batch"]) for r in report["steps"]}
    assert {("ar", 1), ("verify-32", 2), ("draft-32", 1), ("quad-k8", 2)} <= kinds
    assert all(r["ms"] > 0 for r in report["steps"])
    assert report["ceilings"]["copy_bytes_per_s"] > 0 and report["roofline"]["forward_ms"] > 0
    assert report["transformers_ar_tokens_per_s"] > 0
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "roofline" in out


def test_bench_engine_end_to_end_per_mode(tmp_path, engine_fp32):
    run_bench(engine_fp32, "--device", "cpu", "--modes", "ar,linear-spec,quadratic-spec,diffusion",
              "--concurrency", "1,3", "--max-new-tokens", "12", "--batch-sizes", "1", "--context", "32", "--iters", "1",
              "--json", tmp_path / "e.json", "--plot", tmp_path / "e.png")
    report = json.loads((tmp_path / "e.json").read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in report["end_to_end"]}
    assert set(rows) == {(m, c) for m in ("ar", "linear-spec", "quadratic-spec", "diffusion") for c in (1, 3)}
    assert rows[("ar", 3)]["tokens"] == 36 and rows[("ar", 1)]["tokens_per_forward"] <= 1.0
    assert all(r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_bench_host_overhead_per_mode(tmp_path, engine_fp32):
    out = run_bench(engine_fp32, "--host-overhead", "--device", "cpu", "--modes", "ar,diffusion,linear-spec,quadratic-spec",
                    "--batch-sizes", "1,3", "--iters", "20", "--json", tmp_path / "h.json")
    report = json.loads((tmp_path / "h.json").read_text())
    rows = {(r["mode"], r["requests"]): r for r in report["host_overhead"]}
    assert set(rows) == {(m, n) for m in ("ar", "diffusion", "linear-spec", "quadratic-spec") for n in (1, 3)}
    for row in rows.values():
        assert row["running_at_end"] == row["requests"]  # steady decode steps, nobody finished
        # per step the decisions are part of the host time (outside the forward), so their medians are too
        assert 0 < row["decide_ms"] <= row["host_ms"] < row["step_ms"] and row["forward_ms"] > 0
    assert "of which decide" in out and str(tmp_path / "h.json") in out


def test_bench_writes_nothing_unasked_and_prints_json_when_asked(tmp_path, engine_fp32):
    args = ["bench", str(engine_fp32), "--host-overhead", "--device", "cpu", "--modes", "ar", "--batch-sizes", "1",
            "--iters", "20"]
    quiet = subprocess.run([str(BIN / "nemodiff"), *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert quiet.returncode == 0 and list(tmp_path.iterdir()) == []  # no bench.json, no bench.png
    printed = subprocess.run([str(BIN / "nemodiff"), *args, "--json"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600)
    assert json.loads(printed.stdout)["host_overhead"][0]["mode"] == "ar" and list(tmp_path.iterdir()) == []


def test_bench_prefix_ttft_with_and_without_the_cache(engine_fp32):
    proc = subprocess.run([str(BIN / "nemodiff"), "bench", str(engine_fp32), "--prefix-ttft", "--prefix-tokens", "40",
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)["prefix_ttft"]  # --json alone: stdout holds the JSON only
    assert report["prefix_tokens"] == 40 and report["with_cache"]["cached_prompt_tokens"] >= 36
    assert report["without_cache"]["cached_prompt_tokens"] == 0
    assert report["with_cache"]["ttft_ms"] > 0 and report["speedup"] > 0
    assert "prefix cache on" in proc.stderr


def test_bench_host_overhead_with_logprobs(tmp_path, engine_fp32):
    run_bench(engine_fp32, "--host-overhead", "--device", "cpu", "--modes", "ar,diffusion", "--batch-sizes", "2",
              "--iters", "20", "--logprobs", "3", "--json", tmp_path / "h.json")
    rows = {(r["mode"], r["logprobs"]): r for r in json.loads((tmp_path / "h.json").read_text())["host_overhead"]}
    assert set(rows) == {(m, k) for m in ("ar", "diffusion") for k in (None, 3)}
    assert all(r["host_ms"] > 0 and r["running_at_end"] == 2 for r in rows.values())


def test_bench_structured_on_the_bundled_model(tmp_path):
    from nemodiff.builder.build import BuildOptions, build_engine

    engine = tmp_path / "nld-tiny"
    build_engine(Path(__file__).resolve().parents[1] / "models" / "nld-tiny", engine, BuildOptions(dtype="fp32"))
    proc = subprocess.run([str(BIN / "nemodiff"), "bench", str(engine), "--structured", "--modes", "ar",
                           "--batch-sizes", "1", "--iters", "20", "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # --json alone: stdout holds the JSON only
    guided = next(r for r in report["runs"] if r["guided"])
    assert guided["validity"] == 1.0 and guided["valid"] == guided["requests"] == 8
    assert guided["tokens_per_forward"] == 1.0 and guided["tokens_per_s"] > 0
    assert report["tokens_per_forward"]["ar"] == {"guided": 1.0, "unguided": 1.0}
    rows = {r["guided"]: r for r in report["host_overhead"]}
    assert set(rows) == {False, True} and all(r["requests"] == 1 and r["host_ms"] > 0 for r in rows.values())
    assert rows[True]["running_at_end"] == 1  # the guided request was still writing its array when timed
    assert "grammar ms/step" in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["nld-tiny"]


def test_bench_mixed_step_on_the_ahead_of_time_path(tmp_path):
    """A prefill chunk beside decodes of each kind, on the eager aot path with the driver call left out: the
    parts add up, every layer launches its 8 kernels through call plans, and the command chooses Triton's
    interpreter itself (run without TRITON_INTERPRET in its environment, as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([str(BIN / "nemodiff"), "bench", "--shape", "micro", "--kernels", "aot-check", "--mixed-step",
                           "--kernel-dir", tmp_path / "k", "--json", tmp_path / "m.json"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "m.json").read_text())["mixed_step"]
    assert [r["kind"] for r in rows] == ["ar", "draft-32", "verify-32", "quad-k8"]
    for r in rows:
        assert r["launches_per_layer"] == 8 and r["layers"] == 1
        assert r["host_ms"] == r["outside_ms"] + r["first_layer_ms"] + r["tail_ms"]  # one layer: no later ones
        assert min(r["outside_ms"], r["first_layer_ms"], r["per_layer_ms"], r["tail_ms"]) > 0
    assert "host ms" in proc.stdout
