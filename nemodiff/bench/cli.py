"""`nemodiff bench`: measure an engine, or a random model at a named shape, and write JSON + PNG.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: the `nemodiff bench` command]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from nemodiff.runtime.request import mode_param


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("engine_dir", type=click.Path(path_type=Path), required=False)
@click.option("--shape", type=str, default=None, help="Benchmark a random model of this shape (nld-3b, nld-8b, "
              "nld-14b, tiny) instead of an engine.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp8", "fp32"]), default="bf16", help="With --shape.")
@click.option("--device", type=str, default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--modes", type=mode_param(many=True), default="ar,diffusion,linear-spec,quadratic-spec",
              help="End-to-end modes (the spellings `generate --mode` takes).")
@click.option("--batch-sizes", type=str, default="1,8,32", help="Batch sizes for step latencies.")
@click.option("--concurrency", type=str, default="1,4", help="Concurrent requests for end-to-end runs.")
@click.option("--context", type=int, default=1024, help="Committed tokens per request for step latencies.")
@click.option("--iters", type=int, default=10, help="Timed repetitions per step shape (median reported).")
@click.option("--max-new-tokens", type=int, default=64, help="Tokens per end-to-end request.")
@click.option("--hf/--no-hf", "with_hf", default=True, help="Also time transformers' AR decoding (--shape).")
@click.option("--tp", type=int, default=1, help="With --shape: also time the model split over this many "
              "tensor-parallel ranks (GPUs) and report the ratio to one rank.")
@click.option("--json", "json_path", type=str, default=None, is_flag=False, flag_value="-",
              help="Write the results as JSON to this file (updated after every result), or print them with "
                   "--json alone. Nothing is written unasked.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Also draw a PNG plot here.")
@click.option("--serve", "serve_url", type=str, default=None,
              help="Load a running server instead: `nemodiff serve` at its gRPC URL (grpc://host:8001), or an "
                   "OpenAI-compatible HTTP API (http://host:8000: NVIDIA Dynamo's frontend, nemodiff serve "
                   "--openai-port); --concurrency defaults to 1,8,32,64 there.")
@click.option("--each-mode", is_flag=True, help="With --serve: one level per mode and concurrency (fixed modes "
              "side by side, auto included) instead of mixing --modes in each level.")
@click.option("--duration", type=float, default=30.0, help="With --serve: seconds per concurrency level.")
@click.option("--kernels", type=click.Choice(["auto", "off", "interpret", "aot-check", "jit", "aot"]), default="auto",
              help="Kernel mode of ENGINE_DIR (see `nemodiff generate --help`). With --shape: aot = every variant "
                   "the shape needs compiled for this GPU's sm (as nemodiff-build --arch does) and launched through "
                   "the CUDA driver, as serving runs (auto on a GPU with cuda-python); aot-check = the same on the "
                   "CPU for --sm, every launch checked against its cubin and interpreted; jit = Triton's JIT "
                   "(development); interpret; off = the PyTorch reference path (auto on a CPU).")
@click.option("--sm", type=str, default="sm_90a", help="With --shape --kernels aot-check: the GPU arch to compile for.")
@click.option("--sm-count", type=click.IntRange(1, 1024), default=None,
              help="Plan split-K and split-KV grids as on a GPU with this many SMs (132: H100/H200); with "
                   "--kernels aot-check the CPU runs that GPU's plans and merges [default: the device's own].")
@click.option("--kernel-dir", type=click.Path(path_type=Path), default=None,
              help="With --shape and aot/aot-check: compile into KERNEL_DIR/kernels/<sm>/ (reused when it already "
                   "holds every variant) instead of a temporary folder.")
@click.option("--end-to-end", "end_to_end", is_flag=True,
              help="With --shape: also run the engine loop (CUDA graphs, decisions) end to end per mode and "
                   "concurrency on the random model (its drafts are rejected: see the report's note).")
@click.option("--block-length", type=int, default=None,
              help="With --shape --end-to-end: the engine's block length [default: the shape's, 32].")
@click.option("--prompt-tokens", type=int, default=128, help="With --shape --end-to-end: prompt length.")
@click.option("--launch-overhead", is_flag=True,
              help="With ENGINE_DIR built for a GPU arch: host time per ahead-of-time kernel launch and launches "
                   "per layer and per forward; on a GPU (the default where there is one) the driver call "
                   "(cuLaunchKernel) is timed too, on the CPU it is left out.")
@click.option("--mixed-step", is_flag=True,
              help="With --shape and --kernels aot or aot-check: host ms of a step carrying one 512-token prefill "
                   "chunk beside 32 decodes of each kind (ar, draft-32, verify-32, quad-k8) at 2,048 cached "
                   "tokens, on the eager kernel path (no graph replays such a step); measured at 2 and 4 layers "
                   "and extrapolated to the shape's (on the CPU the driver call is left out).")
@click.option("--host-overhead", is_flag=True,
              help="Measure the host work per engine step of ENGINE_DIR (wall time minus the model forward) per "
                   "mode at 1, 8 and 32 running requests; use a tiny checkpoint to see the host alone.")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None,
              help="With --host-overhead: also measure every row with requests asking for log-probabilities "
                   "and this many alternatives, to see what they cost per step.")
@click.option("--prefix-ttft", is_flag=True,
              help="Time to first token of ENGINE_DIR for a request sharing a 1,000-token prefix with the request "
                   "before it, with the prefix cache on and off.")
@click.option("--prefix-tokens", type=int, default=1000, help="With --prefix-ttft: the shared prefix's length.")
@click.option("--structured", is_flag=True,
              help="Structured output on ENGINE_DIR (made for the bundled nld-tiny): per mode at temperature 0 under "
                   "a JSON schema and without it, validity, tokens per forward and tokens/s, the spec modes also with "
                   "unshaped drafts; and host ms per step with and without the guide at --batch-sizes running "
                   "requests [default there: 1,32].")
def bench(engine_dir: Path | None, shape: str | None, dtype: str, device: str | None, modes: str, batch_sizes: str,
          concurrency: str, context: int, iters: int, max_new_tokens: int, with_hf: bool, tp: int, json_path: Path,
          plot_path: Path | None, serve_url: str | None, duration: float, kernels: str, sm: str,
          sm_count: int | None, kernel_dir: Path | None, end_to_end: bool, block_length: int | None, prompt_tokens: int,
          launch_overhead: bool, mixed_step: bool, host_overhead: bool, logprobs: int | None, prefix_ttft: bool,
          prefix_tokens: int, structured: bool, each_mode: bool = False) -> None:
    """Benchmark an engine (end to end per mode + step latencies), a random model at --shape, or a server."""
    from nemodiff.bench import steps as b
    from nemodiff.bench.plots import plot_report
    from nemodiff.device import device_name, empty_cache, is_cuda, resolve_device

    if serve_url is not None:
        _bench_server(serve_url, concurrency, duration, modes, max_new_tokens, json_path, plot_path, each_mode)
        return
    if host_overhead:
        if engine_dir is None:
            raise click.UsageError("--host-overhead needs an ENGINE_DIR")
        _bench_host(engine_dir, device, modes, batch_sizes, iters, json_path, logprobs)
        return
    if structured:
        if engine_dir is None:
            raise click.UsageError("--structured needs an ENGINE_DIR")
        source = click.get_current_context().get_parameter_source("batch_sizes")
        levels = [1, 32] if source == click.core.ParameterSource.DEFAULT else _ints(batch_sizes)
        _bench_structured(engine_dir, device, kernels, modes, levels, iters, json_path)
        return
    if prefix_ttft:
        if engine_dir is None:
            raise click.UsageError("--prefix-ttft needs an ENGINE_DIR")
        _bench_prefix(engine_dir, device, kernels, prefix_tokens, json_path)
        return
    if launch_overhead:
        _bench_launches(engine_dir, iters, json_path, device, sm_count)
        return
    if mixed_step:
        from nemodiff.bench.mixed import bench_mixed, format_mixed

        report = bench_mixed(shape, dtype, device, kernels, sm, sm_count, kernel_dir, on_result=lambda row: _say(
            json_path, f"  {row['kind']}: {row['host_ms']:.2f} host ms per step"))
        _say(json_path, format_mixed(report["mixed_step"]))
        _write_json(report, json_path)
        return
    if (engine_dir is None) == (shape is None):
        raise click.UsageError("give an ENGINE_DIR or --shape, not both")
    if tp > 1 and not shape:
        raise click.UsageError("--tp needs --shape (an engine runs with the --tp it was built for: time it with "
                               "`nemodiff bench ENGINE_DIR`)")
    dev = resolve_device(device)
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_name(dev), "torch": torch.__version__,
              "context": context}
    _say(json_path, f"device: {report['device']} (torch {torch.__version__})")
    report["ceilings"] = b.machine_ceilings(dev)
    _say(json_path, "copy bandwidth {:.1f} GB/s, matmul {:.2f} TFLOP/s ({})".format(
        report["ceilings"]["copy_bytes_per_s"] / 1e9, report["ceilings"]["matmul_flops_per_s"] / 1e12,
        report["ceilings"]["matmul_dtype"]))
    server = None
    if shape:
        from nemodiff.bench.kernels import kernel_platform, resolve_mode, shape_kernels
        from nemodiff.bench.shapes import random_model, shape_config, transformers_baseline

        config = shape_config(shape)
        mode = resolve_mode(kernels, dev)
        platform = kernel_platform(dev, mode, sm, sm_count)
        before = _host_rss_bytes()
        model, weights = random_model(config, dtype, platform)
        report["host_memory"] = {"rss_growth_bytes": _host_rss_bytes() - before,
                                 "plain_weight_bytes": sum(t.numel() * t.element_size() for t in weights.values())}
        model.kernels, report["kernels"] = shape_kernels(config, dtype, platform, mode, kernel_dir)
        if model.kernels is not None:
            model.kernels.sm_count = sm_count
        _say(json_path, _kernels_line(report["kernels"]))
        page_size, title = 16, f"{shape} ({dtype}, random weights, kernels {mode}) on {report['device']}"
    else:
        from nemodiff import LLM
        from nemodiff.serving.async_engine import AsyncEngine

        llm = LLM(engine_dir, device=dev, kernels=kernels, sm_count=sm_count)
        model, config, page_size = llm.model, llm.config.model, llm.config.build.kv_page_size
        context = min(context, max(llm.config.build.max_seq_len - 1100, 16))
        report["context"] = context
        report["kernels"] = {"mode": model.kernels.name if model.kernels is not None else "off"}
        server = AsyncEngine(llm)
        title = f"{engine_dir.name} ({llm.config.build.dtype}) on {report['device']}"
    report["title"] = title

    def save() -> None:  # after every result: a later failure (or a kill) loses nothing measured
        if json_path not in (None, "-"):
            _write_json(report, json_path, quiet=True)

    report["weight_bytes"] = b.weight_bytes(model)
    roofline_ms = 1e3 * report["weight_bytes"] / report["ceilings"]["copy_bytes_per_s"]
    report["roofline"] = {"forward_ms": roofline_ms, "ar_tokens_per_s": 1e3 / roofline_ms}
    kinds = [k for k in b.STEP_KINDS if k != "quad-k32" or is_cuda(dev)]
    report["steps"] = []
    save()
    b.step_latencies(model, kinds, _ints(batch_sizes), context, page_size, iters,
                     on_result=lambda row: (report["steps"].append(row), save()))
    ar1 = next(r["ms"] for r in report["steps"] if r["kind"] == "ar" and r["batch"] == min(_ints(batch_sizes)))
    report["ar_batch1"] = {"ms": ar1, "tokens_per_s": 1e3 / ar1, "fraction_of_roofline": roofline_ms / ar1}
    if server is None:
        step = {r["kind"]: r["ms"] for r in report["steps"] if r["batch"] == min(_ints(batch_sizes))}
        report["projected_tokens_per_s_at_published_tpf"] = b.projected_tokens_per_s(step)
        report["projection_basis"] = b.PROJECTION_BASIS
    save()
    if model.kernels is not None:
        from nemodiff.bench.launches import forward_host_cost

        report["launch"] = forward_host_cost(model, page_size, context, iters=iters)
        save()
    if shape and with_hf:
        try:
            hf = transformers_baseline(config, weights, dev)
            if hf is not None:
                report["transformers_ar_tokens_per_s"] = b.transformers_ar_tokens_per_s(hf, context, 16, dev)
                report["speedup_vs_transformers"] = report["ar_batch1"]["tokens_per_s"] / \
                    report["transformers_ar_tokens_per_s"]
                del hf
        except Exception as exc:  # the baseline is optional: keep everything else
            report["transformers_error"] = f"{type(exc).__name__}: {exc}"
            click.echo(f"transformers baseline failed: {report['transformers_error']}", err=True)
        save()
    if shape:
        weights = None  # the plain tensors served the baseline only
        empty_cache(dev)
    if shape and end_to_end:
        from nemodiff.bench.random_engine import NOTE, engine_end_to_end, random_engine

        block = block_length or config.block_size
        levels = _ints(concurrency)
        engine = random_engine(model, page_size, max(levels), prompt_tokens + max_new_tokens + 2 * block, block)
        report["end_to_end_note"], report["end_to_end"] = NOTE, []
        engine_end_to_end(engine, modes.split(","), levels, prompt_tokens, max_new_tokens,
                          on_result=lambda row: (report["end_to_end"].append(row), save()))
        model.graphs = None
        del engine
        empty_cache(dev)
    if tp > 1:
        del model  # room for the shards
        empty_cache(dev)
        report["tp"] = b.tensor_parallel_steps(shape, dtype, dev, tp, _ints(batch_sizes), context, page_size, iters,
                                               report["steps"], kernels=report["kernels"]["mode"],
                                               kernel_dir=kernel_dir, sm=sm)
        save()
    if server is not None:
        prompts = [[1] + llm.tokenizer.encode(text, add_special_tokens=False) for text in
                   ("The cat sat on the", "Once upon a time", "1, 2, 3, 4,", "The weather today is")]
        report["end_to_end"] = b.end_to_end(server, prompts, modes.split(","), _ints(concurrency), max_new_tokens)
        server.shutdown()
    _print_table(report, json_path)
    _write_json(report, json_path)
    if plot_path is not None:
        _say(json_path, f"wrote {plot_path}" if plot_report(report, plot_path) else "no plot: matplotlib is not installed")


def _host_rss_bytes() -> int:
    """This process's resident host memory (Linux; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _kernels_line(info: dict) -> str:
    if info["mode"] not in ("aot", "aot-check"):
        return f"kernels: {info['mode']}"
    how = f"compiled in {info['compile_s']:.1f} s" if info["compiled"] else "reused"
    return f"kernels: {info['mode']}, {info['variants']} variants for {info['sm']} ({how}) in {info['dir']}"


