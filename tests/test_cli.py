"""End to end through the installed console scripts: build, generate, inspect."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from helpers import make_checkpoint, transformers_model

BIN = Path(sys.executable).parent  # the console scripts of the interpreter running the tests


def run(script, *args):
    proc = subprocess.run([str(BIN / script), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_build_then_generate_reproduces_transformers_greedy(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=11)
    engine = tmp_path / "engine"
    built = run("nemodiff-build", ckpt, "-o", engine, "--dtype", "fp32")
    assert f"built engine: {engine}" in built.stdout
    prompt = "the red cat and the blue dog"
    out = json.loads(run("nemodiff", "generate", engine, "--prompt", prompt, "--mode", "ar",
                         "--max-new-tokens", "20", "--json").stdout)
    assert set(out) >= {"output_ids", "text", "finish_reason", "num_forward_passes", "tokens_per_forward", "seconds"}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompt_ids = tokenizer.encode(prompt).ids
    assert prompt_ids[0] == 1  # BOS added, as upstream
    with torch.no_grad():
        hf = transformers_model(ckpt).generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False,
                                               eos_token_id=2, pad_token_id=0)
    want = hf[0, len(prompt_ids):].tolist()
    assert out["output_ids"] == want
    assert out["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert out["finish_reason"] == ("eos" if want[-1] == 2 else "length")
    assert out["num_forward_passes"] == len(want)

    by_ids = json.loads(run("nemodiff", "generate", engine, "--prompt-ids", ",".join(map(str, prompt_ids)),
                            "--max-new-tokens", "20", "--json").stdout)
    assert by_ids["output_ids"] == want

    info = json.loads(run("nemodiff", "inspect", engine, "--json").stdout)
    assert info["build"]["arch"] == "cpu" and info["build"]["dtype"] == "fp32"
    assert "weights.safetensors" in info["files"] and len(info["files"]["weights.safetensors"]["sha256"]) == 64


def test_chat_template_is_applied(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    engine = tmp_path / "engine"
    run("nemodiff-build", ckpt, "-o", engine)
    from nemodiff.runtime.text.tokenizer import EngineTokenizer

    tok = EngineTokenizer(engine)
    ids = tok.encode_chat("hello there")
    assert ids[0] == 1 and ids[1] == tok.token_id("[INST]") and ids[-1] == tok.token_id("[/INST]")
    assert ids.count(1) == 1  # the template's BOS only, no second one from the post-processor


def test_generate_errors_are_clean(tmp_path):
    proc = subprocess.run([str(BIN / "nemodiff"), "generate", str(tmp_path / "nope"), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_every_mode_with_json_stats(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", lora_rank=4)
    engine = tmp_path / "engine"
    run("nemodiff-build", ckpt, "-o", engine, "--dtype", "fp32", "--block-length", "8")
    results = {}
    for mode, extra in [("ar", []), ("diffusion", ["--threshold", "none"]), ("linear-spec", ["--no-draft-lora"]),
                        ("quadratic-spec", ["--block-length", "4"]), ("linear-spec", ["--draft-threshold", "0.5"])]:
        out = json.loads(run("nemodiff", "generate", engine, "--prompt-ids", "1,200,201", "--mode", mode,
                             "--max-new-tokens", "19", "--json", *extra).stdout)
        assert len(out["output_ids"]) == 19 or out["finish_reason"] == "eos"
        results.setdefault(mode, []).append(out)
    assert results["linear-spec"][0]["output_ids"] == results["ar"][0]["output_ids"]
    assert results["linear-spec"][1]["output_ids"] == results["ar"][0]["output_ids"]
    assert results["quadratic-spec"][0]["output_ids"] == results["ar"][0]["output_ids"]
    assert "accepted_length_histogram" in results["quadratic-spec"][0]["stats"]
    assert "denoise_steps_per_block" in results["diffusion"][0]["stats"]
    for mode, outs in results.items():  # every mode carries stats, AR included
        assert outs[0]["stats"]["num_forward_passes"] == outs[0]["num_forward_passes"], mode
        assert outs[0]["stats"]["tokens_per_forward"] == outs[0]["tokens_per_forward"], mode
    proc = subprocess.run([str(BIN / "nemodiff"), "generate", str(engine), "--prompt-ids", "1,2", "--mode",
                           "quadratic-spec", "--block-length", "16"], capture_output=True, text=True)
    assert proc.returncode != 0 and "exceeds the engine's block length 8" in proc.stderr


def test_generate_logprobs_n_and_prefix_cache_flags(engine_fp32):
    prompt = ",".join(str(200 + i) for i in range(24))
    out = json.loads(run("nemodiff", "generate", engine_fp32, "--prompt-ids", prompt, "--max-new-tokens", "5",
                         "--logprobs", "2", "--json").stdout)
    assert out["logprob_source"] == "causal" and len(out["logprobs"]) == len(out["output_ids"]) > 0
    for entry, token in zip(out["logprobs"], out["output_ids"]):
        assert set(entry) == {"token_id", "logprob", "top"} and entry["token_id"] == token
        assert entry["logprob"] <= 0 and len(entry["top"]) == 2
        assert all(isinstance(t, int) and lp <= 0 for t, lp in entry["top"])
        assert entry["top"][0][1] >= entry["top"][1][1] and entry["top"][0][1] >= entry["logprob"] - 1e-6
    assert out["stats"]["cached_prompt_tokens"] == 0
    cached = json.loads(run("nemodiff", "generate", engine_fp32, "--prompt-ids", prompt, "--max-new-tokens", "3",
                            "--n", "2", "--json").stdout)
    assert [c["index"] for c in cached] == [0, 1] and cached[0]["output_ids"] == cached[1]["output_ids"]
    assert cached[1]["stats"]["cached_prompt_tokens"] > 0  # the second choice reused the prompt's pages
    uncached = json.loads(run("nemodiff", "generate", engine_fp32, "--prompt-ids", prompt, "--max-new-tokens", "3",
                              "--n", "2", "--no-prefix-cache", "--json").stdout)
    assert [c["stats"]["cached_prompt_tokens"] for c in uncached] == [0, 0]
    assert uncached[1]["output_ids"] == cached[1]["output_ids"]
