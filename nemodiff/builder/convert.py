"""Converting checkpoint tensors into the runtime's weight layout and dtype.

checkpoint ──[builder: convert]──▶ engine dir ──runtime──▶ Triton

Fuses q/k/v and gate/up, casts to the engine dtype, and for fp8 quantizes every linear
layer to e4m3 with one float32 scale per output channel (embedding, norms and the head
stay bf16). A VLM's vision tower and projector go to their own file, in the plain dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from nemodiff.engine_format import ModelConfig

from .checkpoint import Checkpoint, check_finite

FP8_MAX = 448.0  # largest finite float8_e4m3fn
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric e4m3: returns (weight_fp8 [out, in], scale float32 [out])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    quantized = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def _linear(name: str, weight: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "fp8":
        quantized, scale = quantize_fp8(weight)
        return {name: quantized, name + ".scale": scale}
    return {name: weight.to(STORAGE_DTYPES[dtype]).contiguous()}


def convert_weights(checkpoint: Checkpoint, dtype: str,
                    on_layer: Callable[[int], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yields the runtime tensors in groups (globals first, then one group per layer)."""
    config: ModelConfig = checkpoint.config
    plain = STORAGE_DTYPES[dtype]

    def read(name: str) -> torch.Tensor:
        tensor = checkpoint.read(name)
        check_finite(checkpoint.stored_name(name), tensor, checkpoint.weight_files[name])
        return tensor

    yield {
        "embed": read("encoder.embed_tokens.weight").to(plain).contiguous(),
        "final_norm": read("encoder.norm.weight").to(plain).contiguous(),
        # The head is as large as the embedding and sensitive to quantization: it stays plain.
        "head": read("diffusion_head.weight").to(plain).contiguous(),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        qkv = torch.cat([read(src + f"self_attn.{p}_proj.weight") for p in "qkv"], dim=0)
        gate_up = torch.cat([read(src + f"mlp.{p}_proj.weight") for p in ("gate", "up")], dim=0)
        group = {
            dst + "attn_norm": read(src + "input_layernorm.weight").to(plain).contiguous(),
            dst + "mlp_norm": read(src + "post_attention_layernorm.weight").to(plain).contiguous(),
        }
        group |= _linear(dst + "qkv", qkv, dtype)
        group |= _linear(dst + "o", read(src + "self_attn.o_proj.weight"), dtype)
        group |= _linear(dst + "gate_up", gate_up, dtype)
        group |= _linear(dst + "down", read(src + "mlp.down_proj.weight"), dtype)
        yield group
        if on_layer:
            on_layer(i)


def convert_lora(layers: dict[int, tuple[torch.Tensor, torch.Tensor]], dtype: str) -> dict[str, torch.Tensor]:
    """Draft adapter in runtime names; kept in the activation dtype (it is small)."""
    plain = STORAGE_DTYPES[dtype]
    out = {}
    for i, (a, b) in sorted(layers.items()):
        out[f"layers.{i}.lora_a"] = a.to(plain).contiguous()
        out[f"layers.{i}.lora_b"] = b.to(plain).contiguous()
    return out


def convert_vision_weights(checkpoint: Checkpoint, dtype: str) -> dict[str, torch.Tensor]:
    """The Pixtral tower and the projector in runtime names (vision.safetensors); never quantized."""
    vision = checkpoint.vision
    plain = STORAGE_DTYPES[dtype]

    def read(name: str) -> torch.Tensor:
        tensor = checkpoint.read(name)
        check_finite(checkpoint.stored_name(name), tensor, checkpoint.weight_files[name])
        return tensor

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(plain).contiguous()

    out = {"patch_conv": cast(read("vision_tower.patch_conv.weight")),
           "ln_pre": cast(read("vision_tower.ln_pre.weight"))}
    for i in range(vision.num_hidden_layers):
        src, dst = f"vision_tower.transformer.layers.{i}.", f"layers.{i}."
        out |= {
            dst + "attn_norm": cast(read(src + "attention_norm.weight")),
            dst + "qkv": cast(torch.cat([read(src + f"attention.{p}_proj.weight") for p in "qkv"])),
            dst + "o": cast(read(src + "attention.o_proj.weight")),
            dst + "ffn_norm": cast(read(src + "ffn_norm.weight")),
            dst + "gate_up": cast(torch.cat([read(src + f"feed_forward.{p}_proj.weight") for p in ("gate", "up")])),
            dst + "down": cast(read(src + "feed_forward.down_proj.weight")),
        }
    src = "multi_modal_projector."
    return out | {
        "projector.norm": cast(read(src + "norm.weight")),
        "projector.merge": cast(read(src + "patch_merger.merging_layer.weight")),
        "projector.linear_1": cast(read(src + "linear_1.weight")),
        "projector.linear_2": cast(read(src + "linear_2.weight")),
    }
