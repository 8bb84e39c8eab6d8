"""Tensor-parallel communication: the process groups, the forward's collectives, the step messages.

checkpoint ──builder──▶ engine dir ──[runtime: tensor parallelism, wire level]──▶ Triton

Every rank holds two torch.distributed process groups over one TCP store that rank 0 hosts:
- `control` (gloo, CPU): rank 0 broadcasts each step's plan as one int64 message (a second
  broadcast carries what does not fit the first). Workers block here between steps, on the
  CPU, for as long as the engine is idle.
- `data` (NCCL on GPUs, gloo on CPU): the forward's all-reduces, the logits gather and the
  image embeddings of VLM prefills.
The groups are process-group objects owned by the engine (not torch's default group), so
one process can hold several engines. Rank 0 waits for each collective at most
`step_timeout_s`; a worker waits for the next step without limit.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from nemodiff.device import is_cuda, make_current
from nemodiff.runtime.model.batch import PackedSizes
from nemodiff.sharding import shard_bounds

HEADER = 16  # int64 words before the payload
INLINE = 4096  # words in the first broadcast of every message; longer payloads follow in a second one
IDLE_WAIT = datetime.timedelta(days=3650)  # workers wait for the next step "forever"


class Op:
    STEP = 1
    STOP = 2
    CACHE = 3  # allocate a KV cache with this geometry; later steps use it
    GRAPHS = 4  # capture CUDA graphs for the steady shapes, in lockstep with rank 0


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung or failed; the engine cannot run further steps."""


def _gloo(store, rank: int, size: int, timeout: datetime.timedelta):
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, size, options)


def _nccl(store, rank: int, size: int, timeout: datetime.timedelta):
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)


def open_store(port: int | None, timeout_s: float) -> dist.TCPStore:
    """Rank 0 (port None) hosts the store on a free loopback port; the workers connect to it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if port is None:
        return dist.TCPStore("127.0.0.1", 0, None, True, timeout=timeout, wait_for_workers=False)
    return dist.TCPStore("127.0.0.1", port, None, False, timeout=timeout)


@dataclass
class TensorParallel:
    """One rank's view of its group: the collectives `Model._run` calls."""

    rank: int
    size: int
    vocab_size: int
    control: object  # gloo process group
    data: object  # NCCL or gloo process group
    step_timeout: datetime.timedelta

    @classmethod
    def connect(cls, store: dist.TCPStore, rank: int, size: int, device: torch.device, vocab_size: int,
                step_timeout_s: float) -> "TensorParallel":
        timeout = datetime.timedelta(seconds=step_timeout_s)
        control = _gloo(dist.PrefixStore("control", store), rank, size, timeout)
        if is_cuda(device):
            make_current(device)
            data = _nccl(dist.PrefixStore("data", store), rank, size, timeout)
        else:
            data = _gloo(dist.PrefixStore("data", store), rank, size, timeout)
        return cls(rank, size, vocab_size, control, data, timeout)

    # -- the forward's collectives -----------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> None:
        """Sum x over the ranks, in place."""
        self.data.allreduce([x]).wait()

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the [rows, vocab] logits from every rank's padded vocabulary slice; others: None."""
        if self.rank != 0:
            self.data.gather([], local.contiguous(), 0).wait()
            return None
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self.data.gather(parts, local.contiguous(), 0).wait()
        sizes = [b - a for a, b in (shard_bounds(self.vocab_size, r, self.size) for r in range(self.size))]
        return torch.cat([part[:, :n] for part, n in zip(parts, sizes)], dim=1)

    def broadcast_tensor(self, x: torch.Tensor) -> None:
        self.data.broadcast(x, 0).wait()

    # -- control messages --------------------------------------------------------------------
    def send(self, message: np.ndarray) -> None:
        """Rank 0: broadcast one message (header + payload)."""
        first = np.zeros(INLINE, dtype=np.int64)
        n = min(len(message), INLINE)
        first[:n] = message[:n]
        self.control.broadcast(torch.from_numpy(first), 0, self.step_timeout).wait()
        if len(message) > INLINE:
            rest = torch.from_numpy(np.ascontiguousarray(message[INLINE:]))
            self.control.broadcast(rest, 0, self.step_timeout).wait()

    def receive(self) -> np.ndarray:
        """Workers: the next message from rank 0 (blocks while the engine is idle)."""
        first = torch.zeros(INLINE, dtype=torch.int64)
        self.control.broadcast(first, 0, IDLE_WAIT).wait()
        total = HEADER + int(first[1])
        if total <= INLINE:
            return first.numpy()[:total]
        rest = torch.zeros(total - INLINE, dtype=torch.int64)
        self.control.broadcast(rest, 0, self.step_timeout).wait()
        return np.concatenate([first.numpy(), rest.numpy()])