def _print_table(report: dict, json_path: str | None) -> None:
    _say(json_path, f"\n{'step':12s} {'batch':>5s} {'tokens':>7s} {'ms':>9s}  path")
    for r in report["steps"]:
        path = ("cuda graph" if r.get("captured") else "graph path, eager") if r.get("graph") else "eager"
        _say(json_path, f"{r['kind']:12s} {r['batch']:5d} {r['tokens']:7d} {r['ms']:9.3f}  {path}")
    roof = report["roofline"]
    _say(json_path, f"roofline: {roof['forward_ms']:.3f} ms/forward ({roof['ar_tokens_per_s']:.1f} AR tokens/s); "
               f"AR batch 1: {report['ar_batch1']['tokens_per_s']:.1f} tokens/s "
               f"({100 * report['ar_batch1']['fraction_of_roofline']:.0f}% of roofline)")
    launch = report.get("launch")
    if launch:
        _say(json_path, f"launches per layer {launch['launches_per_layer']:.1f}, {launch['launches_per_forward']:.0f} per "
                   f"eager AR forward: host {launch['host_ms_per_forward']:.3f} ms per forward, "
                   f"{launch['host_us_per_launch']:.1f} us per launch ({launch['launcher']} launcher)")
    if "transformers_ar_tokens_per_s" in report:
        _say(json_path, f"transformers AR: {report['transformers_ar_tokens_per_s']:.1f} tokens/s "
                   f"(nemodiff {report['speedup_vs_transformers']:.1f}x)")
    if report.get("end_to_end_note"):
        _say(json_path, f"end to end, measured ({report['end_to_end_note']}):")
    for r in report.get("end_to_end", []):
        _say(json_path, f"{r['mode']:15s} x{r['concurrency']:<3d} {r['tokens_per_forward']:5.2f} tok/fwd "
                   f"{r['tokens_per_s']:8.1f} tok/s  TTFT {r['ttft_ms'] or 0:7.1f} ms  ITL {r['itl_ms'] or 0:6.2f} ms")
    if "tp" in report:
        tp = report["tp"]
        _say(json_path, f"tensor parallel x{tp['size']}: AR batch 1 {tp['ar_batch1_ms']:.3f} ms per token, "
                   f"{tp['ratio_to_tp1']:.3f} of one rank's (ideal {1 / tp['size']:.3f})")
    for mode, value in report.get("projected_tokens_per_s_at_published_tpf", {}).items():
        _say(json_path, f"projected {mode}: {value:.1f} tokens/s at the published tokens/forward (not measured)")


