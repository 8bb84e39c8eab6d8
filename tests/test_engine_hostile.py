"""Hostile and broken engine directories: every one refused with one line naming the file and the problem,
before anything is allocated, and nothing outside the engine is opened."""

import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nemodiff.cli import main as nemodiff_cli
from nemodiff.engine_format import EngineFormatError, write_manifest
from nemodiff.runtime.model.loader import check_engine, load_engine
from nemodiff.runtime.text.tokenizer import EngineTokenizer


@pytest.fixture
def engine(engine_fp32, tmp_path):
    return shutil.copytree(engine_fp32, tmp_path / "engine")


def edit(engine, resign=True, **changes):
    """Set config.json keys ("build.tp": 0 sets a nested key; None deletes it), then re-sign the manifest so that
    only the config's content is wrong."""
    config = json.loads((engine / "config.json").read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = config
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    (engine / "config.json").write_text(json.dumps(config))
    if resign:
        write_manifest(engine)


def refused(engine, message):
    with pytest.raises(EngineFormatError) as info:
        check_engine(engine)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    result = CliRunner().invoke(nemodiff_cli, ["inspect", str(engine)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


CONFIGS = {  # H10: each used to raise ZeroDivisionError, KeyError, TypeError or allocate petabytes
    "page size 0": (dict(build__kv_page_size=0), "config.json: build.kv_page_size is 0; it must be in [1, 4096]"),
    "tp 0": (dict(build__tp=0), "build.tp is 0; it must be in [1, 64]"),
    "negative layers": (dict(model__num_hidden_layers=-3), "model.num_hidden_layers is -3"),
    "no KV heads": (dict(model__num_key_value_heads=0), "model.num_key_value_heads is 0"),
    "int4": (dict(build__dtype="int4"), "build.dtype 'int4' is not one of fp32, bf16, fp16, fp8"),
    "string size": (dict(model__hidden_size="64"), "model.hidden_size is '64'; an integer is expected"),
    "bool size": (dict(build__max_batch_size=True), "build.max_batch_size is True; an integer is expected"),
    "unknown key": (dict(build__speed="fast"), "build.speed: unknown key"),
    "missing model": (dict(model=None), "model: missing"),
    "seq len 1e12": (dict(build__max_seq_len=10**12), "build.max_seq_len is 1000000000000"),
    "batch 1e9": (dict(build__max_batch_size=10**9), "build.max_batch_size is 1000000000"),
    "KV pool": (dict(build__max_batch_size=4096, model__max_position_embeddings=1 << 22, build__max_seq_len=1 << 22),
                "the default KV cache"),
    "NaN eps": (dict(model__rms_norm_eps="NaN"), "model.rms_norm_eps is 'NaN'"),
    "rope type": (dict(model__rope__rope_type="llama3"), "model.rope.rope_type 'llama3' is not implemented"),
    "mask id": (dict(model__mask_token_id=10**6), "model.mask_token_id"),
    "kernel outside": (dict(build__arch="h100", build__sm="sm_90a",
                            build__kernels=[{"kernel": "k", "key": "x", "file": "../../etc/passwd"}]),
                       "build.kernels[0].file '../../etc/passwd' is not a file under kernels/sm_90a/"),
    "sm mismatch": (dict(build__sm="sm_100a"), "build.sm 'sm_100a' does not match build.arch 'cpu'"),
    # the config is valid, the weights say otherwise
    "hidden 256": (dict(model__hidden_size=256), "weights.safetensors: tensor 'embed' is F32 [384, 64], "
                                                 "config.json implies F32 [384, 256]"),
    "more layers": (dict(model__num_hidden_layers=5), "weights.safetensors: no tensor 'layers.2.attn_norm' (and 17 more)"),
    "fewer layers": (dict(model__num_hidden_layers=1), "weights.safetensors: unexpected tensor 'layers.1.attn_norm'"),
    "dtype": (dict(build__dtype="bf16"), "tensor 'embed' is F32 [384, 64], config.json implies BF16 [384, 64]"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_engine_config_is_one_line_naming_the_key(engine, case):
    changes, message = CONFIGS[case]
    if "NaN" in case:  # not JSON's: written as Python's json writes float("nan")
        changes = dict(model__rms_norm_eps=float("nan"))
        message = "model.rms_norm_eps is nan; a finite number is expected"
    edit(engine, **changes)
    refused(engine, message)


@pytest.mark.parametrize("content, message", [
    ("[]", "config.json: not an engine config (a JSON object is expected, got list)"),
    ("{oops", "config.json: not valid JSON"),
    ('{"format_version": 2}', "config.json: model: missing"),
])
def test_garbage_config_is_one_line(engine, content, message):
    (engine / "config.json").write_text(content)
    write_manifest(engine)
    refused(engine, message)
    result = CliRunner().invoke(nemodiff_cli, ["inspect", "--no-verify", str(engine)])
    assert result.exit_code == 1 and message in result.output


def test_a_checkpoint_is_named_with_the_build_line_to_run(checkpoint):
    result = CliRunner().invoke(nemodiff_cli, ["inspect", str(checkpoint)])
    assert result.exit_code == 1
    assert ("this is a Hugging Face checkpoint (NemotronLabsDiffusionModel), not a nemodiff engine; build an "
            f"engine from it first: nemodiff-build {checkpoint} -o {checkpoint}-engine") in result.output
    assert "format version" not in result.output


# -- H8: the manifest protects the engine ----------------------------------------------------------------
def manifest_of(engine):
    return json.loads((engine / "manifest.json").read_text())


def set_manifest(engine, manifest):
    (engine / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry", ["../../outside/secret.txt", "/etc/passwd", "a/./b", "", "c:\\x", "x//y"])
def test_entries_outside_the_engine_are_refused_before_anything_is_opened(engine, entry, tmp_path, monkeypatch):
    manifest = manifest_of(engine)
    manifest["files"][entry] = {"sha256": "0" * 64, "bytes": 1}
    set_manifest(engine, manifest)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(EngineFormatError, match="manifest.json: entry .* an engine lists its own files only"):
        check_engine(engine)
    assert opened and all(f.startswith(str(engine)) for f in opened)  # manifest.json only


@pytest.mark.parametrize("drop", ["weights.safetensors", "config.json", "tokenizer.json", "all"])
def test_a_manifest_must_list_what_the_engine_needs(engine, drop):
    manifest = manifest_of(engine)
    if drop == "all":
        manifest["files"] = {}
    else:
        del manifest["files"][drop]
    set_manifest(engine, manifest)
    data = bytearray((engine / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF  # corrupt weights may not load in silence
    (engine / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(EngineFormatError, match="manifest.json: does not list .*rebuild the engine"):
        load_engine(engine, device="cpu")


def test_unlisted_files_the_runtime_reads_are_refused(engine):
    (engine / "chat_template.jinja").write_text("{{ 'pwned' }}")
    refused(engine, "chat_template.jinja: not listed in manifest.json")
    (engine / "chat_template.jinja").unlink()
    (engine / "kernels" / "sm_90a").mkdir(parents=True)
    (engine / "kernels" / "sm_90a" / "kernels.json").write_text("{}")
    refused(engine, "kernels/sm_90a/kernels.json: not listed in manifest.json")
    shutil.rmtree(engine / "kernels")
    (engine / "README.txt").write_text("notes")  # never read: tolerated
    check_engine(engine)


def test_symlinks_are_refused(engine, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text((engine / "tokenizer_config.json").read_text())
    (engine / "tokenizer_config.json").unlink()
    (engine / "tokenizer_config.json").symlink_to(outside)
    refused(engine, "tokenizer_config.json: is a symbolic link; an engine holds plain files only")
    with pytest.raises(EngineFormatError, match="symbolic link"):
        EngineTokenizer(engine)


def test_corrupt_header_and_tokenizer_name_their_file(engine):
    weights = engine / "weights.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    write_manifest(engine)
    refused(engine, "weights.safetensors: unreadable safetensors file")
    (engine / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(EngineFormatError, match=r"tokenizer.json: not a valid tokenizer \("):
        EngineTokenizer(engine)


@pytest.mark.parametrize("name, size, limit", [("tokenizer.json", 20 * 10**9, 128 << 20),
                                               ("chat_template.jinja", 2 << 20, 1 << 20)])
def test_oversized_files_are_refused_before_they_are_read_or_hashed(engine, name, size, limit):
    if not (engine / name).exists():
        (engine / name).write_text("{{ messages }}")
        os.truncate(engine / name, size)
        write_manifest(engine)
    os.truncate(engine / name, size)  # sparse: reading or hashing 20 GB would take minutes
    refused(engine, f"{name}: {size} bytes, over the limit of {limit} bytes for {name}")
    with pytest.raises(EngineFormatError, match=f"{name}: {size} bytes, over the limit of {limit} bytes"):
        EngineTokenizer(engine)


def test_inspect_reads_the_tokenizer_as_serve_does(engine):
    (engine / "tokenizer.json").write_text('{"model": 3}')
    write_manifest(engine)  # its hash matches: only reading it shows it is broken
    result = CliRunner().invoke(nemodiff_cli, ["inspect", str(engine)])
    assert result.exit_code == 1 and "tokenizer.json: not a valid tokenizer (" in result.output, result.output
    assert "Traceback" not in result.output


def test_tokenizer_larger_than_the_vocabulary_is_refused(engine):
    with pytest.raises(EngineFormatError, match="tokenizer.json: the tokenizer has .* tokens, more than the model's "
                                                "vocab_size 100"):
        EngineTokenizer(engine, vocab_size=100)


def test_a_renamed_weight_is_an_unexpected_tensor(engine):
    weights = load_file(str(engine / "weights.safetensors"))
    weights["layers.0.extra"] = weights.pop("layers.0.o")
    save_file(weights, str(engine / "weights.safetensors"))
    write_manifest(engine)
    refused(engine, "weights.safetensors: no tensor 'layers.0.o'")


@pytest.mark.parametrize("template, message", [
    ("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}", "took more than 0.5 s"),
    ("{% for a in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output passed 1048584 characters"),
    ("{{ 'x' * 10**10 }}", "repeats a sequence to more than 2**20 items"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "took more than 32 MiB of memory"),
])
def test_a_chat_template_is_bounded_in_time_memory_and_output(engine, monkeypatch, template, message):
    import nemodiff.runtime.text.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "TEMPLATE_TIME_S", 0.5)
    monkeypatch.setattr(tokenizer, "TEMPLATE_MEMORY_BYTES", 32 << 20)
    (engine / "chat_template.jinja").write_text(template)
    write_manifest(engine)
    with pytest.raises(Exception, match=re.escape(message)):
        EngineTokenizer(engine).apply_chat_template([{"role": "user", "content": "hi"}])