# -- message layouts ---------------------------------------------------------------------------
def _words(array: np.ndarray) -> np.ndarray:
    """Any array as int64 words (zero-padded to a multiple of 8 bytes)."""
    raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    padded = np.zeros(-(-len(raw) // 8) * 8, dtype=np.uint8)
    padded[: len(raw)] = raw
    return padded.view(np.int64)


def _unwords(words: np.ndarray, dtype, count: int) -> np.ndarray:
    return words.view(np.uint8)[: count * np.dtype(dtype).itemsize].view(dtype)


def control_message(op: int, *values: int) -> np.ndarray:
    header = np.zeros(HEADER, dtype=np.int64)
    header[0] = op
    header[2: 2 + len(values)] = values
    return header


def step_message(sizes: PackedSizes, flat64: np.ndarray, flat32: np.ndarray, image_rows: np.ndarray | None,
                 table_rows: list[int], cache, shape_key: tuple | None) -> np.ndarray:
    """One step: the packed batch, the page-table rows changed since the last step, image rows.

    A changed row is sent up to the longest reserved length among them: entries past a row's
    reserved pages are never read."""
    rows = np.asarray(table_rows, dtype=np.int64)
    tables = cache.tables_host if cache is not None else None
    width = int(cache.pages_per_row[rows].max()) if len(rows) else 0
    values = tables[rows, :width] if len(rows) else np.zeros(0, np.int32)
    extra = np.frombuffer(pickle.dumps(shape_key), dtype=np.uint8) if shape_key is not None else np.zeros(0, np.uint8)
    parts = [flat64, _words(flat32), rows, _words(values),
             image_rows if image_rows is not None else np.zeros(0, np.int64), _words(extra)]
    header = np.zeros(HEADER, dtype=np.int64)
    header[0] = Op.STEP
    header[1] = sum(len(p) for p in parts)
    header[2:8] = (sizes.tokens, sizes.writes, sizes.logits, sizes.lora, sizes.segments, sizes.mask_words)
    header[8] = len(rows)
    header[9:11] = (tables.shape[0], width) if tables is not None else (0, 0)
    header[11] = -1 if image_rows is None else len(image_rows)
    header[12] = len(extra)
    header[13] = int(cache is not None)
    return np.concatenate([header] + parts)


@dataclass
class StepPlan:
    sizes: PackedSizes
    flat64: np.ndarray
    flat32: np.ndarray
    table_rows: np.ndarray
    table_values: np.ndarray
    table_shape: tuple[int, int]  # rank 0's rows, and the width of the rows sent
    image_rows: np.ndarray | None
    has_cache: bool
    shape_key: tuple | None


def read_step(message: np.ndarray) -> StepPlan:
    header, payload = message[:HEADER], message[HEADER:]
    sizes = PackedSizes(*(int(v) for v in header[2:8]))
    num_rows, table_shape = int(header[8]), (int(header[9]), int(header[10]))
    num_images, extra_bytes = int(header[11]), int(header[12])
    n64, n32 = sum(sizes.int64_parts()), sum(sizes.int32_parts())
    lengths = [n64, -(-n32 // 2), num_rows, -(-num_rows * table_shape[1] // 2), max(num_images, 0),
               -(-extra_bytes // 8)]
    flat64, w32, rows, w_values, image_rows, w_extra = np.split(payload, np.cumsum(lengths)[:-1])
    values = _unwords(w_values, np.int32, num_rows * table_shape[1]).reshape(num_rows, table_shape[1])
    shape_key = pickle.loads(_unwords(w_extra, np.uint8, extra_bytes).tobytes()) if extra_bytes else None
    return StepPlan(sizes, flat64, _unwords(w32, np.int32, n32), rows, values, table_shape,
                    image_rows if num_images >= 0 else None, bool(header[13]), shape_key)
