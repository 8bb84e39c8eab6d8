"""nemodiff-build on hostile checkpoints: nothing outside the checkpoint is read, absurd sizes are refused before
memory is sized from them, and every config key that changes the math is either computed or refused by name."""

import json
import os
import resource
import subprocess
import sys

import pytest
from click.testing import CliRunner

from helpers import edit_config, make_checkpoint
from nemodiff.builder.cli import main as build_cli


def build(ckpt, out, *args):
    return CliRunner().invoke(build_cli, [str(ckpt), "-o", str(out), "--dtype", "fp32", *map(str, args)])


def refused(ckpt, tmp_path, message, *args):
    out = tmp_path / "engine"
    result = build(ckpt, out, *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".engine")]


@pytest.fixture
def sharded(tmp_path):
    return make_checkpoint(tmp_path / "ckpt", num_shards=2)


def _index(ckpt):
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _point(ckpt, tensor, target):
    index = _index(ckpt)
    index["weight_map"][tensor] = target
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("target, message", [
    ("../../outside/model.safetensors", "'../../outside/model.safetensors' is not a plain relative path"),
    ("/etc/passwd", "'/etc/passwd' is an absolute path"),
])
def test_index_entries_outside_the_checkpoint_are_refused(sharded, tmp_path, target, message):
    outside = tmp_path.parent / "outside"  # what ../../outside names from the checkpoint
    outside.mkdir(exist_ok=True)
    if not (outside / "model.safetensors").exists():
        os.link(sharded / "model-00001-of-00002.safetensors", outside / "model.safetensors")
    _point(sharded, "encoder.norm.weight", target)
    refused(sharded, tmp_path, f"model.safetensors.index.json: {message}")


