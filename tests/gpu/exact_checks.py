"""GPU exactness and device checks: what a first GPU run must show besides speed. Run by run_device_checks.sh
after model_checks.py; results go to $OUT/exact_checks.json after every check.

checkpoint ──builder──▶ engine dir ──runtime (GPU: cubins, CUDA graphs)──▶ [these checks] ──▶ summary.py

On the NLD-8B widths with random weights (hidden 4096, MLP 14336, 32/8 heads of 128, vocab 131072; two
layers, so it fits the script's time: a row's bit pattern depends on the kernels and widths, not on
the depth), in bf16 and fp8, through the same runtime Engine, cubins and CUDA graphs serving runs:
- bit-exactness: prompt 0's AR tokens and log-probabilities alone, in a batch of 5 and in a mixed-mode
  batch of 8 (AR, diffusion and both spec modes), and LinearSpec's and QuadraticSpec's alone: the same
  tokens and bit-identical log-probabilities (float equality, no tolerance);
- 500 replays of the AR graph at a long context (split-KV; fp8 linears split K by the SM count): every
  replay's logits equal the first bit for bit;
- `compute-sanitizer --tool memcheck` on one eager AR step, where the tool exists (skipped otherwise);
- on machines with two GPUs, an engine on cuda:1 stepped from a thread whose current device is 0: it
  captures and replays its graphs there, gives the tokens it gives on its own thread, and allocates
  nothing on device 0 (the CPU dry run does the same on the emulated GPU as index 1, where every
  device call is recorded with the index it acts on);
- host time per launch of an eager AR step, the driver call (cuLaunchKernel) included;
- the decode GEMM's HBM bandwidth as a fraction of the device's copy rate at M = 1, 4 and 16, calling
  the model's own linear layers with its kernel library (whichever GEMM the forward uses is measured).
In the CPU dry run (check_report.Rig) the same code runs on the "micro" shape under aot-check, with few
tokens and replays; the sanitizer is skipped and bandwidths are host-clock figures, not HBM.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_report import Report, Rig  # noqa: E402

from nemodiff import SamplingParams  # noqa: E402
from nemodiff.bench.kernels import kernel_platform, shape_kernels  # noqa: E402
from nemodiff.bench.launches import forward_host_cost  # noqa: E402
from nemodiff.bench.random_engine import random_engine  # noqa: E402
from nemodiff.bench.shapes import random_model, shape_config  # noqa: E402
from nemodiff.bench.steps import _segments  # noqa: E402
from nemodiff.device import EMULATED_GPU_ENV, empty_cache, multiprocessor_count, synchronize  # noqa: E402
from nemodiff.plugins.fp8_gemm import plan  # noqa: E402
from nemodiff.runtime.model.graphs import GraphRunner  # noqa: E402
from nemodiff.runtime.model.kv_cache import PagedKVCache  # noqa: E402

REPORT = Report("exact_checks")
record = REPORT.record
RIG = Rig()
KERNELS = "aot-check" if RIG.dry else "aot"
KERNEL_ROOT = Path(os.environ.get("NEMODIFF_KERNEL_ROOT") or "/tmp/nemodiff-exact-kernels")
MIXED = ("ar", "diffusion", "linear-spec", "quadratic-spec", "ar", "linear-spec", "quadratic-spec", "diffusion")
if not RIG.dry:
    SHAPE, LAYERS, TOKENS, PROMPT, BLOCK, REPLAYS, CONTEXT, PAGE = "nld-8b", 2, 24, 40, 8, 500, 8192, 16
else:
    SHAPE, LAYERS, TOKENS, PROMPT, BLOCK, REPLAYS, CONTEXT, PAGE = "micro", 1, 2, 3, 2, 3, 256, 4
BANDWIDTH_TARGET = 0.9


def config(layers: int = LAYERS):
    return dataclasses.replace(shape_config(SHAPE), num_hidden_layers=layers)


def model_for(dtype: str, platform, layers: int = LAYERS):
    gc.collect()  # the last check's model and graphs (reference cycles) leave the device first
    empty_cache(RIG.device)
    cfg = config(layers)
    model = random_model(cfg, dtype, platform, seed=0)[0]
    model.kernels = shape_kernels(cfg, dtype, platform, KERNELS, KERNEL_ROOT)[0]
    return model


def prompts(count: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(200, vocab, (PROMPT + 3 * (i % 3),), generator=gen).tolist() for i in range(count)]


def run(engine, batch: list[list[int]], modes: tuple[str, ...]) -> list:
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, logprobs=0, mode=m))
                for p, m in zip(batch, modes)]
    while any(not r.finished for r in requests):
        engine.step()
    return requests


def same(got, want) -> tuple[bool, str]:
    """The same tokens and bit-identical log-probabilities (float equality)."""
    a, b = list(got.output_ids), list(want.output_ids)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return False, f"tokens differ from position {i} of {len(b)}"
    la, lb = [e and e.logprob for e in got.logprobs], [e and e.logprob for e in want.logprobs]
    off = [i for i, (x, y) in enumerate(zip(la, lb)) if x != y]
    if off or len(la) != len(lb):
        worst = max((abs(la[i] - lb[i]) for i in off if None not in (la[i], lb[i])), default=float("nan"))
        return False, f"{len(b)} tokens equal; log-probabilities differ at {len(off)} of {len(lb)} (max {worst:.3g})"
    return True, f"{len(b)} tokens and their log-probabilities bit-identical"


def check_exactness(dtype: str, platform) -> None:
    model = model_for(dtype, platform)
    engine = random_engine(model, PAGE, max_batch_size=8, max_seq_len=PROMPT + 8 + TOKENS + 4 * BLOCK,
                           block_length=BLOCK)
    batch = prompts(8, model.config.vocab_size)
    alone = run(engine, batch[:1], ("ar",))[0]
    for label, got in (("AR in a batch of 5", run(engine, batch[:5], ("ar",) * 5)[0]),
                       ("AR in a mixed-mode batch of 8", run(engine, batch, MIXED)[0]),
                       ("linear-spec alone", run(engine, batch[:1], ("linear-spec",))[0]),
                       ("quadratic-spec alone", run(engine, batch[:1], ("quadratic-spec",))[0])):
        ok, detail = same(got, alone)
        record(f"{dtype} {label} equals AR alone", ok, detail)
    replays = model.graphs.replays if model.graphs is not None else 0
    record(f"{dtype} exactness ran on the graph path", replays > 0, f"{replays} graph replays")


def check_replays(platform) -> None:
    """REPLAYS replays of the AR graph at CONTEXT tokens (split-KV; fp8 split-K) equal the first."""
    model = model_for("fp8", platform)
    cfg = model.config
    pages = -(-(CONTEXT + 16) // PAGE)
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, PAGE, pages + 1, model.dtype,
                         platform, max_pages_per_request=pages, max_requests=1)
    model.graphs = runner = GraphRunner(model, cache, CONTEXT + 16, buckets=(1,))
    runner.capture_steady_shapes([("ar",)])
    cache.k.normal_()
    cache.v.normal_()
    cache.add_request(0)
    cache.reserve(0, CONTEXT + 8)
    cache.set_length(0, CONTEXT)
    cache.reserve(0, CONTEXT + 8)
    segments = _segments("ar", 1, CONTEXT)
    first = model.forward(segments, cache)[0].clone()
    differ = 0
    for _ in range(REPLAYS):
        differ += int(not torch.equal(model.forward(segments, cache)[0], first))
    splits = max(s for _, _, s in runner.graphs)
    layer, sms = model.layers[0], multiprocessor_count(model.device, cpu_stand_in=1)  # as KernelLibrary.fp8_linear
    split_k = [name for name in ("qkv", "o", "gate_up", "down")
               if plan(1, *getattr(layer, name).weight.shape, sms)[0] > 1]
    record(f"{REPLAYS} graph replays (split-KV up to {splits}) equal the first", differ == 0 and
           runner.replays > REPLAYS, f"{differ} of {REPLAYS} differ; {runner.replays} replays at {CONTEXT} tokens "
           f"({'captured' if runner.capture else 'the static path run eagerly: dry run'}); fp8 linears that "
           f"split K at {sms} SMs: {', '.join(split_k) or 'none'}")


def one_step() -> None:
    """The sanitizer's target: one eager AR step of a one-layer bf16 model (python exact_checks.py --one-step)."""
    platform = kernel_platform(RIG.device, KERNELS, RIG.sm)
    model = model_for("bf16", platform, layers=1)
    cfg = model.config
    cache = PagedKVCache(1, model.num_kv_heads, cfg.head_dim, PAGE, 16, model.dtype, platform, max_pages_per_request=15)
    cache.add_request(0)
    cache.reserve(0, 3 * PAGE)
    cache.set_length(0, 2 * PAGE)
    model.forward(_segments("ar", 1, 2 * PAGE), cache)
    synchronize(model.device)


