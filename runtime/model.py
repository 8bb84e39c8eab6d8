"""The NLD transformer forward over a ragged batch of segments (DESIGN §3–4).

checkpoint ──builder──▶ engine dir ──[runtime: model]──▶ Triton

All tokens of all segments run through the projections and MLPs together; attention runs
per segment against that request's paged KV prefix. Tokens flagged `write_kv` store their
K/V in the cache slots of their positions. The draft adapter (LoRA on o_proj) is added only
for segments with `use_lora`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemodiff.engine_format import ModelConfig
from nemodiff.plugins.library import KernelLibrary

from .attention import AttentionMeta, segment_attention
from .kv_cache import PagedKVCache
from .layers import make_linear, rms_norm
from .rope import RotaryEmbedding, apply_rotary
from .segments import Pattern, Segment

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


@dataclass
class _Batch:
    ids: torch.Tensor
    positions: torch.Tensor
    bounds: list[tuple[int, int]]
    write_rows: torch.Tensor
    write_slots: torch.Tensor
    prefix_slots: list[torch.Tensor | None]
    intra_masks: list[torch.Tensor]
    lora_rows: torch.Tensor
    logit_rows: torch.Tensor
    logit_counts: list[int]


class Model:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", lora: dict[str, torch.Tensor] | None = None,
                 lora_scale: float = 1.0, kernels: KernelLibrary | None = None):
        self.config = config
        self.kernels = kernels
        self.graphs = None  # a GraphRunner once CUDA graphs are enabled (GPU with kernels)
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = weights["embed"].to(self.device, dtype)
        self.final_norm = weights["final_norm"].to(self.device, dtype)
        self.head = make_linear(weights, "head", dtype, self.device)
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

    # -- batch assembly ----------------------------------------------------------------------
    def _assemble(self, segments: list[Segment], cache: PagedKVCache | None) -> _Batch:
        ids, positions, bounds, write_rows, write_slots = [], [], [], [], []
        prefix_slots, masks, lora_rows, logit_rows, logit_counts = [], [], [], [], []
        start = 0
        for seg in segments:
            n = len(seg)
            ids += seg.token_ids
            positions += seg.positions
            bounds.append((start, start + n))
            flags = seg.write_flags()
            written = [j for j in range(n) if flags[j]]
            if (written or seg.prefix_len) and cache is None:
                raise ValueError("segments that read or write the KV cache need a cache")
            if written:
                write_rows += [start + j for j in written]
                write_slots.append(cache.slots(seg.request_id, torch.tensor([seg.positions[j] for j in written])))
            prefix_slots.append(cache.slots(seg.request_id, torch.arange(seg.prefix_len)) if seg.prefix_len else None)
            masks.append(seg.intra_mask())
            if seg.use_lora:
                if not self.has_lora:
                    raise ValueError("a segment asks for the draft adapter, but the engine has none")
                lora_rows += range(start, start + n)
            rows = seg.rows()
            logit_rows += [start + r for r in rows]
            logit_counts.append(len(rows))
            start += n
        dev = self.device

        def as_long(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        return _Batch(
            ids=as_long(ids), positions=as_long(positions), bounds=bounds, write_rows=as_long(write_rows),
            write_slots=torch.cat(write_slots).to(dev) if write_slots else as_long([]),
            prefix_slots=[s.to(dev) if s is not None else None for s in prefix_slots], intra_masks=masks,
            lora_rows=as_long(lora_rows), logit_rows=as_long(logit_rows), logit_counts=logit_counts,
        )

    # -- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, segments: list[Segment], cache: PagedKVCache | None = None) -> list[torch.Tensor]:
        """Run all segments in one pass; returns per segment float32 logits [rows, vocab]."""
        if self.graphs is not None and cache is self.graphs.cache:
            replayed = self.graphs.try_run(segments)
            if replayed is not None:
                return replayed
        batch = self._assemble(segments, cache)
        meta = kernel_meta(segments, cache, self.config, self.device) if self.uses_kernels(cache) else None
        return list(self._run(batch, cache, meta).split(batch.logit_counts))

    def uses_kernels(self, cache: PagedKVCache | None) -> bool:
        # the fused path needs the paged attention kernel, which KernelLibrary does not carry yet
        return (self.kernels is not None and cache is not None and self.dtype in (torch.bfloat16, torch.float16)
                and hasattr(self.kernels, "segment_attention"))

    def _add_norm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                  meta: AttentionMeta | None) -> torch.Tensor:
        """residual += delta; return RMSNorm(residual) (one fused kernel on the GPU path)."""
        if meta is not None:
            return self.kernels.add_rmsnorm(residual, delta, weight, self.config.rms_norm_eps)
        if delta is not None:
            residual.add_(delta)
        return rms_norm(residual, weight, self.config.rms_norm_eps)

    def _attend(self, index: int, q, k, v, batch: _Batch, cache: PagedKVCache | None,
                meta: AttentionMeta | None) -> torch.Tensor:
        num_tokens, hq, hd = q.shape
        if meta is not None:
            out = self.kernels.segment_attention(q, k, v, cache.k[index], cache.v[index], meta, hd ** -0.5)
            return out.view(num_tokens, hq * hd)
        attn = torch.empty(num_tokens, hq * hd, dtype=self.dtype, device=self.device)
        for (a, b), slots, mask in zip(batch.bounds, batch.prefix_slots, batch.intra_masks):
            pk = cache.k[index, slots] if slots is not None else None
            pv = cache.v[index, slots] if slots is not None else None
            attn[a:b] = segment_attention(q[a:b], k[a:b], v[a:b], pk, pv, mask)
        return attn

    def _run(self, batch: _Batch, cache: PagedKVCache | None, meta: AttentionMeta | None) -> torch.Tensor:
        cfg = self.config
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        residual = self.embed[batch.ids]
        cos, sin = self.rotary.cos_sin(batch.positions, self.dtype)
        q_scale = self.rotary.query_scale(batch.positions).to(self.dtype)[:, None, None]
        num_tokens = residual.shape[0]
        pending = None  # the previous MLP output, added to the residual by the next norm
        for index, layer in enumerate(self.layers):
            h = self._add_norm(residual, pending, layer.attn_norm, meta)
            q, k, v = layer.qkv(h).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
            q = apply_rotary(q.reshape(num_tokens, hq, hd), cos, sin) * q_scale
            k = apply_rotary(k.reshape(num_tokens, hkv, hd), cos, sin)
            v = v.reshape(num_tokens, hkv, hd).contiguous()
            if batch.write_rows.numel():
                cache.k[index, batch.write_slots] = k[batch.write_rows]
                cache.v[index, batch.write_slots] = v[batch.write_rows]
            attn = self._attend(index, q, k, v, batch, cache, meta)
            out = layer.o(attn)
            if batch.lora_rows.numel():
                rows = attn[batch.lora_rows]
                out[batch.lora_rows] += (rows @ layer.lora_a.T) @ layer.lora_b.T
            h = self._add_norm(residual, out, layer.mlp_norm, meta)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            pending = layer.down(F.silu(gate) * up)
        residual.add_(pending)
        x = rms_norm(residual[batch.logit_rows], self.final_norm, cfg.rms_norm_eps)
        return self.head(x).float()


def kernel_meta(segments: list[Segment], cache: PagedKVCache, config: ModelConfig,
                device: torch.device) -> AttentionMeta:
    """The device-side batch description the attention kernel reads."""
    lengths = [len(seg) for seg in segments]
    seg_start = [0]
    for n in lengths:
        seg_start.append(seg_start[-1] + n)
    tables = [cache.page_table(seg.request_id) if seg.prefix_len else [] for seg in segments]
    max_pages = max([1] + [len(t) for t in tables])
    codes = {Pattern.CAUSAL: 0, Pattern.FULL: 1, Pattern.MASK: 2}
    masks, offsets, size = [], [], 0
    for seg in segments:
        offsets.append(size)
        if seg.pattern is Pattern.MASK:
            flat = seg.mask.to(torch.uint8).flatten()
            masks.append(flat)
            size += flat.numel()
    longest = max(seg.prefix_len + len(seg) for seg in segments)
    splits = 1 if longest <= 1024 else min(32, -(-longest // 1024))
    tokens, heads = seg_start[-1], config.num_attention_heads

    def int32(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return AttentionMeta(
        token_seg=int32([s for s, n in enumerate(lengths) for _ in range(n)]), seg_start=int32(seg_start),
        prefix_len=int32([seg.prefix_len for seg in segments]),
        block_tables=int32([t + [0] * (max_pages - len(t)) for t in tables]),
        pattern=int32([codes[seg.pattern] for seg in segments]),
        mask_offset=torch.tensor(offsets, dtype=torch.int64, device=device),
        masks=torch.cat(masks).to(device) if masks else torch.zeros(1, dtype=torch.uint8, device=device),
        page_size=cache.page_size, num_splits=splits,
        workspace=(torch.empty(splits * tokens * heads * (config.head_dim + 2), dtype=torch.float32, device=device)
                   if splits > 1 else None),
    )
