"""Shard arithmetic of tensor parallelism, shared by the builder (which splits) and the runtime (which gathers).

checkpoint ──builder (splits by these bounds)──▶ engine dir ──runtime (loads, gathers by them)──▶ Triton

A ground module: it imports nothing of nemodiff, and every wing may import it. Each rank keeps
whole KV heads with their query heads; a dimension of `total` items is split into contiguous
ranges, the first `total % tp` ranks taking one more.
"""

from __future__ import annotations


class ShardError(ValueError):
    """The model cannot be split over the requested number of ranks."""


def shard_bounds(total: int, rank: int, tp: int) -> tuple[int, int]:
    """[start, end) of rank's share of `total` items; the first `total % tp` ranks get one more."""
    base, extra = divmod(total, tp)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_tp(num_attention_heads: int, num_key_value_heads: int, tp: int) -> None:
    """Refuses a rank count that does not split the heads into whole KV-head groups."""
    if tp < 1:
        raise ShardError(f"--tp must be at least 1 (got {tp})")
    heads, kv_heads = num_attention_heads, num_key_value_heads
    if kv_heads % tp:
        choices = ", ".join(str(n) for n in range(1, kv_heads + 1) if kv_heads % n == 0)
        raise ShardError(f"--tp {tp} must divide the model's {kv_heads} KV heads (each rank keeps whole KV heads "
                         f"and their query heads); choose one of: {choices}")
    if heads % kv_heads:
        raise ShardError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