def _bench_prefix(engine_dir: Path, device: str | None, kernels: str, prefix_tokens: int, json_path: str | None):
    from nemodiff.bench.prefix import format_report, prefix_ttft

    report = prefix_ttft(engine_dir, device=device, kernels=kernels, prefix_tokens=prefix_tokens)
    _say(json_path, format_report(report))
    _write_json({"date": time.strftime("%Y-%m-%d"), "engine": str(engine_dir), "torch": torch.__version__,
                 "prefix_ttft": report}, json_path)


def _bench_structured(engine_dir: Path, device: str | None, kernels: str, modes: str, levels: list[int], iters: int,
                      json_path: str | None) -> None:
    from nemodiff import LLM
    from nemodiff.bench import structured as s

    llm = LLM(engine_dir, device=device, kernels=kernels, max_batch_size=max(levels + [len(s.PROMPTS)]))
    report = {"date": time.strftime("%Y-%m-%d"), "engine": str(engine_dir), "device": str(llm.model.device),
              "torch": torch.__version__, "schema": s.SCHEMA, "host_guide": s.HOST_GUIDE, "prompts": list(s.PROMPTS),
              "max_new_tokens": s.MAX_NEW_TOKENS, "temperature": 0.0}
    _say(json_path, f"structured output on {engine_dir} ({llm.config.build.dtype}) on {llm.model.device}: "
                    f"{len(s.PROMPTS)} prompts at once, temperature 0, JSON schema {json.dumps(s.SCHEMA)}")
    report["runs"] = s.structured_runs(llm, modes.split(","), on_result=lambda row: _say(
        json_path, f"  {row['mode']} {'guided' if row['guided'] else 'unguided'}: {row['tokens_per_forward']:.2f} tok/fwd"))
    report["tokens_per_forward"] = s.summary(report["runs"])
    _say(json_path, s.format_runs(report["runs"]))
    steps = max(iters, 20)
    _say(json_path, f"\nhost work per engine step, median of {steps} steady steps (guided: an array of the schema's "
                    f"objects, minItems {s.HOST_GUIDE['minItems']})")
    report["host_overhead"] = s.structured_host(llm, modes.split(","), levels, steps)
    _say(json_path, s.format_host(report["host_overhead"]))
    _write_json(report, json_path)


