"""The NLD transformer forward over a ragged batch of segments (docs/design.md §3–4).

checkpoint ──builder──▶ engine dir ──[runtime: model]──▶ Triton

All tokens of all segments run through the projections and MLPs together; attention runs
per segment against that request's paged KV prefix. Tokens with a KV slot store their K/V
there. The draft adapter (LoRA on o_proj) is added only for segments with `use_lora`. A
segment's `image_embeds` replace the token embeddings at its image-token positions (VLM
prefill). The head runs only on the rows a step asks for.

Two paths compute the same function: the PyTorch reference path (any device) and the kernel
path (`nemodiff/plugins/`: fused add + norm, paged attention fused with RoPE and the KV-cache write, SiLU
gate, the project's GEMM for every bf16/fp16/fp8 linear and the head; eight launches per layer
counting the GEMMs), used when the model
holds a `KernelLibrary` — compiled kernels on a GPU, or the Triton interpreter on the CPU for
verification.

Tensor parallelism (`tp_size` > 1): the model holds one rank's shard (nemodiff/builder/shard.py) — its
query and KV heads, its slice of the MLP and of the vocabulary. Each row-parallel product
(o with the draft adapter, down) is a partial sum followed by one all-reduce; the head's
vocabulary slices are gathered on rank 0, the only rank that returns logits. `driver` is
set on rank 0 only: it sends each step to the other ranks before rank 0 runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemodiff.device import Platform, as_platform
from nemodiff.engine_format import ModelConfig
from nemodiff.plugins.reference import apply_rotary, rms_norm

from .attention import equal_segments_attention, segment_attention
from .batch import BatchBuilder, ForwardBatch
from .kernel_meta import KernelMeta
from .kv_cache import PagedKVCache
from .layers import KERNEL_DTYPES, make_linear
from .rope import RotaryEmbedding
from .segments import Segment

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: object
    o: object
    mlp_norm: torch.Tensor
    gate_up: object
    down: object
    lora_a: torch.Tensor | None = None  # [r, q_out]
    lora_b: torch.Tensor | None = None  # [hidden, r], pre-multiplied by alpha / r


class Model:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str | Platform = "cpu", lora: dict[str, torch.Tensor] | None = None,
                 lora_scale: float = 1.0, kernels=None, tp_size: int = 1):
        self.config = config
        self.tp_size = tp_size
        self.num_heads = config.num_attention_heads // tp_size  # this rank's query / KV heads
        self.num_kv_heads = config.num_key_value_heads // tp_size
        self.rank_config = config if tp_size == 1 else dataclasses.replace(  # the geometry this rank runs
            config, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads)
        self.tp = None  # a TensorParallel (the collectives) once the ranks are connected
        self.driver = None  # rank 0 of a tensor-parallel group: sends each step to the workers
        self.kernels = kernels  # a plugins.ops.KernelLibrary, or None for the reference path
        self.graphs = None  # a GraphRunner once CUDA graphs are captured
        self.dtype = dtype
        self.platform = as_platform(device)  # a plain device: the reference path
        self.device = self.platform.device
        self.embed = weights["embed"].to(self.device, dtype)
        self.final_norm = weights["final_norm"].to(self.device, dtype)
        self.head = make_linear(weights, "head", dtype, self.device)
        if tp_size > 1:  # vocabulary slices padded to one size, so that they gather as one tensor
            padded = -(-config.vocab_size // tp_size)
            self.head.weight = F.pad(self.head.weight, (0, 0, 0, padded - self.head.weight.shape[0]))
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, self.device)
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"layers.{i}."
            layer = LayerWeights(
                attn_norm=weights[p + "attn_norm"].to(self.device, dtype),
                qkv=make_linear(weights, p + "qkv", dtype, self.device),
                o=make_linear(weights, p + "o", dtype, self.device),
                mlp_norm=weights[p + "mlp_norm"].to(self.device, dtype),
                gate_up=make_linear(weights, p + "gate_up", dtype, self.device),
                down=make_linear(weights, p + "down", dtype, self.device),
            )
            if lora is not None:
                layer.lora_a = lora[p + "lora_a"].to(self.device, dtype)
                layer.lora_b = (lora[p + "lora_b"].float() * lora_scale).to(self.device, dtype)
            self.layers.append(layer)
        self.has_lora = lora is not None
        self.builder = BatchBuilder(self.platform, config.image_token_id)
        self.meta = KernelMeta(self.platform, self.rank_config)  # the attention kernels' metadata

    # -- entry points ------------------------------------------------------------------------
    @property
    def kernels(self):
        return self._kernels

    @kernels.setter
    def kernels(self, library) -> None:
        """The forward keeps no kernel output past the next call of its shape: the library's call plans are
        on (nemodiff/plugins/ops.py), whether it came with the model or was set later (benchmarks)."""
        self._kernels = library
        if library is not None:
            library.reuse_outputs = True

    def plan_bytes_per_token(self) -> int:
        """Bytes of one token's kernel outputs in a layer (the norm, qkv, attention, o, gate/up, SiLU, down):
        what the call plans of a step shape hold per token (every layer's calls share their plans)."""
        layer, width = self.layers[0], self.config.hidden_size
        outputs = (2 * width + layer.qkv.weight.shape[0] + self.num_heads * self.config.head_dim
                   + layer.o.weight.shape[0] + layer.gate_up.weight.shape[0] * 3 // 2 + layer.down.weight.shape[0])
        return outputs * torch.empty((), dtype=self.dtype).element_size()

    @torch.inference_mode()
    def forward(self, segments: list[Segment], cache: PagedKVCache | None = None) -> list[torch.Tensor]:
        """Run all segments in one pass; returns per segment float32 logits [rows, vocab]."""
        batch = self.build_batch(segments, cache)
        return list(self.run(batch, cache).split(batch.logit_counts))

    def build_batch(self, segments: list[Segment], cache: PagedKVCache | None) -> ForwardBatch:
        """The segments packed for one forward; the attention kernels' metadata on the device only when
        they will read it (this model runs kernels or replays graphs)."""
        kernel_meta = self.uses_kernels(cache) or self.graphs is not None
        return self.builder.build(segments, cache, kernel_meta)

    def run(self, batch: ForwardBatch, cache: PagedKVCache | None) -> torch.Tensor:
        """Float32 logits of the batch's logit rows, [R, vocab]: a graph replay when one fits.

        Under tensor parallelism rank 0 first sends the step to the other ranks (which run it
        with this same method) and returns the logits; the other ranks return None."""
        if not torch.is_inference_mode_enabled():  # the engine's step is already in it: no second context
            with torch.inference_mode():
                return self.run(batch, cache)
        if self.driver is not None:
            return self.driver.run_step(batch, cache, self._run_shard)
        return self._run_shard(batch, cache)

    def _run_shard(self, batch: ForwardBatch, cache: PagedKVCache | None) -> torch.Tensor | None:
        if cache is not None:
            cache.sync_tables()
        if self.graphs is not None and cache is self.graphs.cache:
            replayed = self.graphs.try_replay(batch)
            if replayed is not None:
                return replayed
        meta = self.attention_meta(batch, cache) if self.uses_kernels(cache) else None
        return self._run(batch, cache, meta)

    def uses_kernels(self, cache: PagedKVCache | None) -> bool:
        return self.kernels is not None and cache is not None

    def attention_meta(self, batch: ForwardBatch, cache: PagedKVCache, num_splits: int | None = None):
        return self.meta.attention(batch, cache, num_splits)

    # -- layers ------------------------------------------------------------------------------
    def _add_norm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                  meta) -> torch.Tensor:
        """residual += delta; return RMSNorm(residual) (one fused kernel on the kernel path)."""
        if meta is not None:
            return self.kernels.add_rmsnorm(residual, delta, weight, self.config.rms_norm_eps)
        if delta is not None:
            residual.add_(delta)
        return rms_norm(residual, weight, self.config.rms_norm_eps)

    def _attention(self, index: int, qkv: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache | None, meta,
                   rope) -> torch.Tensor:
        """RoPE, query scale, the KV-cache write of the tokens that write, and attention -> [T, Hq * D].

        On the kernel path all of it is one launch: the kernel rotates q and k as it reads them from
        qkv, stores k/v at each token's slot (-1: none) and merges its KV splits itself."""
        hq, hkv, hd = self.num_heads, self.num_kv_heads, self.config.head_dim
        num_tokens = qkv.shape[0]
        if meta is not None:
            return self.kernels.segment_attention(qkv, batch.positions, batch.token_slots, self.rotary, cache.k[index],
                                                  cache.v[index], meta, hd ** -0.5, hq, hkv, hd).view(num_tokens,
                                                                                                      hq * hd)
        cos, sin, q_scale = rope
        q, k, v = qkv.split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        q = apply_rotary(q.reshape(num_tokens, hq, hd), cos, sin) * q_scale
        k = apply_rotary(k.reshape(num_tokens, hkv, hd), cos, sin)
        v = v.reshape(num_tokens, hkv, hd).contiguous()
        if batch.write_rows.numel():
            cache.k[index, batch.write_slots] = k[batch.write_rows]
            cache.v[index, batch.write_slots] = v[batch.write_rows]
        attn = torch.empty(num_tokens, hq * hd, dtype=self.dtype, device=self.device)
        groups, alone = batch.extras["attention_groups"]
        for rows, slots, visible, intra in groups:  # segments of one shape: one batched call each
            if rows is None:  # the whole batch
                return equal_segments_attention(q, k, v, cache.k[index, slots], cache.v[index, slots], visible, intra)
            attn[rows] = equal_segments_attention(q[rows], k[rows], v[rows], cache.k[index, slots],
                                                  cache.v[index, slots], visible, intra)
        for s in alone:
            a, b = batch.bounds[s]
            pk = pv = None
            if batch.prefix_lens[s]:
                slots = batch.extras["prefix_slots"][s]
                pk, pv = cache.k[index, slots], cache.v[index, slots]
            attn[a:b] = segment_attention(q[a:b], k[a:b], v[a:b], pk, pv, _intra_mask(batch, s, self.device))
        return attn

    def _run(self, batch: ForwardBatch, cache: PagedKVCache | None, meta) -> torch.Tensor:
        cfg = self.config
        residual = self.embed[batch.ids]
        if batch.image_rows is not None:
            residual[batch.image_rows] = batch.image_embeds.to(self.dtype)
        rope = None
        if meta is None:
            cos, sin = self.rotary.cos_sin(batch.positions, self.dtype)
            rope = (cos, sin, self.rotary.query_scale(batch.positions).to(self.dtype)[:, None, None])
            if cache is not None:
                groups, alone = attention_groups(batch, cache)
                batch.extras["attention_groups"] = (groups, alone)
                batch.extras["prefix_slots"] = {s: cache.prefix_slots(batch.table_rows[s], batch.prefix_lens[s])
                                                for s in alone if batch.prefix_lens[s]}
            else:
                batch.extras["attention_groups"] = ([], range(batch.num_segments))
        kernels = self.kernels if meta is not None else None
        pending = None  # the previous MLP output, added to the residual by the next norm
        for index, layer in enumerate(self.layers):
            h = self._add_norm(residual, pending, layer.attn_norm, meta)
            attn = self._attention(index, layer.qkv(h, kernels), batch, cache, meta, rope)
            out = layer.o(attn, kernels)
            if batch.lora_rows.numel():
                rows = attn[batch.lora_rows]
                if kernels is not None and self.dtype in KERNEL_DTYPES:  # row by row: no M-dependent product
                    out[batch.lora_rows] += kernels.dense_linear(kernels.dense_linear(rows, layer.lora_a), layer.lora_b)
                else:
                    out[batch.lora_rows] += (rows @ layer.lora_a.T) @ layer.lora_b.T
            if self.tp is not None:  # row-parallel o (and adapter): sum the ranks' partial products
                self.tp.all_reduce(out)
            h = self._add_norm(residual, out, layer.mlp_norm, meta)
            gate_up = layer.gate_up(h, kernels)
            if meta is not None:
                act = self.kernels.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) * up
            pending = layer.down(act, kernels)
            if self.tp is not None:  # row-parallel down: sum the ranks' partial products
                self.tp.all_reduce(pending)
        rows = residual[batch.logit_rows]
        rows.add_(pending[batch.logit_rows])  # the last MLP output matters only where logits are asked
        if meta is not None:
            x = self.kernels.rms_norm(rows, self.final_norm, cfg.rms_norm_eps)
        else:
            x = rms_norm(rows, self.final_norm, cfg.rms_norm_eps)
        logits = self.head(x, kernels)
        if self.tp is not None:  # vocab-parallel head: rank 0 gathers the slices, the others return None
            logits = self.tp.gather_vocab(logits)
            if logits is None:
                return None
        return logits.float()


