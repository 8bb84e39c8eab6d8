"""Fuzzing the readers of engines and checkpoints (hypothesis, a few seconds each): whatever the bytes, the
answer is the config or one error line that names the file, never another exception, and nothing outside
the directory is opened."""

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemodiff.builder.checkpoint import CheckpointError, read_config
from nemodiff.engine_format import EngineConfig, EngineFormatError, verify_manifest
from nemodiff.runtime.model.loader import check_tensors

# NEMODIFF_FUZZ_EXAMPLES: run longer by hand
FUZZ = settings(max_examples=int(os.environ.get("NEMODIFF_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, prefix + (i,))


@st.composite
def mutated(draw, original):
    """`original` with a few values replaced by arbitrary JSON, removed, or joined by unknown keys."""
    data = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(data, (dict, list)) or not data:
            break
        where = draw(st.sampled_from(list(paths(data))[1:]))
        parent = data
        for step in where[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(JSON)
        elif action == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
    return data


def assert_one_line(exc):
    assert str(exc) and "\n" not in str(exc), repr(exc)


@pytest.fixture(scope="module")
def engine_config(engine_fp32):
    return json.loads((engine_fp32 / "config.json").read_text())


def test_fuzz_engine_config(engine_config):
    @FUZZ
    @given(mutated(engine_config))
    def run(data):
        try:
            EngineConfig.from_dict(data)
        except EngineFormatError as exc:
            assert_one_line(exc)

    run()


def test_fuzz_checkpoint_config(checkpoint, tmp_path):
    original = json.loads((checkpoint / "config.json").read_text())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(checkpoint / "tokenizer.json", ckpt / "tokenizer.json")

    @FUZZ
    @given(mutated(original))
    def run(data):
        (ckpt / "config.json").write_text(json.dumps(data))
        try:
            read_config(ckpt)
        except CheckpointError as exc:
            assert_one_line(exc)
            assert "config.json" in str(exc)

    run()


def test_fuzz_manifest(engine_fp32, tmp_path, monkeypatch):
    engine = shutil.copytree(engine_fp32, tmp_path / "engine")
    original = json.loads((engine / "manifest.json").read_text())
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    names = st.sampled_from(["../x", "/etc/passwd", "a/../b", "kernels/../../y", "./config.json", "x\\y", ""])

    @FUZZ
    @given(mutated(original), st.dictionaries(names, JSON, max_size=2))
    def run(manifest, extra):
        if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
            manifest["files"].update(extra)
        (engine / "manifest.json").write_text(json.dumps(manifest))
        try:
            verify_manifest(engine)
        except EngineFormatError as exc:
            assert_one_line(exc)
        assert all(f.startswith(str(engine)) for f in opened), opened

    run()


def test_fuzz_safetensors_header(engine_fp32, tmp_path):
    from nemodiff.runtime.model.loader import expected_weights

    want = expected_weights(EngineConfig.load(engine_fp32))
    original = (engine_fp32 / "weights.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8:8 + size])
    path = tmp_path / "weights.safetensors"

    @FUZZ
    @given(mutated(header), st.binary(max_size=64), st.booleans())
    def run(new_header, noise, raw):
        body = noise if raw else json.dumps(new_header).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + original[8 + size:])
        try:
            check_tensors(path, want)
        except EngineFormatError as exc:
            assert_one_line(exc)
            assert str(path) in str(exc)

    run()
