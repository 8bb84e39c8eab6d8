"""nemodiff-build on VLM checkpoints: both weight layouts, the engine's vision file and config,
inspect, and the errors for checkpoints outside the supported layouts."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from helpers import edit_config, edit_weights, make_vlm_checkpoint, read_hf_weights
from nemodiff.builder.cli import main as build_cli
from nemodiff.cli import main as nemodiff_cli
from nemodiff.engine_format import CLIP_MEAN, CLIP_STD


def build(ckpt, out, *args):
    return CliRunner().invoke(build_cli, [str(ckpt), "-o", str(out), *args])


def test_both_layouts_build_the_same_engine_with_its_vision_file(tmp_path):
    engines = {}
    for layout in ("encoder", "language_model"):
        ckpt = make_vlm_checkpoint(tmp_path / layout, layout=layout, num_shards=3)
        assert (ckpt / "model.safetensors.index.json").is_file()
        result = build(ckpt, tmp_path / f"engine-{layout}", "--dtype", "fp32")
        assert result.exit_code == 0, result.output
        assert "vision       Pixtral 2 layers, hidden 32, patch 4, merge 2 -> 64 (vision.safetensors)" in result.output
        engines[layout] = tmp_path / f"engine-{layout}"
    a, b = engines.values()
    for name in ("weights.safetensors", "vision.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    stored = read_hf_weights(tmp_path / "encoder")
    vision = load_file(str(a / "vision.safetensors"))
    prefix = "encoder.vision_tower.transformer.layers.1."
    assert torch.equal(vision["layers.1.qkv"], torch.cat([stored[prefix + f"attention.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(vision["projector.merge"],
                       stored["encoder.multi_modal_projector.patch_merger.merging_layer.weight"])
    assert vision["patch_conv"].shape == (32, 3, 4, 4)
    config = json.loads((a / "config.json").read_text())
    assert config["model"]["image_token_id"] == 10 and config["model"]["eos_token_ids"] == [11]
    assert config["vision"] | {"image_mean": None, "image_std": None} == config["vision"] | {
        "hidden_size": 32, "num_hidden_layers": 2, "patch_size": 4, "spatial_merge_size": 2, "text_hidden_size": 64,
        "longest_edge": 64, "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13,
        "hidden_act": "silu", "projector_hidden_act": "gelu", "feature_layer": -1, "image_mean": None,
        "image_std": None}
    assert "vision.safetensors" in json.loads((a / "manifest.json").read_text())["files"]


def test_inspect_shows_the_vision_tower(tmp_path):
    ckpt = make_vlm_checkpoint(tmp_path / "ckpt")
    assert build(ckpt, tmp_path / "engine", "--dtype", "fp8", "--arch", "h100", "--no-kernels").exit_code == 0
    vision = load_file(str(tmp_path / "engine" / "vision.safetensors"))
    assert {t.dtype for t in vision.values()} == {torch.bfloat16}  # the tower is never quantized
    result = CliRunner().invoke(nemodiff_cli, ["inspect", str(tmp_path / "engine")])
    assert result.exit_code == 0, result.output
    assert ("vision  Pixtral tower 2 layers, hidden 32, heads 2 x 16, patch 4, images up to 64 px; projector 2x2 "
            "merge -> 64; image tokens 10/12/13") in result.output
    assert "vision.safetensors" in result.output
    info = json.loads(CliRunner().invoke(nemodiff_cli, ["inspect", str(tmp_path / "engine"), "--json"]).output)
    assert info["vision"]["num_hidden_layers"] == 2 and info["model"]["image_token_id"] == 10


def _stray(w):
    w["vision_tower.ln_pre.weight"] = w.pop("encoder.vision_tower.ln_pre.weight")


def _drop_merger(w):
    del w["encoder.multi_modal_projector.patch_merger.merging_layer.weight"]


def _bad_conv(w):
    w["encoder.vision_tower.patch_conv.weight"] = torch.zeros(32, 3, 5, 5)


def _unknown(w):
    w["encoder.image_newline"] = torch.zeros(64)


def test_without_preprocessor_config_the_pixtral_defaults_apply(tmp_path):
    ckpt = make_vlm_checkpoint(tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").unlink()
    result = build(ckpt, tmp_path / "engine", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    vision = json.loads((tmp_path / "engine" / "config.json").read_text())["vision"]
    assert vision["image_mean"] == list(CLIP_MEAN) and vision["image_std"] == list(CLIP_STD)
    assert vision["longest_edge"] == 64 and vision["rescale_factor"] == 1 / 255


BROKEN = {
    "tensor outside the layout": (
        lambda c: edit_weights(c, _stray),
        "model.safetensors: unexpected tensor 'vision_tower.ln_pre.weight' (this VLM checkpoint's names follow the "
        "layout encoder.vision_tower.*, encoder.multi_modal_projector.*, encoder.*, diffusion_head.*)"),
    "missing projector tensor": (lambda c: edit_weights(c, _drop_merger),
                                 "missing tensor 'encoder.multi_modal_projector.patch_merger.merging_layer.weight'"),
    "wrong vision shape": (lambda c: edit_weights(c, _bad_conv),
                           "model.safetensors: tensor 'encoder.vision_tower.patch_conv.weight' has shape "
                           "[32, 3, 5, 5], want [32, 3, 4, 4]"),
    "unknown tensor": (lambda c: edit_weights(c, _unknown), "model.safetensors: unexpected tensor 'encoder.image_newline'"),
    "no vision_config": (lambda c: edit_config(c, vision_config=None),
                         "config.json: a VLM config needs a 'vision_config' object"),
    "not pixtral": (lambda c: edit_config(c, vision_config={"model_type": "siglip_vision_model"}),
                    "config.json: vision_config.model_type 'siglip_vision_model' is not supported (want 'pixtral')"),
    "projector bias": (lambda c: edit_config(c, multimodal_projector_bias=True),
                       "config.json: multimodal_projector_bias=true is not supported"),
    "wrong model_type": (lambda c: edit_config(c, model_type="nemotron_labs_diffusion"),
                         "config.json: model_type is 'nemotron_labs_diffusion', expected 'nemotron_labs_diffusion_vlm'"),
    "bad preprocessor": (lambda c: (c / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16})),
                         "preprocessor_config.json: patch_size (16, 16) differs from the vision tower's 4"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_vlm_checkpoint_names_file_and_tensor(case, tmp_path):
    ckpt = make_vlm_checkpoint(tmp_path / "ckpt")
    breaker, message = BROKEN[case]
    breaker(ckpt)
    result = build(ckpt, tmp_path / "engine")
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "engine").exists()


def test_language_model_layout_errors_name_the_stored_tensor(tmp_path):
    ckpt = make_vlm_checkpoint(tmp_path / "ckpt", layout="language_model", num_shards=2)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["language_model.encoder.norm.weight"]
    weights = load_file(str(ckpt / shard))
    weights["language_model.encoder.norm.weight"] = torch.zeros(65)
    save_file(weights, str(ckpt / shard))
    result = build(ckpt, tmp_path / "engine")
    assert f"{shard}: tensor 'language_model.encoder.norm.weight' has shape [65], want [64]" in result.output
    weights["language_model.encoder.norm.weight"] = torch.zeros(64)
    weights["language_model.model.norm.weight"] = torch.zeros(64)  # transformers' name for the same weight
    save_file(weights, str(ckpt / shard))
    result = build(ckpt, tmp_path / "engine")
    assert ("tensors 'language_model.encoder.norm.weight' and 'language_model.model.norm.weight' are the same "
            "weight ('encoder.norm.weight') under two names") in result.output, result.output
    (ckpt / shard).unlink()
    result = build(ckpt, tmp_path / "engine")
    assert f"{shard}: shard listed in model.safetensors.index.json is missing" in result.output


def test_a_text_checkpoint_refuses_vision_tensors(tmp_path):
    from helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    edit_weights(ckpt, lambda w: w.update({"vision_tower.ln_pre.weight": torch.ones(4)}))
    result = build(ckpt, tmp_path / "engine")
    assert "model.safetensors: unexpected tensor 'vision_tower.ln_pre.weight'" in result.output


def test_language_model_layout_also_takes_transformers_text_names(tmp_path):
    ckpt = make_vlm_checkpoint(tmp_path / "ckpt", layout="language_model")
    assert build(ckpt, tmp_path / "nld-names", "--dtype", "fp32").exit_code == 0

    def rename(w):
        for name in list(w):
            if name.startswith("language_model.encoder."):
                w["language_model.model." + name[len("language_model.encoder."):]] = w.pop(name)
        w["language_model.lm_head.weight"] = w.pop("language_model.diffusion_head.weight")

    edit_weights(ckpt, rename)
    result = build(ckpt, tmp_path / "hf-names", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    a = load_file(str(tmp_path / "nld-names" / "weights.safetensors"))
    b = load_file(str(tmp_path / "hf-names" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