def attention_groups(batch: ForwardBatch, cache: PagedKVCache) -> tuple[list, list[int]]:
    """The reference path's attention plan: groups of two or more segments of one shape (length,
    pattern, mask) whose prefixes are close enough in length that padding them to the longest
    wastes little, each as (token rows or None for the whole batch, prefix slots [S, P], visible
    [S, P], intra mask); and the segments attended one by one."""
    by_shape: dict[tuple, list[int]] = {}
    for s, (a, b) in enumerate(batch.bounds):
        mask = batch.masks[s]
        by_shape.setdefault((b - a, batch.patterns[s], None if mask is None else id(mask)), []).append(s)
    groups, alone = [], []
    device = cache.block_tables.device
    for members in by_shape.values():
        prefixes = [batch.prefix_lens[s] for s in members]
        longest = max(prefixes)
        if len(members) < 2 or longest == 0 or sum(prefixes) < 0.5 * len(members) * longest:
            alone += members
            continue
        positions = torch.arange(longest, device=device)
        visible = positions[None, :] < torch.tensor(prefixes, device=device)[:, None]
        table_rows = torch.tensor([batch.table_rows[s] for s in members], device=device)
        pages = cache.block_tables[table_rows[:, None], (positions // cache.page_size)[None, :]].long()
        slots = torch.where(visible, pages * cache.page_size + positions % cache.page_size, 0)
        rows = None
        if len(members) < batch.num_segments:
            rows = torch.cat([torch.arange(*batch.bounds[s], device=device) for s in members])
        groups.append((rows, slots, visible, _intra_mask(batch, members[0], device)))
    return groups, sorted(alone)


def _intra_mask(batch: ForwardBatch, s: int, device: torch.device) -> torch.Tensor:
    from .segments import causal_mask, full_mask

    a, b = batch.bounds[s]
    pattern = batch.patterns[s]
    if pattern == 0:
        return causal_mask(b - a).to(device)
    if pattern == 1:
        return full_mask(b - a).to(device)
    return batch.masks[s].to(device)
