"""Tensor parallelism on CPU: 2 gloo ranks against the same engine built for one rank.

checkpoint ──builder (--tp 2)──▶ engine dir ──[runtime: rank 0 + one worker process]──▶ Triton

The single-rank engine is the reference: logits agree within fp32 tolerance, greedy outputs
agree token for token in every mode (and the spec modes still equal AR), mixed-mode batches
and preemption stay exact, and a killed worker turns into errors instead of a hang.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_checkpoint, make_engine, make_sticky_checkpoint
from nemodiff import LLM, SamplingParams
from nemodiff.builder.build import BuildError
from nemodiff.engine_format import EngineConfig, EngineFormatError
from nemodiff.runtime.model.segments import Pattern, Segment, quadratic_mask
from nemodiff.runtime.parallel.comm import TensorParallelError
from nemodiff.serving.async_engine import AsyncEngine

PROMPTS = [[1, 200, 201, 202], [1] + list(range(130, 150)), [1, 300, 300, 301, 302]]
MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    random_ckpt = make_checkpoint(root / "random", lora_rank=8, eos_token_id=[2, 5])
    sticky_ckpt = make_sticky_checkpoint(root / "sticky", seed=3)
    return {
        ("random", 1): make_engine(random_ckpt, root / "random-tp1", kv_page_size=4),
        ("random", 2): make_engine(random_ckpt, root / "random-tp2", kv_page_size=4, tp=2),
        ("sticky", 1): make_engine(sticky_ckpt, root / "sticky-tp1", kv_page_size=4),
        ("sticky", 2): make_engine(sticky_ckpt, root / "sticky-tp2", kv_page_size=4, tp=2),
    }


@pytest.fixture(scope="module")
def pairs(engines):
    """(single-rank LLM, two-rank LLM) per checkpoint."""
    made = {name: (LLM(engines[name, 1], device="cpu"), LLM(engines[name, 2], device="cpu"))
            for name in ("random", "sticky")}
    yield made
    for _, sharded in made.values():
        sharded.close()


# -- build -------------------------------------------------------------------------------------
def test_shards_are_the_slices_of_the_single_rank_weights(engines):
    engine = engines["random", 2]
    config = EngineConfig.load(engine)
    assert config.build.tp == 2
    manifest = (engine / "manifest.json").read_text()
    for name in ("weights.rank0.safetensors", "weights.rank1.safetensors", "draft_lora.rank0.safetensors",
                 "draft_lora.rank1.safetensors"):
        assert name in manifest
    assert not (engine / "weights.safetensors").exists()
    full = load_file(str(engines["random", 1] / "weights.safetensors"))
    ranks = [load_file(str(engine / f"weights.rank{r}.safetensors")) for r in range(2)]
    m = config.model
    hd, hq, hkv = m.head_dim, m.num_attention_heads, m.num_key_value_heads
    q, k, v = full["layers.1.qkv"].split([hq * hd, hkv * hd, hkv * hd])
    for r, shard in enumerate(ranks):
        qr, kr, vr = shard["layers.1.qkv"].split([hq * hd // 2, hkv * hd // 2, hkv * hd // 2])
        assert torch.equal(qr, q.chunk(2)[r]) and torch.equal(kr, k.chunk(2)[r]) and torch.equal(vr, v.chunk(2)[r])
        assert torch.equal(shard["layers.1.o"], full["layers.1.o"].chunk(2, dim=1)[r])
        gate, up = full["layers.1.gate_up"].chunk(2)
        assert torch.equal(shard["layers.1.gate_up"], torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))
        assert torch.equal(shard["layers.1.down"], full["layers.1.down"].chunk(2, dim=1)[r])
        assert torch.equal(shard["head"], full["head"].chunk(2)[r])
        assert torch.equal(shard["embed"], full["embed"]) and torch.equal(shard["final_norm"], full["final_norm"])
    lora = load_file(str(engines["random", 1] / "draft_lora.safetensors"))
    for r in range(2):
        shard = load_file(str(engine / f"draft_lora.rank{r}.safetensors"))
        assert torch.equal(shard["layers.0.lora_a"], lora["layers.0.lora_a"].chunk(2, dim=1)[r])
        assert torch.equal(shard["layers.0.lora_b"], lora["layers.0.lora_b"])


def test_fp8_shards_dequantize_to_the_single_rank_weights(engines, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", num_attention_heads=4, num_key_value_heads=4)
    one = load_file(str(make_engine(ckpt, tmp_path / "one", dtype="fp8") / "weights.safetensors"))
    four = make_engine(ckpt, tmp_path / "four", dtype="fp8", tp=4)
    for name in ("layers.0.qkv", "layers.0.o", "layers.0.gate_up", "layers.0.down"):
        full = one[name].float() * one[name + ".scale"][:, None]
        parts = []
        for r in range(4):
            shard = load_file(str(four / f"weights.rank{r}.safetensors"))
            parts.append(shard[name].float() * shard[name + ".scale"][:, None])
        dim = 1 if name.endswith((".o", "down")) else 0
        if name.endswith("qkv"):  # [q_r; k_r; v_r] per rank
            per = [p.split([16, 16, 16]) for p in parts]
            rebuilt = torch.cat([torch.cat([p[i] for p in per]) for i in range(3)])
        elif name.endswith("gate_up"):
            halves = [p.chunk(2) for p in parts]
            rebuilt = torch.cat([torch.cat([h[i] for h in halves]) for i in range(2)])
        else:
            rebuilt = torch.cat(parts, dim=dim)
        assert torch.equal(rebuilt, full), name


def test_tp_must_divide_the_kv_heads(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")  # 2 KV heads
    with pytest.raises(BuildError, match=r"--tp 3 must divide the model's 2 KV heads.*choose one of: 1, 2"):
        make_engine(ckpt, tmp_path / "engine", tp=3)
    assert not (tmp_path / "engine").exists()


def test_engine_runs_only_with_its_own_tp(engines):
    with pytest.raises(ValueError, match=r"built for 2 tensor-parallel rank\(s\).*rebuild it with --tp 1"):
        LLM(engines["random", 2], device="cpu", tp=1)


def test_each_rank_checks_its_own_shards(engines, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(engines["random", 2], broken)
    data = bytearray((broken / "weights.rank1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "weights.rank1.safetensors").write_bytes(bytes(data))
    with pytest.raises(TensorParallelError, match=r"rank 1 failed to start.*weights.rank1.safetensors.*manifest"):
        LLM(broken, device="cpu")
    with pytest.raises(EngineFormatError):
        from nemodiff.runtime.model.loader import load_engine

        load_engine(broken, device="cpu", rank=1)


# -- forward -----------------------------------------------------------------------------------
def _two_steps(llm: LLM) -> list[torch.Tensor]:
    """Prefill two requests, then one step mixing a LoRA draft (FULL) and a QuadraticSpec forward (MASK)."""
    cache, model = llm.cache, llm.model
    for rid, prompt in enumerate(PROMPTS[:2]):
        cache.add_request(rid)
        cache.reserve(rid, len(prompt) + 40)
    first = model.forward([Segment(rid, p, list(range(len(p))), 0, Pattern.CAUSAL, write_kv=True)
                           for rid, p in enumerate(PROMPTS[:2])], cache)
    for rid, prompt in enumerate(PROMPTS[:2]):
        cache.set_length(rid, len(prompt))
        cache.reserve(rid, len(prompt) + 40)
    k, p0, p1 = 4, len(PROMPTS[0]), len(PROMPTS[1])
    positions = list(range(p1, p1 + k)) + [p1 + i + 1 + j for i in range(k) for j in range(k)]
    second = model.forward([
        Segment(0, [7] + [100] * 7, list(range(p0, p0 + 8)), p0, Pattern.FULL, use_lora=True),
        Segment(1, [9] * k + [100] * (k * k), positions, p1, Pattern.MASK, write_kv=[True] * k + [False] * (k * k),
                mask=quadratic_mask(k)),
    ], cache)
    for rid in range(2):
        cache.free(rid)
    return first + second


def test_logits_equal_single_rank(pairs):
    single, sharded = pairs["random"]
    for got, want in zip(_two_steps(sharded), _two_steps(single)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_image_embeddings_reach_every_rank(tmp_path):
    from helpers import make_vlm_checkpoint

    ckpt = make_vlm_checkpoint(tmp_path / "vlm", num_attention_heads=4, num_key_value_heads=2)
    want_llm = LLM(make_engine(ckpt, tmp_path / "one"), device="cpu")
    with LLM(make_engine(ckpt, tmp_path / "two", tp=2), device="cpu") as got_llm:
        image = want_llm.config.model.image_token_id
        ids = [1, 5, image, image, image, 6]
        embeds = torch.randn(3, want_llm.config.model.hidden_size, generator=torch.Generator().manual_seed(0))
        outs = []
        for llm in (want_llm, got_llm):
            llm.cache.add_request(0)
            llm.cache.reserve(0, len(ids))
            segment = Segment(0, ids, list(range(len(ids))), 0, Pattern.CAUSAL, write_kv=True, image_embeds=embeds)
            outs.append(llm.model.forward([segment], llm.cache)[0])
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# -- generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "sticky"])
def test_greedy_outputs_equal_single_rank_in_every_mode(pairs, name):
    single, sharded = pairs[name]
    ar = single.generate(PROMPTS, SamplingParams(max_new_tokens=21, ignore_eos=True))
    # random weights reject every draft (a forward per token, each a round trip between the ranks):
    # one block length there; the sticky model, whose drafts are accepted, takes both
    blocks = (4, 8) if name == "sticky" else (8,)
    cases = [SamplingParams(max_new_tokens=21, ignore_eos=True, mode=mode, block_length=block)
             for mode in MODES for block in blocks]
    cases += [SamplingParams(max_new_tokens=21, ignore_eos=True, mode="diffusion", threshold=None, block_length=8),
              SamplingParams(max_new_tokens=21, ignore_eos=True, mode="linear-spec", draft_lora=False),
              SamplingParams(max_new_tokens=30, mode="quadratic-spec", block_length=8)]
    for params in cases:
        want = single.generate(PROMPTS, params)
        got = sharded.generate(PROMPTS, params)
        for g, w, a in zip(got, want, ar):
            assert g.output_ids == w.output_ids, params
            assert g.num_forward_passes == w.num_forward_passes and g.finish_reason == w.finish_reason
            if params.mode in ("linear-spec", "quadratic-spec") and params.ignore_eos:
                assert g.output_ids == a.output_ids  # lossless: still AR's output
    if name == "sticky":
        outs = sharded.generate(PROMPTS, SamplingParams(max_new_tokens=21, ignore_eos=True, mode="quadratic-spec",
                                                        block_length=4))
        accepted = {n for o in outs for n in o.stats["accepted_length_histogram"]}
        assert max(accepted) > 1, accepted  # whole drafts were accepted, not just bonus tokens


def test_mixed_modes_and_preemption_stay_exact(engines, pairs):
    single, _ = pairs["sticky"]
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True, mode=MODES[i % 4], block_length=4)
              for i in range(6)]
    prompts = [PROMPTS[i % 3] + [40 + i] for i in range(6)]
    want = single.generate(prompts, params)
    with LLM(engines["sticky", 2], device="cpu", num_kv_pages=30, max_batch_size=6) as small:
        got = small.generate(prompts, params)
        assert small.cache.num_used_pages == 0
    assert sum(o.stats.get("preemptions", 0) for o in got) > 0
    assert [o.output_ids for o in got] == [o.output_ids for o in want]


def test_sampling_follows_the_single_rank_engine(pairs):
    single, sharded = pairs["random"]
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_k=50, seed=11, ignore_eos=True)
    assert sharded.generate(PROMPTS[0], params)[0].output_ids == single.generate(PROMPTS[0], params)[0].output_ids


# -- failures ----------------------------------------------------------------------------------
def test_killed_worker_fails_requests_instead_of_hanging(engines):
    llm = LLM(engines["random", 2], device="cpu")
    try:
        worker = llm._driver.workers[0]
        assert llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=4))[0].finish_reason in ("length", "eos")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 .* exited"):
            llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=4))
        with pytest.raises(TensorParallelError, match=r"rank 1 .* exited"):  # and every later step
            llm.generate(PROMPTS[1], SamplingParams(max_new_tokens=4))
        assert time.monotonic() - start < 30
    finally:
        llm.close()


def test_worker_killed_mid_generation_ends_streams_with_errors(engines):
    llm = LLM(engines["random", 2], device="cpu")
    server = AsyncEngine(llm)
    try:
        stream = server.stream(PROMPTS[1], SamplingParams(max_new_tokens=200, ignore_eos=True), timeout=60)
        first = next(stream)
        assert first.token_ids and not first.finished
        llm._driver.workers[0].send_signal(signal.SIGKILL)
        updates = list(stream)
        assert updates[-1].finished and updates[-1].error_kind == "internal"
        assert "tensor-parallel" in updates[-1].error
        late = server.generate(PROMPTS[0], SamplingParams(max_new_tokens=4), timeout=60)
        assert late.finished and late.error and "tensor-parallel" in late.error
    finally:
        server.shutdown()
        llm.close()


def test_hung_worker_times_out_into_errors(engines):
    llm = LLM(engines["random", 2], device="cpu", tp_step_timeout_s=3.0)
    worker = llm._driver.workers[0]
    try:
        worker.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="tensor-parallel step failed"):
            llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=4))
        assert time.monotonic() - start < 30
        assert worker.wait(timeout=10) is not None  # the stuck worker was stopped, not left behind
    finally:
        llm.close()


def test_close_stops_the_workers(engines):
    llm = LLM(engines["random", 2], device="cpu")
    workers = list(llm._driver.workers)
    llm.close()
    assert all(w.poll() == 0 for w in workers)
    with pytest.raises(TensorParallelError, match="closed"):
        llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=2))
    assert np.all([w.returncode == 0 for w in workers])


# -- command line ------------------------------------------------------------------------------
def test_build_and_generate_with_tp_from_the_command_line(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    ckpt = make_checkpoint(tmp_path / "ckpt", lora_rank=4)
    bad = subprocess.run([bin_dir / "nemodiff-build", ckpt, "-o", tmp_path / "bad", "--tp", "4"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--tp 4 must divide the model's 2 KV heads" in bad.stderr
    outputs = {}
    for tp in (1, 2):
        engine = tmp_path / f"tp{tp}"
        built = subprocess.run([bin_dir / "nemodiff-build", ckpt, "-o", engine, "--dtype", "fp32", "--tp", str(tp)],
                               capture_output=True, text=True, check=True)
        assert ("tensor par.  2 ranks" in built.stdout) == (tp == 2)
        generated = subprocess.run([bin_dir / "nemodiff", "generate", engine, "--tp", str(tp), "--prompt",
                                    "the red cat", "--mode", "linear-spec", "--block-length", "4",
                                    "--max-new-tokens", "12", "--json"], capture_output=True, text=True, check=True)
        outputs[tp] = json.loads(generated.stdout)["output_ids"]
    assert outputs[2] == outputs[1] and len(outputs[1]) > 0
    wrong = subprocess.run([bin_dir / "nemodiff", "generate", tmp_path / "tp2", "--tp", "1", "--prompt", "x"],
                           capture_output=True, text=True)
    assert wrong.returncode != 0 and "rebuild it with --tp 1" in wrong.stderr


def test_bench_reports_the_tensor_parallel_ratio(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    report_path = tmp_path / "bench.json"
    proc = subprocess.run([Path(sys.executable).parent / "nemodiff", "bench", "--shape", "tiny", "--device", "cpu",
                           "--tp", "2", "--batch-sizes", "1", "--context", "32", "--iters", "1", "--no-hf",
                           "--json", report_path, "--plot", tmp_path / "bench.png"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp = json.loads(report_path.read_text())["tp"]
    assert tp["size"] == 2 and {r["kind"] for r in tp["steps"]} == {"ar", "verify-32", "draft-32"}
    assert tp["ratio_to_tp1"] == pytest.approx(tp["ar_batch1_ms"] / tp["ar_batch1_ms_one_rank"])
    assert "tensor parallel x2" in proc.stdout


def test_prefix_cache_under_tensor_parallelism_stays_exact(engines, pairs):
    """Both ranks map the shared prefix to the same pages: a cached turn equals a single rank without the cache."""
    shared = [1] + list(range(60, 73))  # three full pages of 4 and one token more
    turns = [shared + [200, 201], shared + [210], shared[:6] + [220, 221]]  # many pages, then mid-page
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, mode="linear-spec", block_length=4)
    plain = LLM(engines["sticky", 1], device="cpu", prefix_cache=False)
    want = [plain.generate(ids, params)[0] for ids in turns]
    sharded = pairs["sticky"][1]  # its cache holds only other tests' prompts, none of these
    got = [sharded.generate(ids, params)[0] for ids in turns]
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert [o.cached_prompt_tokens for o in got] == [0, 12, 4]
