"""The GPU launch path, run on the CPU: `kernels="aot-check"` (docs/design.md §13).

Engines built for h200 (sm_90a) and b200 (sm_100a) carry cubins. Under aot-check the runtime runs
its GPU branch on the CPU (pinned-style staging, one upload, aligned slices, padded graph buckets,
tensor decisions), every launch goes through the ahead-of-time launcher (variant lookup in
kernels.json, argument packing), is checked against what its cubin assumes, and then runs the
same Triton function under the interpreter. Small shapes: the interpreter is slow.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import record_splits, transformers_model
from nemodiff import LLM, SamplingParams
from nemodiff.device import EMULATED_GPU_ENV, KernelLaunchError, Staging
from nemodiff.plugins.attention import choose_splits
from nemodiff.serving.async_engine import AsyncEngine

PROMPTS = [[1, 200, 201, 202], [1, 150, 151, 152, 153, 154, 155, 156, 157]]
SHORT = [[1, 150, 151, 152, 153]]
GRAPH_PROMPTS = [[1, 40 + i, 41 + i, 42 + i, 43][: 3 + i % 3] for i in range(5)]
# h200 in bf16 and fp8: tests/test_batch_invariance.py runs every mode there, log-probabilities included
ENGINES = [("h200", "fp32")] + [("b200", dtype) for dtype in ("fp32", "bf16", "fp8")]


def aot_llm(engine, **kwargs) -> LLM:
    llm = LLM(engine, device="cpu", kernels="aot-check", **kwargs)
    assert llm.model.kernels.name == "aot" and llm.platform.emulated
    return llm


@pytest.mark.parametrize("arch", ["h200", "b200"])
def test_fp32_greedy_ar_equals_transformers(checkpoint, gpu_engines, arch):
    llm = aot_llm(gpu_engines(arch, "fp32"), max_batch_size=2)
    outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True))
    reference = transformers_model(checkpoint)
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            hf = reference.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                                    pad_token_id=0, min_new_tokens=5)
        assert out.output_ids == hf[0, len(prompt):].tolist()
    launcher = llm.model.kernels.launcher
    assert launcher.launches > 0 and launcher.checker.checked == launcher.launches


@pytest.mark.parametrize("arch, dtype", ENGINES)
def test_every_mode_runs_and_the_spec_modes_equal_ar(gpu_engines, arch, dtype):
    llm = aot_llm(gpu_engines(arch, dtype), max_batch_size=2, cuda_graphs=False)
    want = [o.output_ids for o in llm.generate(SHORT, SamplingParams(max_new_tokens=4, ignore_eos=True))]
    for mode in ("linear-spec", "quadratic-spec"):
        got = llm.generate(SHORT, SamplingParams(max_new_tokens=4, ignore_eos=True, mode=mode, block_length=2))
        assert [o.output_ids for o in got] == want, mode
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, mode="diffusion", block_length=2, threshold=0.5)
    diffusion = llm.generate(SHORT, params)[0].output_ids
    assert len(diffusion) == 3
    if dtype == "fp32":  # the same algorithm as the reference path, to fp32 rounding
        assert diffusion == LLM(gpu_engines(arch, dtype), device="cpu", kernels="off").generate(SHORT, params)[0].output_ids
    assert llm.cache.num_used_pages == 0


@pytest.mark.parametrize("mode, counts", [("ar", (3, 5)), ("linear-spec", (3,)), ("diffusion", (3,)),
                                          ("quadratic-spec", (5,))])
def test_padded_graph_path_with_3_and_5_requests(gpu_engines, mode, counts):
    """Steady steps of every mode replay the static path, padded to buckets 4 and 8; prefills do not."""
    engine = gpu_engines("h200", "fp32")
    llm = aot_llm(engine, max_batch_size=8)
    runner = llm.model.graphs
    assert runner is not None and not runner.capture and runner.buckets == (1, 2, 4, 8)
    prepared = set(runner.graphs)
    reference = LLM(engine, device="cpu", kernels="off", max_batch_size=8)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, mode=mode, threshold=0.5)
    for count in counts:
        before = runner.replays
        got = llm.generate(GRAPH_PROMPTS[:count], params)
        assert [o.output_ids for o in got] == [o.output_ids for o in reference.generate(GRAPH_PROMPTS[:count], params)]
        assert runner.replays > before  # padded to buckets 4 and 8
        assert sum(o.num_forward_passes for o in got) > runner.replays - before  # prefills ran eagerly
    assert set(runner.graphs) == prepared  # nothing was captured while serving


def test_the_old_packed_staging_layout_is_refused(gpu_engines, monkeypatch):
    """Metadata parts packed back to back start at 4- or 8-byte offsets; the cubins assume 16."""
    llm = aot_llm(gpu_engines("h200", "fp32"), max_batch_size=2, cuda_graphs=False)
    monkeypatch.setattr(Staging, "__init__", _packed_staging_init)
    llm.model.builder.__init__(llm.platform, None)
    with pytest.raises(KernelLaunchError, match="is not 16-byte aligned"):
        llm.generate([[1, 5, 6]], SamplingParams(max_new_tokens=2))  # an odd token count


_aligned_init = Staging.__init__


def _packed_staging_init(self, platform, dtype):
    _aligned_init(self, platform, dtype)
    self.quantum = 1  # the layout before the fix: no padding between parts


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_graph_replay_never_syncs_the_host(gpu_engines):
    llm = aot_llm(gpu_engines("h200", "fp32"), max_batch_size=4)
    runner = llm.model.graphs
    llm.engine.add_request(GRAPH_PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
    llm.engine.add_request(GRAPH_PROMPTS[1], SamplingParams(max_new_tokens=8, ignore_eos=True))
    llm.engine.step()  # prefill
    calls = _Calls()
    replay = type(next(iter(runner.graphs.values()))).replay

    def watched(graph, batch):
        with calls:
            return replay(graph, batch)
    type(next(iter(runner.graphs.values()))).replay = watched
    try:
        llm.engine.step()
    finally:
        type(next(iter(runner.graphs.values()))).replay = replay
    assert runner.replays == 1 and calls.names
    # (Tensor.numpy() is allowed: it only views host memory, the staging buffer's, and fails on a device tensor)
    blocking = {"to", "cpu", "item", "tolist", "__bool__", "__int__", "__index__", "nonzero", "synchronize"}
    assert blocking.isdisjoint(calls.names), sorted(blocking & set(calls.names))


def test_graphs_are_bounded_by_the_batch_size_and_share_one_logits_buffer(gpu_engines):
    llm = aot_llm(gpu_engines("h200", "fp32"), max_batch_size=3)
    runner = llm.model.graphs
    assert runner.buckets == (1, 2, 3)  # the batch size is the largest bucket
    rows = max(graph.num_rows for graph in runner.graphs.values())
    assert runner.logits.shape == (rows, llm.config.model.vocab_size)
    out = [graph._run() for graph in list(runner.graphs.values())[:3]]
    assert {o.data_ptr() for o in out} == {runner.logits.data_ptr()}


def test_split_kv_follows_the_real_context_not_the_longest_allowed(gpu_engines):
    from nemodiff.runtime.model.kv_cache import PagedKVCache
    from nemodiff.runtime.model.segments import Segment

    llm = aot_llm(gpu_engines("h200", "fp32"), max_batch_size=2, cuda_graphs=False)
    model = llm.model
    cfg = model.config
    cache = PagedKVCache(cfg.num_hidden_layers, model.num_kv_heads, cfg.head_dim, 4, 200, model.dtype,
                         llm.platform, max_pages_per_request=100)
    seen = record_splits(model)
    kv, sms = model.rank_config.num_key_value_heads, llm.platform.sm_count
    for context in (10, 300):  # a short and a long committed prefix, one decode token each
        cache.add_request(context)
        cache.reserve(context, context + 1)
        cache.set_length(context, context)
        cache.reserve(context, context + 1)
        model.forward([Segment(context, [7], [context], context, write_kv=True)], cache)
    assert seen == [choose_splits(1, kv, 11, sms), choose_splits(1, kv, 301, sms)]
    assert seen[0] == 1 and seen[1] > 1  # the split follows the step's own context


def test_every_kernel_assumption_is_checked(gpu_engines):
    """Launches the wrappers would never make, straight at the launcher: each is refused by name."""
    from nemodiff.plugins.norm import norm_variant

    llm = aot_llm(gpu_engines("h200", "bf16"), max_batch_size=2, cuda_graphs=False)
    launcher = llm.model.kernels.launcher
    weight = llm.model.layers[0].attn_norm
    hidden = weight.shape[0]
    variant = norm_variant(torch.bfloat16, hidden, True)
    x = torch.zeros(3, hidden, dtype=torch.bfloat16)
    launcher.launch(variant, (3,), (x.clone(), x.clone(), weight, x.clone(), 1e-5))  # a good launch passes
    with pytest.raises(KernelLaunchError, match="add_rmsnorm .*argument delta_ptr: dtype torch.float32, but the "
                                                "cubin was compiled for \\*bf16"):
        launcher.launch(variant, (3,), (x.clone(), x.float(), weight, x.clone(), 1e-5))
    strided = torch.zeros(3, 2 * hidden, dtype=torch.bfloat16)[:, ::2]
    with pytest.raises(KernelLaunchError, match="argument delta_ptr: .* is not contiguous"):
        launcher.launch(variant, (3,), (x.clone(), strided, weight, x.clone(), 1e-5))
    with pytest.raises(KernelLaunchError, match="argument out_ptr: address .* is not 16-byte aligned"):
        launcher.launch(variant, (3,), (x.clone(), x.clone(), weight, torch.zeros(3 * hidden + 1,
                                                                               dtype=torch.bfloat16)[1:], 1e-5))
    with pytest.raises(KernelLaunchError, match="grid \\(0, 1, 1\\): dimension 0 is 0"):
        launcher.launch(variant, (0,), (x.clone(), x.clone(), weight, x.clone(), 1e-5))
    with pytest.raises(KernelLaunchError, match="argument eps: expected a Python number"):
        launcher.launch(variant, (3,), (x.clone(), x.clone(), weight, x.clone(), torch.tensor(1e-5)))


def test_bench_launch_overhead(gpu_engines):
    """`nemodiff bench ENGINE --launch-overhead --json`: host work per launch on the CPU, driver call left out
    (and the report says so; on a GPU it is timed)."""
    import json

    from click.testing import CliRunner

    from nemodiff.cli import main

    engine = gpu_engines("h200", "bf16")
    result = CliRunner().invoke(main, ["bench", str(engine), "--launch-overhead", "--iters", "20", "--json",
                                       "--sm-count", "132"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert all(row["dense_gemms"] == 0 for row in report["shapes"])  # no cuBLAS in a bf16 forward
    assert 0 < report["us_per_launch"] < 1000
    assert report["driver_call"] == "left out (aot-check on the CPU)" and report["device"] == "cpu"
    assert report["launches_per_layer"] <= 8
    assert set(report["launches_per_forward"]) == {"ar", "verify-32", "draft-32", "quad-k8"}


def test_the_command_line_runs_the_kernel_paths_with_nothing_in_the_environment(gpu_engines):
    """`generate --kernels interpret|aot-check` needs no TRITON_INTERPRET: the runtime asks for the interpreter."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    nemodiff = Path(sys.executable).parent / "nemodiff"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    engine = gpu_engines("h200", "fp32")
    outputs = {}
    for kernels in ("off", "interpret", "aot-check"):
        at_132 = ["--sm-count", "132"] if kernels == "aot-check" else []  # an H100's split plans
        run = subprocess.run([str(nemodiff), "generate", str(engine), "--prompt-ids", "1,150,151,152",
                              "--max-new-tokens", "4", "--mode", "linear-spec", "--kernels", kernels, "--json", *at_132],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[kernels] = json.loads(run.stdout)["output_ids"]
    assert outputs["interpret"] == outputs["off"] and outputs["aot-check"] == outputs["off"]


def test_an_engine_on_gpu_1_never_touches_gpu_0(gpu_engines, monkeypatch):
    """The emulated GPU path as device index 1: engine start (weights, cubin loads, cache, graphs), a
    generate() on the caller's thread and a request on the serving engine's thread record every staging
    copy, stream, graph, load and launch on the device each would act on, and none is on device 0."""
    monkeypatch.setenv(EMULATED_GPU_ENV, "1")
    llm = aot_llm(gpu_engines("h200", "fp32"), max_batch_size=2)
    emulator, params = llm.platform.emulator, SamplingParams(max_new_tokens=2, ignore_eos=True)
    assert emulator.index == llm.platform.index == 1 and emulator.current() == 0  # the caller's thread is left alone
    direct = llm.generate([[1, 40, 41, 42]], params)[0]
    server = AsyncEngine(llm)
    try:
        served = server.generate([1, 40, 41, 42], params)
    finally:
        server.shutdown()
    assert served.error is None and served.output.output_ids == direct.output_ids and len(direct.output_ids) == 2
    assert llm.model.graphs.replays > 0
    kinds = {what for what, _ in emulator.calls}
    assert {"staging", "fetch", "stream", "graph", "load", "launch", "bind"} <= kinds
    assert [call for call in emulator.calls if call[1] != 1] == []
    # a thread the engine was not given acts on device 0, as in CUDA: the record would show it
    thread = threading.Thread(target=lambda: llm.platform.staging(torch.int64).upload([np.arange(3)]))
    thread.start()
    thread.join()
    assert emulator.calls[-1] == ("staging", 0)