def _bench_host(engine_dir: Path, device: str | None, modes: str, batch_sizes: str, iters: int,
                json_path: Path, logprobs: int | None = None) -> None:
    from nemodiff import LLM
    from nemodiff.bench.host import format_table, host_overhead

    levels = _ints(batch_sizes)
    llm = LLM(engine_dir, device=device, max_batch_size=max(levels))
    _say(json_path, f"host overhead of {engine_dir} ({llm.config.build.dtype}) on {llm.model.device}, "
               f"{max(iters, 20)} steady steps per row")
    rows = host_overhead(llm, modes.split(","), levels, steps=max(iters, 20), logprobs=logprobs)
    _say(json_path, format_table(rows))
    _write_json({"date": time.strftime("%Y-%m-%d"), "engine": str(engine_dir), "device": str(llm.model.device),
                 "torch": torch.__version__, "host_overhead": rows}, json_path)


def _bench_server(url: str, concurrency: str, duration: float, modes: str, max_tokens: int, json_path: str | None,
                  plot_path: Path | None, each_mode: bool = False) -> None:
    import asyncio

    from nemodiff.bench.serve import bench_server, format_rows

    source = click.get_current_context().get_parameter_source("concurrency")
    levels = [1, 8, 32, 64] if source == click.core.ParameterSource.DEFAULT else _ints(concurrency)
    try:
        rows = asyncio.run(bench_server(url, levels, duration, modes.split(","), max_tokens, each_mode=each_mode))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    _say(json_path, format_rows(rows))
    report = {"date": time.strftime("%Y-%m-%d"), "server": url, "levels": rows,
              "title": f"{url}, modes {modes}, {max_tokens} tokens per request"}
    _write_json(report, json_path)
    if plot_path is not None:
        from nemodiff.bench.plots import plot_report

        _say(json_path, f"wrote {plot_path}" if plot_report(report, plot_path) else "no plot: matplotlib is not installed")