def test_symlinks_out_of_the_checkpoint_are_refused(sharded, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.rename(outside / shard.name)
    shard.symlink_to(outside / shard.name)
    refused(sharded, tmp_path, f"{shard.name}: resolves to {outside / shard.name}, outside the checkpoint")
    shard.unlink()
    (outside / shard.name).rename(shard)
    (sharded / "generation_config.json").symlink_to("/etc/passwd")
    refused(sharded, tmp_path, "generation_config.json: resolves to /etc/passwd, outside the checkpoint")


def test_links_inside_and_the_hub_cache_layout_build(tmp_path):
    """snapshot_download's folders: snapshots/<rev>/<file> -> ../../blobs/<hash>; and a link inside is fine."""
    repo = tmp_path / "models--nvidia--nld"
    ckpt = make_checkpoint(repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(p for p in ckpt.iterdir() if p.is_file())):
        (file.rename(repo / "blobs" / f"blob{i}"))
        file.symlink_to(f"../../blobs/blob{i}")
    (ckpt / "tokenizer_config.json").unlink()
    (ckpt / "tokenizer_config.json").symlink_to("special_tokens.json")  # a link inside the checkpoint
    (ckpt / "special_tokens.json").write_bytes((repo / "blobs" / "blob3").read_bytes())
    result = build(ckpt, tmp_path / "engine")
    assert result.exit_code == 0, result.output
    assert not any(p.is_symlink() for p in (tmp_path / "engine").iterdir())  # the engine holds copies


def test_absurd_layer_counts_are_refused_before_memory_grows(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    edit_config(ckpt, num_hidden_layers=10**9)
    limit = 2 << 30  # the old builder grew to 22.9 GB on this config
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "from nemodiff.builder.cli import main; sys.argv[1:] = sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt), "-o", str(tmp_path / "e")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "config.json: num_hidden_layers is 1000000000; it must be in [1, 512]" in \
        proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 << 20  # KiB: under 2 GiB


@pytest.mark.parametrize("layers, message", [
    (3, "config.json: num_hidden_layers is 3, but the weights hold 2 layers"),
    (1, "config.json: num_hidden_layers is 1, but the weights hold 2 layers"),
])
def test_layer_count_is_checked_against_the_tensors(tmp_path, layers, message):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    edit_config(ckpt, num_hidden_layers=layers)
    refused(ckpt, tmp_path, message)


MATH = {  # item 9: each built before, its setting silently dropped
    "sliding window": (dict(sliding_window=1024), "sliding_window 1024 is not supported; the runtime implements "
                                                  "null: the runtime attends to the whole context"),
    "layer types": (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    "attention bias": (dict(attention_bias=True), "attention_bias True is not supported"),
    "mlp bias": (dict(mlp_bias=True), "mlp_bias True is not supported"),
    "bias as a string": (dict(attention_bias="false"), "attention_bias 'false' is not supported"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported; the runtime implements 'silu'"),
    "tied": (dict(tie_word_embeddings=True), "tie_word_embeddings True is not supported"),
    "quantized": (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    "softcap": (dict(final_logit_softcapping=30.0), "final_logit_softcapping 30.0 is not supported"),
    "llama3 rope": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e6}),
                    "rope_parameters.rope_type 'llama3' is not supported"),
    "partial rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    "rope partial rotary": (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
                            "rope_parameters.partial_rotary_factor 0.5 is not supported"),
    "head_dim odd": (dict(head_dim=15), "head_dim 15 is odd"),
    "head_dim does not divide": (dict(head_dim=None, hidden_size=66), "no head_dim, and hidden_size 66 is not a "
                                                                      "multiple of num_attention_heads 4"),
    # H10: values of the wrong type are named, not tracebacks
    "string size": (dict(hidden_size="64"), "config.json: hidden_size is '64'; an integer is expected"),
    "float layers": (dict(num_hidden_layers=2.5), "num_hidden_layers is 2.5; an integer is expected"),
    "rope not an object": (dict(rope_parameters=[1]), "rope_parameters is [1]; an object is expected"),
    "eos string": (dict(eos_token_id="</s>"), "eos_token_id is '</s>'; an integer is expected"),
    "huge vocab": (dict(vocab_size=10**12), "vocab_size is 1000000000000; it must be in [1, 1048576]"),
    "config is a list": ("[]", "config.json: not a JSON object"),
}


@pytest.mark.parametrize("case", list(MATH))
def test_config_keys_that_change_the_math_are_refused_by_name(tmp_path, case):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    changes, message = MATH[case]
    if isinstance(changes, str):
        (ckpt / "config.json").write_text(changes)
    else:
        edit_config(ckpt, **changes)
    refused(ckpt, tmp_path, message)


def test_what_does_not_change_the_math_still_builds(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    edit_config(ckpt, sliding_window=None, layer_types=["full_attention"] * 2, attention_bias=False, hidden_act="silu",
                some_future_key=[1, 2], dlm_paradigm="bidirectional", attention_dropout=0.0)
    assert build(ckpt, tmp_path / "a").exit_code == 0
    edit_config(ckpt, sliding_window=4096, max_position_embeddings=4096)  # a window no sequence outgrows
    assert build(ckpt, tmp_path / "b").exit_code == 0


@pytest.mark.parametrize("breaker, message", [
    (lambda c: (c / "tokenizer.json").write_text('{"model": 3}'), "tokenizer.json: not a valid tokenizer"),
    (lambda c: (c / "tokenizer.json").write_bytes((make_checkpoint(c.parent / "big", vocab_size=512) /
                                                   "tokenizer.json").read_bytes()),
     "tokens, more than the model's vocab_size 384"),
    (lambda c: os.truncate(c / "tokenizer.json", 20 * 10**9),  # sparse: nothing is written, nothing may be read
     "tokenizer.json: 20000000000 bytes, over the limit of 134217728 bytes for tokenizer.json"),
    (lambda c: os.truncate(c / "tokenizer_config.json", 2**30), "over the limit of 67108864 bytes"),
    (lambda c: ((c / "chat_template.jinja").write_text("{{ messages }}"), os.truncate(c / "chat_template.jinja", 2**21)),
     "chat_template.jinja: 2097152 bytes, over the limit of 1048576 bytes for chat_template.jinja"),
    (lambda c: (c / "linear_spec_lora" / "adapter_config.json").write_text(json.dumps(
        {"r": 0, "target_modules": ["o_proj"]})), "adapter_config.json: r is 0; it must be in [1, 4096]"),
    (lambda c: (c / "linear_spec_lora" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "target_modules": ["o_proj"], "rank_pattern": {"layers.0": 8}})), "rank_pattern"),
])
def test_tokenizer_and_adapter_are_checked_at_build(tmp_path, breaker, message):
    ckpt = make_checkpoint(tmp_path / "ckpt", lora_rank=4)
    breaker(ckpt)
    refused(ckpt, tmp_path, message)


@pytest.mark.parametrize("args, message", [
    (["--max-batch-size", 10**9], "--max-batch-size 1000000000 must be in [1, 4096]"),
    (["--kv-page-size", 0], "--kv-page-size 0 must be in [1, 4096]"),
])
def test_build_options_the_runtime_would_refuse_stop_the_build(tmp_path, args, message):
    ckpt = make_checkpoint(tmp_path / "ckpt", max_position_embeddings=4096)
    refused(ckpt, tmp_path, message, *args)
