"""Splitting runtime-layout tensors into tensor-parallel shards, one dict per rank.

checkpoint ──[builder: shard]──▶ engine dir (weights.rank{r}.safetensors) ──runtime──▶ Triton

Megatron-style: qkv and gate_up are column-parallel (rank r keeps its query heads, its KV
heads and its slice of the intermediate size), o and down are row-parallel (the matching
input columns; each rank's product is a partial sum the runtime all-reduces), the head is
vocab-parallel (rows), and the draft adapter follows o: lora_a keeps its query-head
columns, lora_b stays whole (the rank's delta is then a partial sum, reduced with o's).
Embedding and norms are replicated. Sharding runs after fp8 quantization: per-output-channel
scales split with their rows, and the row-parallel layers keep all of theirs, so every
shard dequantizes to exactly the slice of the unsharded weight.
"""

from __future__ import annotations

import torch

from nemodiff.engine_format import ModelConfig
from nemodiff.sharding import ShardError, shard_bounds
from nemodiff.sharding import check_tp as check_tp_heads

__all__ = ["ShardError", "Sharder", "check_tp"]


def check_tp(config: ModelConfig, tp: int) -> None:
    check_tp_heads(config.num_attention_heads, config.num_key_value_heads, tp)


class Sharder:
    """Splits one runtime tensor (by name) into `tp` pieces."""

    def __init__(self, config: ModelConfig, tp: int):
        check_tp(config, tp)
        self.config, self.tp = config, tp

    def _rows(self, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        """Concatenated per-part row slices: a fused [a; b; c] tensor keeps rank's share of each part."""
        pieces, start = [], 0
        for size in sizes:
            a, b = shard_bounds(size, rank, self.tp)
            pieces.append(tensor[start + a: start + b])
            start += size
        return torch.cat(pieces).contiguous()

    def _columns(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        a, b = shard_bounds(tensor.shape[1], rank, self.tp)
        return tensor[:, a:b].contiguous()

    def split(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        cfg, ranks = self.config, range(self.tp)
        is_scale = name.endswith(".scale")
        kind = name.removesuffix(".scale").rsplit(".", 1)[-1]
        if kind == "qkv":
            heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads)
            return [self._head_rows(tensor, heads, r) for r in ranks]
        if kind == "gate_up":
            return [self._rows(tensor, [cfg.intermediate_size] * 2, r) for r in ranks]
        if kind == "head":
            return [self._rows(tensor, [tensor.shape[0]], r) for r in ranks]
        if kind in ("o", "down", "lora_a"):
            if is_scale:  # per output channel: the row-parallel layers keep every output row
                return [tensor for _ in ranks]
            if kind == "down":
                return [self._columns(tensor, r) for r in ranks]
            q_out = cfg.num_attention_heads * cfg.head_dim
            if tensor.shape[1] != q_out:
                raise ShardError(f"{name}: {tensor.shape[1]} input columns, expected {q_out}")
            return [self._head_columns(tensor, r) for r in ranks]
        return [tensor for _ in ranks]  # embed, norms, lora_b: replicated

    def _head_rows(self, tensor: torch.Tensor, heads: tuple[int, ...], rank: int) -> torch.Tensor:
        """Rows of rank's heads in a fused [q; k; v] tensor: whole heads of head_dim rows each."""
        hd, pieces, start = self.config.head_dim, [], 0
        for count in heads:
            a, b = shard_bounds(count, rank, self.tp)
            pieces.append(tensor[start + a * hd: start + b * hd])
            start += count * hd
        return torch.cat(pieces).contiguous()

    def _head_columns(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        hd = self.config.head_dim
        a, b = shard_bounds(self.config.num_attention_heads, rank, self.tp)
        return tensor[:, a * hd: b * hd].contiguous()

    def split_all(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(self.tp)]
        for name, tensor in tensors.items():
            for shard, piece in zip(shards, self.split(name, tensor)):
                shard[name] = piece
        return shards
