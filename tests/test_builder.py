"""nemodiff-build: conversion, atomic output, manifest, and every malformed-checkpoint error."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import edit_config, edit_weights, make_checkpoint
from nemodiff.builder.cli import main as build_cli
from nemodiff.engine_format import EngineFormatError
from nemodiff.runtime.model.loader import load_engine
from nemodiff.runtime.model.segments import Segment


def run_build(args):
    return CliRunner().invoke(build_cli, [str(a) for a in args])


def _remove_head(w):
    del w["diffusion_head.weight"]


def _nan(w):
    w["encoder.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")


def _reshape(w):
    w["encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)


def _extra(w):
    w["encoder.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)


MALFORMED = {
    "missing config": (lambda c: (c / "config.json").unlink(), "config.json: file not found"),
    "bad json": (lambda c: (c / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    "wrong architectures": (lambda c: edit_config(c, architectures=["LlamaForCausalLM"]),
                            "config.json: architectures is ['LlamaForCausalLM'], expected ['NemotronLabsDiffusionModel']"),
    "wrong model_type": (lambda c: edit_config(c, model_type="llama"),
                         "config.json: model_type is 'llama', expected 'nemotron_labs_diffusion'"),
    "missing tensor": (lambda c: edit_weights(c, _remove_head), "missing tensor 'diffusion_head.weight'"),
    "unexpected tensor": (lambda c: edit_weights(c, _extra),
                          "model.safetensors: unexpected tensor 'encoder.layers.0.self_attn.rotary_emb.inv_freq'"),
    "wrong shape": (lambda c: edit_weights(c, _reshape),
                    "model.safetensors: tensor 'encoder.layers.0.self_attn.k_proj.weight' has shape [16, 64], want [32, 64]"),
    "non-finite": (lambda c: edit_weights(c, _nan),
                   "model.safetensors: tensor 'encoder.layers.1.mlp.up_proj.weight' has 1 non-finite values"),
    "unreadable safetensors": (lambda c: (c / "model.safetensors").write_bytes(b"\x00garbage" * 10),
                               "model.safetensors: unreadable safetensors file"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no model.safetensors or model.safetensors.index.json"),
    "no tokenizer": (lambda c: (c / "tokenizer.json").unlink(), "tokenizer.json: file not found"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_names_file_and_problem(case, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    breaker, message = MALFORMED[case]
    breaker(ckpt)
    out = tmp_path / "engine"
    result = run_build([ckpt, "-o", out])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no half-written temp dir either


def test_missing_shard_is_named(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", num_shards=3)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    result = run_build([ckpt, "-o", tmp_path / "engine"])
    assert result.exit_code != 0 and "model-00002-of-00003.safetensors: shard listed" in result.output


def test_user_error_exits_nonzero_without_traceback_in_a_real_process(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    edit_config(ckpt, model_type="llama")
    proc = subprocess.run([sys.executable, "-m", "nemodiff.builder.cli", str(ckpt), "-o", str(tmp_path / "e")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Error:" in proc.stderr and "Traceback" not in proc.stderr


def test_fp8_is_refused_for_a100(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    result = run_build([ckpt, "-o", tmp_path / "engine", "--dtype", "fp8", "--arch", "a100"])
    assert result.exit_code != 0
    assert "--dtype fp8 is not supported on --arch a100" in result.output and "no fp8" in result.output
    assert not (tmp_path / "engine").exists()


def test_sharded_checkpoint_and_extra_keys_build_the_same_engine(tmp_path):
    single = make_checkpoint(tmp_path / "single", seed=4)
    sharded = make_checkpoint(tmp_path / "sharded", seed=4, num_shards=3)
    edit_config(sharded, some_future_key={"nested": True}, quantization_hint="none")
    for ckpt in (single, sharded):
        result = run_build([ckpt, "-o", tmp_path / f"eng-{ckpt.name}", "--dtype", "fp32"])
        assert result.exit_code == 0, result.output
        assert f"built engine: {tmp_path / f'eng-{ckpt.name}'}" in result.output
    a = load_file(str(tmp_path / "eng-single" / "weights.safetensors"))
    b = load_file(str(tmp_path / "eng-sharded" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_layout_and_summary(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", lora_rank=4)
    out = tmp_path / "engine"
    result = run_build([ckpt, "-o", out, "--dtype", "bf16", "--arch", "h200", "--block-length", "16",
                        "--max-seq-len", "512", "--kv-page-size", "8"])
    assert result.exit_code == 0, result.output
    for word in ("parameters", "bf16", "h200 (sm_90a)", "block length 16", "draft LoRA   yes (r=4)",
                 "compiled for sm_90a"):
        assert word in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "draft_lora.safetensors", "kernels", "manifest.json", "tokenizer.json",
                     "tokenizer_config.json", "weights.safetensors"]
    assert (out / "kernels" / "sm_90a" / "kernels.json").is_file()  # compiled for the H200 target
    manifest = json.loads((out / "manifest.json").read_text())
    assert "kernels/sm_90a/kernels.json" in manifest["files"]
    config = json.loads((out / "config.json").read_text())
    assert config["build"]["arch"] == "h200" and config["build"]["sm"] == "sm_90a"
    assert config["build"]["block_length"] == 16 and config["build"]["lora"]["rank"] == 4
    weights = load_file(str(out / "weights.safetensors"))
    assert weights["layers.0.qkv"].shape == (64 + 32 + 32, 64) and weights["layers.0.qkv"].dtype == torch.bfloat16
    assert weights["layers.0.gate_up"].shape == (256, 64)


def test_existing_output_needs_overwrite(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "engine"
    assert run_build([ckpt, "-o", out]).exit_code == 0
    result = run_build([ckpt, "-o", out, "--dtype", "fp32"])
    assert result.exit_code != 0 and "exists and is not empty" in result.output
    assert json.loads((out / "config.json").read_text())["build"]["dtype"] == "bf16"  # untouched
    assert run_build([ckpt, "-o", out, "--dtype", "fp32", "--overwrite"]).exit_code == 0
    assert json.loads((out / "config.json").read_text())["build"]["dtype"] == "fp32"


def test_manifest_detects_tampering(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "engine"
    assert run_build([ckpt, "-o", out]).exit_code == 0
    load_engine(out, device="cpu")
    data = bytearray((out / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(EngineFormatError, match="weights.safetensors: contents do not match manifest.json"):
        load_engine(out, device="cpu")
    (out / "tokenizer.json").unlink()
    with pytest.raises(EngineFormatError, match="tokenizer.json: listed in manifest.json but missing"):
        load_engine(out, device="cpu")


def test_fp8_engine_stores_e4m3_with_channel_scales_and_runs_on_cpu(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "engine"
    assert run_build([ckpt, "-o", out, "--dtype", "fp8", "--arch", "h100"]).exit_code == 0
    weights = load_file(str(out / "weights.safetensors"))
    assert weights["layers.0.qkv"].dtype == torch.float8_e4m3fn
    assert weights["layers.0.qkv.scale"].shape == (128,) and weights["layers.0.qkv.scale"].dtype == torch.float32
    assert weights["embed"].dtype == torch.bfloat16 and weights["head"].dtype == torch.bfloat16
    model = load_engine(out, device="cpu").model
    logits = model.forward([Segment(0, [1, 2, 3], [0, 1, 2], 0)])[0]
    assert torch.isfinite(logits).all()