def check_memcheck() -> None:
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if RIG.dry or tool is None:
        record("compute-sanitizer memcheck, one AR step", True,
               "skipped: " + ("CPU dry run" if RIG.dry else "compute-sanitizer is not installed"))
        return
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, __file__, "--one-step"]
    env = dict(os.environ, OUT=tempfile.mkdtemp())  # the child's empty report must not replace this one
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        record("compute-sanitizer memcheck, one AR step", False, "did not finish within 60 s")
        return
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    record("compute-sanitizer memcheck, one AR step", proc.returncode == 0, f"exit {proc.returncode}: {tail}")


def check_launch_cost(platform) -> None:
    model = model_for("bf16", platform)
    cost = forward_host_cost(model, PAGE, context=64 if not RIG.dry else 8, iters=20 if not RIG.dry else 2)
    record("host time per launch, eager AR step, driver call included" if not RIG.dry else
           "host time per launch, eager AR step (dry run: the driver call is interpreted)", True,
           f"{cost['host_us_per_launch']:.1f} us per launch, {cost['launches_per_forward']:.0f} launches "
           f"({cost['dense_gemms_per_forward']:.0f} dense GEMMs) in {cost['host_ms_per_forward']:.3f} ms host")


def copy_rate(nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=RIG.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (RIG.time_ms(lambda: dst.copy_(src), iters=10) / 1e3)


def check_bandwidth(platform) -> None:
    nbytes = (1 << 30) if not RIG.dry else (1 << 22)
    copy = copy_rate(nbytes)
    record("device copy rate", copy > 0, f"{copy / 1e9:.0f} GB/s (read + write of {nbytes >> 20} MiB)")
    for dtype in ("bf16", "fp8"):
        model = model_for(dtype, platform, layers=1)
        layer, kernels = model.layers[0], model.kernels
        for name in ("gate_up", "down"):
            linear = getattr(layer, name)
            n, k = linear.weight.shape
            for m in (1, 4, 16):
                x = torch.randn(m, k, device=RIG.device).to(model.dtype)
                ms = RIG.time_ms(lambda f=linear, a=x, lib=kernels: f(a, lib), iters=50)
                moved = n * k * linear.weight.element_size() + 2 * m * (n + k) + (4 * n if dtype == "fp8" else 0)
                frac = moved / (ms / 1e3) / copy
                record(f"decode GEMM {dtype} {name} ({n}x{k}) M={m}: HBM fraction", RIG.dry or frac >= BANDWIDTH_TARGET,
                       f"{frac:.2f} of the copy rate ({ms * 1e3:.1f} us; target {BANDWIDTH_TARGET})"
                       + (" - dry run: host clock, not HBM" if RIG.dry else ""))


def check_second_device() -> None:
    """An engine on device 1, stepped from a thread whose current device is 0."""
    if not RIG.dry and torch.cuda.device_count() < 2:
        record("engine on cuda:1", True, "skipped: one GPU")
        return
    if RIG.dry:
        os.environ[EMULATED_GPU_ENV] = "1"
        device = RIG.device
    else:
        device = torch.device("cuda", 1)
    gc.collect()  # what earlier checks left on device 0 goes now, not during the measurement
    before = torch.cuda.memory_allocated(0) if not RIG.dry else 0
    platform = kernel_platform(device, KERNELS, RIG.sm)  # binds this thread to device 1
    model = model_for("bf16", platform)
    engine = random_engine(model, PAGE, max_batch_size=2, max_seq_len=PROMPT + 32 + TOKENS, block_length=BLOCK)
    batch = prompts(2, model.config.vocab_size)
    here = run(engine, batch, ("ar", "linear-spec"))
    there = []

    def other_thread():
        if not RIG.dry:
            torch.cuda.set_device(0)
        with platform.on_device():
            there.extend(run(engine, batch, ("ar", "linear-spec")))
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    equal = [r.output_ids for r in here] == [r.output_ids for r in there]
    replays = model.graphs.replays if model.graphs is not None else 0
    if RIG.dry:
        os.environ.pop(EMULATED_GPU_ENV)
        off = [c for c in platform.emulator.calls if c[1] != 1]
        kinds = sorted({what for what, _ in platform.emulator.calls})
        record("engine on the emulated GPU 1", equal and not off and replays > 0,
               f"{len(platform.emulator.calls)} device calls ({', '.join(kinds)}), {len(off)} on another device; "
               f"{replays} graph replays; tokens equal from both threads: {equal}")
    else:
        grown = torch.cuda.memory_allocated(0) - before
        record("engine on cuda:1 from a thread on device 0", equal and grown <= 0 and replays > 0,
               f"{replays} graph replays; tokens equal from both threads: {equal}; device 0 allocated {grown} bytes")


def main() -> int:
    if "--one-step" in sys.argv:
        one_step()
        return 0
    print(f"exactness checks on {RIG.name}: {SHAPE} widths, {LAYERS} layer(s), random weights", flush=True)
    KERNEL_ROOT.mkdir(parents=True, exist_ok=True)
    platform = kernel_platform(RIG.device, KERNELS, RIG.sm)
    started = time.perf_counter()
    REPORT.run([("bf16 exactness", lambda: check_exactness("bf16", platform)),
                ("fp8 exactness", lambda: check_exactness("fp8", platform)),
                ("graph replay", lambda: check_replays(platform)),
                ("memcheck", check_memcheck),
                ("launch cost", lambda: check_launch_cost(platform)),
                ("bandwidth", lambda: check_bandwidth(platform)),
                ("second device", check_second_device)])
    print(f"exactness checks: {time.perf_counter() - started:.0f} s", flush=True)
    return REPORT.finish()


if __name__ == "__main__":
    sys.exit(main())
