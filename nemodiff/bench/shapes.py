"""Named model shapes and random weights built directly on the device, for benchmarks.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: random models at named shapes]

`nemodiff bench --shape nld-8b` needs no checkpoint: the weights are random tensors in
the runtime layout, made on the target device, and the Hugging Face baseline shares them
(its q/k/v and gate/up weights are views into our fused tensors).
"""

from __future__ import annotations

import torch

from nemodiff.device import Platform, as_platform
from nemodiff.engine_format import ModelConfig, RopeConfig
from nemodiff.runtime.model.transformer import TORCH_DTYPES, Model

# The released geometries (vocab 131072, bos 1, eos 11, mask 100, block 32, YaRN factor 16 over an
# original 16384 positions). In the 3B and 14B, heads x head_dim (4096) differs from the hidden size.
NLD_ROPE = dict(rope_type="yarn", factor=16.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                original_max_position_embeddings=16384, llama_4_scaling_beta=0.1)
SHAPES = {
    "nld-3b": dict(hidden_size=3072, intermediate_size=9216, num_hidden_layers=26, rope_theta=1e6),
    "nld-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34, rope_theta=1e6),
    "nld-14b": dict(hidden_size=5120, intermediate_size=16384, num_hidden_layers=40, rope_theta=1e9),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=2048, rope_theta=1e6),
    # the test checkpoints' geometry (nemodiff/builder/random_checkpoint.py) in one layer: the CPU dry run of the GPU
    # device script interprets every kernel, and shares its compiled variants with the test suite's
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=384, rope_theta=1e6),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    values = dict(vocab_size=131072, num_attention_heads=32, num_key_value_heads=8, head_dim=128) | SHAPES[name]
    rope = RopeConfig(rope_theta=values.pop("rope_theta"), **NLD_ROPE)
    return ModelConfig(rms_norm_eps=1e-5, max_position_embeddings=262144, block_size=32, mask_token_id=100,
                       bos_token_id=1, eos_token_ids=[11], rope=rope, **values)


def random_model(config: ModelConfig, dtype: str, device: torch.device | Platform, seed: int = 0, tp_rank: int = 0,
                 tp_size: int = 1) -> tuple[Model, dict]:
    """A Model with random weights of `config`; returns it and the plain (unquantized) tensors.

    Every tensor is drawn on the device by a generator that lives there, and fp8 weights are quantized
    there: nothing is built in host memory first (8.49 B parameters would take 34 GB as float32).
    `device` may be a Platform (the emulated GPU path of aot-check). With tp_size > 1 the weights have
    the shapes of rank tp_rank's tensor-parallel shard (their values are not slices of one model: the
    benchmark times shapes, not outputs)."""
    from nemodiff.builder.convert import quantize_fp8
    from nemodiff.sharding import check_tp, shard_bounds

    check_tp(config.num_attention_heads, config.num_key_value_heads, tp_size)
    platform = as_platform(device)
    device = platform.device
    gen = torch.Generator(device=device).manual_seed(seed + tp_rank)
    plain = TORCH_DTYPES[dtype]

    def share(total: int) -> int:
        a, b = shard_bounds(total, tp_rank, tp_size)
        return b - a

    h, i, v = config.hidden_size, share(config.intermediate_size), share(config.vocab_size)
    q_out = config.num_attention_heads // tp_size * config.head_dim
    kv_out = config.num_key_value_heads // tp_size * config.head_dim

    def rand(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(plain)

    weights = {"embed": rand(config.vocab_size, h, std=1.0), "final_norm": 1 + rand(h, std=0.05), "head": rand(v, h, std=h ** -0.5)}
    for layer in range(config.num_hidden_layers):
        p = f"layers.{layer}."
        weights |= {p + "attn_norm": 1 + rand(h, std=0.05), p + "mlp_norm": 1 + rand(h, std=0.05),
                    p + "qkv": rand(q_out + 2 * kv_out, h, std=h ** -0.5), p + "o": rand(h, q_out, std=q_out ** -0.5),
                    p + "gate_up": rand(2 * i, h, std=h ** -0.5), p + "down": rand(h, i, std=i ** -0.5)}
    runtime = dict(weights)
    if dtype == "fp8":
        for name in [n for n in weights if n.endswith(("qkv", ".o", "gate_up", "down"))]:
            runtime[name], runtime[name + ".scale"] = quantize_fp8(weights[name])  # on the device
    return Model(config, runtime, plain, platform, tp_size=tp_size), weights


def transformers_baseline(config: ModelConfig, weights: dict, device: torch.device):
    """transformers' Ministral3ForCausalLM sharing the benchmark weights (None if unavailable)."""
    try:
        from transformers import Ministral3Config, Ministral3ForCausalLM
    except ImportError:
        return None
    rope = config.rope
    hf_config = Ministral3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "yarn", "rope_theta": rope.rope_theta, "factor": rope.factor,
                         "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow, "mscale": rope.mscale,
                         "mscale_all_dim": rope.mscale_all_dim,
                         "original_max_position_embeddings": rope.original_max_position_embeddings,
                         "llama_4_scaling_beta": rope.llama_4_scaling_beta})
    with torch.device("meta"):
        model = Ministral3ForCausalLM(hf_config)
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    state = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["final_norm"],
             "lm_head.weight": weights["head"]}
    for layer in range(config.num_hidden_layers):
        src, dst = f"layers.{layer}.", f"model.layers.{layer}."
        q, k, v = weights[src + "qkv"].split([q_out, kv_out, kv_out])
        gate, up = weights[src + "gate_up"].chunk(2)
        state |= {dst + "input_layernorm.weight": weights[src + "attn_norm"],
                  dst + "post_attention_layernorm.weight": weights[src + "mlp_norm"],
                  dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                  dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": weights[src + "o"],
                  dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                  dst + "mlp.down_proj.weight": weights[src + "down"]}
    model.load_state_dict(state, assign=True, strict=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config).to(device)  # its buffers were on meta
    return model.eval()


def worker_model(device: torch.device, rank: int, size: int, name: str, dtype: str, seed: int = 0,
                 kernels: str = "off", kernel_dir: str | None = None, sm: str | None = None):
    """A tensor-parallel worker's shard of the random `name` model (the factory `bench.steps` names), with
    the kernels rank 0 resolved: for aot/aot-check the folder rank 0 compiled this rank's geometry into."""
    from nemodiff.builder.build import rank_config

    from .kernels import kernel_platform, shape_kernels

    config = shape_config(name)
    platform = kernel_platform(device, kernels, sm)
    model = random_model(config, dtype, platform, seed=seed, tp_rank=rank, tp_size=size)[0]
    model.kernels = shape_kernels(rank_config(config, size), dtype, platform, kernels, kernel_dir)[0]
    return model