def _bench_launches(engine_dir: Path | None, iters: int, json_path: str | None, device: str | None,
                    sm_count: int | None = None) -> None:
    from nemodiff.bench.launches import format_report, launch_overhead
    from nemodiff.device import KernelLaunchError

    if engine_dir is None:
        raise click.UsageError("--launch-overhead needs an ENGINE_DIR built for a GPU arch (nemodiff-build --arch h200)")
    try:
        report = launch_overhead(engine_dir, iters=max(iters, 20), device=device, sm_count=sm_count)
    except KernelLaunchError as exc:
        raise click.ClickException(str(exc)) from None
    report["date"] = time.strftime("%Y-%m-%d")
    _say(json_path, format_report(report))
    _write_json(report, json_path)


def _write_json(report: dict, json_path: str | None, quiet: bool = False) -> None:
    """--json PATH: write the file; --json alone: print the JSON; no --json: nothing."""
    if json_path is None:
        return
    text = json.dumps(report, indent=2)
    if json_path == "-":
        click.echo(text)
        return
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    if not quiet:
        click.echo(f"wrote {path}")


def _say(json_path: str | None, text: str) -> None:
    """Human-readable lines: stdout, or stderr when `--json` alone claims stdout for the JSON."""
    click.echo(text, err=json_path == "-")
