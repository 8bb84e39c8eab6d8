"""The one place that knows the device (docs/design.md §13).

checkpoint ──builder──▶ engine dir ──runtime──▶ serving; a ground module under the runtime: every stage
may import it, and it imports nothing of nemodiff.

What differs between a CPU and a GPU lives here (and in its driver half, cuda_driver.py) and nowhere
else: staging memory, copies, synchronisation, graph capture, which device and stream work runs on, the
SM count and arch, the host allocator. The rest asks a `Platform` and never branches on the device type
(tests/test_device.py fails CI on a new branch). A `Platform` owns a stream on its device; the runtime
works inside `platform.on_device()` or on a thread given over with `platform.bind_thread()`, so an
engine on `cuda:1` never touches device 0 (CUDA calls that name no device act on the current one).

It runs one of three ways: on a GPU, everything real; on the CPU's reference path (`gpu_path=False`),
host memory is the device's, tensors are handed over without copies, greedy decisions run in numpy; on
the CPU emulating the GPU path (`gpu_path=True`, `kernels="aot-check"`), the same staging, padded graph
path (run eagerly) and tensor decisions as a GPU, only the driver calls left out. The emulation stands
in for GPU `emulated_index` ($NEMODIFF_EMULATED_GPU, else 0) with a per-thread current device, and
records (what, index acted on) of every staging copy, stream, graph, timer, cubin load and launch in
`emulator.calls`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

ALIGN_BYTES = 16  # every pointer an AOT kernel reads is compiled as 16-byte aligned (nemodiff/plugins/aot.py)
CPU_SM_COUNT = 8  # CPU runs: enough "SMs" that long contexts exercise split grids, few enough to interpret
EMULATED_GPU_ENV = "NEMODIFF_EMULATED_GPU"  # the GPU index an emulated platform stands in for


class DeviceError(RuntimeError):
    """The asked-for device cannot be used here; the message says why and what to do."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch device for a user's --device / device= value, or a one-line DeviceError."""
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {spec!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DeviceError(f"device {spec}: this torch ({torch.__version__}) is a CPU-only build; install a "
                              "CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec}: no CUDA GPU is visible to this process; check the driver and "
                              "CUDA_VISIBLE_DEVICES, or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec}: only {torch.cuda.device_count()} GPU(s) are visible")
        if device.index is None:  # "cuda" names the current device now, not whichever is current later
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise DeviceError(f"device {spec}: nemodiff runs on cpu or cuda devices")
    return device


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def on_host(tensor: torch.Tensor) -> bool:
    """The tensor's memory is host memory (numpy can view it)."""
    return tensor.device.type == "cpu"


_CAPTURING = [False]  # set by Platform.capture while a graph records


def capturing() -> bool:
    """Whether a CUDA graph is being captured (by `Platform.capture`)."""
    return _CAPTURING[0]


def multiprocessor_count(device: torch.device, cpu_stand_in: int = CPU_SM_COUNT) -> int:
    """The GPU's multiprocessor count, which sizes split grids; `cpu_stand_in` on the CPU."""
    if is_cuda(device):
        return torch.cuda.get_device_properties(device).multi_processor_count
    return cpu_stand_in


def current_stream_id(device: torch.device) -> int:
    """The handle of the current stream of a CUDA device; 0 elsewhere (one launch at a time there)."""
    if not is_cuda(device):
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def gpu_sm(device: torch.device) -> str:
    """The engine-format name of a GPU's architecture: sm_80, sm_89, sm_90a, sm_100a..."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if is_cuda(device) else (platform.processor() or "cpu")


def probability_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (exactness tests compare with float64); float32 on GPUs (a float64 softmax of 1024
    rows over a 131k vocabulary would take 1 GB)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp16 matmuls are slow and partly unsupported on the CPU: fp16 engines compute in fp32 there."""
    return torch.float32 if dtype == torch.float16 and not is_cuda(device) else dtype


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Tensor-parallel ranks: cuda:(index + r) for a CUDA device, else every rank on the same device."""
    if is_cuda(device):
        first = device.index if device.index is not None else torch.cuda.current_device()
        return [torch.device("cuda", first + r) for r in range(size)]
    return [device] * size


def make_current(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (nothing on the CPU)."""
    if is_cuda(device):
        torch.cuda.set_device(device)


def synchronize(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if is_cuda(device):
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def keep_freed_memory() -> bool:
    """CPU runs: glibc's mmap threshold to 32 MiB, its trim threshold to 1 GiB, so a step reuses what the last
    freed, as a GPU caching allocator does (else freeing 3 MB of logits took 2-2.5 ms). True if it took effect."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters (malloc.h)
    done = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
    log.debug("CPU device: freed memory %s kept for reuse", "is" if done else "is not")
    return done


class EmulatedGpu:
    """GPU `index` on the CPU: a per-thread current device (0 until set) and the (what, index) of each call."""

    def __init__(self, index: int):
        self.index, self.calls, self.threads = index, [], threading.local()  # calls: [(what, index)]

    def current(self) -> int:
        return getattr(self.threads, "device", 0)

    def touch(self, what: str) -> None:
        self.calls.append((what, self.current()))


class Platform:
    """What the runtime asks about its device. See the module docstring for the three ways it runs."""

    def __init__(self, device: torch.device | str, gpu_path: bool | None = None, sm: str | None = None,
                 sm_count: int | None = None, emulated_index: int | None = None):
        self.device = device = resolve_device(device) if is_cuda(device) else torch.device(device)
        self.cuda = is_cuda(device)
        self.gpu_path = self.cuda if gpu_path is None else (gpu_path or self.cuda)
        self.emulated = self.gpu_path and not self.cuda
        index = emulated_index if emulated_index is not None else int(os.environ.get(EMULATED_GPU_ENV) or 0)
        self.emulator = EmulatedGpu(index) if self.emulated else None
        self.index = device.index if self.cuda else self.emulator.index if self.emulator else None
        self.sm = gpu_sm(self.device) if self.cuda else sm
        self._sm_count, self._stream = sm_count, None

    @classmethod
    def for_kernels(cls, device: torch.device | str, kernels: str, sm: str | None = None,
                    sm_count: int | None = None) -> "Platform":
        """The platform of an engine run with a `load_kernels` mode: "aot-check" emulates the GPU path.
        sm_count: plan split grids as on a GPU with that many SMs (e.g. 132 for an H100 or H200)."""
        return cls(device, gpu_path=kernels == "aot-check" or None, sm=sm, sm_count=sm_count)

    def __repr__(self) -> str:
        return f"Platform({self.device}, {f'emulated GPU {self.index}' if self.emulated else self.device.type})"

    @property
    def stream(self):
        """The engine's own stream on its device (None on the CPU)."""
        self.touch("stream")
        if self.cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """Within: this device and its stream are the thread's current ones (restored after)."""
        if self.cuda:
            with torch.cuda.device(self.index), torch.cuda.stream(self.stream):
                yield
        elif self.emulator is not None:
            before, self.emulator.threads.device = self.emulator.current(), self.index
            self.touch("stream")  # its stream made current
            try:
                yield
            finally:
                self.emulator.threads.device = before
        else:
            yield

    def bind_thread(self) -> None:
        """This device and stream current on the calling thread for good (a thread the engine owns)."""
        if self.cuda:
            torch.cuda.set_device(self.index)
            torch.cuda.set_stream(self.stream)
        elif self.emulator is not None:
            self.emulator.threads.device = self.index
            self.touch("bind")
            self.touch("stream")

    def touch(self, what: str) -> None:
        """Emulated GPU path: record a device call and the device index it would act on."""
        if self.emulator is not None:
            self.emulator.touch(what)

    @property
    def host_decisions(self) -> bool:
        """Greedy decisions run in numpy on views of the logits (the CPU reference path only)."""
        return not self.gpu_path and self.device.type == "cpu"

    @property
    def sm_count(self) -> int:
        """The SM count split grids are planned for: the one asked for, else the GPU's (CPU: a stand-in)."""
        return self._sm_count or multiprocessor_count(self.device, CPU_SM_COUNT)

    def own_memory(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights in memory of their own, aligned as on a GPU, not views into a mapped file (emulated path)."""
        return {name: t.clone() for name, t in tensors.items()} if self.emulated else tensors

    def prepare_process(self) -> None:
        if not self.cuda:
            keep_freed_memory()

    def staging(self, dtype: torch.dtype) -> "Staging":
        return Staging(self, dtype)

    def host_copy(self) -> "HostCopy":
        return HostCopy(self)

    @property
    def captures_graphs(self) -> bool:
        return self.cuda

    def graph_pool(self):
        self.touch("graph pool")
        with self.on_device():
            return torch.cuda.graph_pool_handle() if self.cuda else None

    def capture(self, run: Callable[[], torch.Tensor], pool) -> tuple[object, torch.Tensor]:
        """(graph, its output) of `run`, warmed up once and captured on a side stream of this device (torch's
        default capture stream is the first current device's). Emulated: recorded, (None, None)."""
        self.touch("graph")
        if not self.cuda:
            return None, None
        with self.on_device():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(self.stream)
            with torch.cuda.stream(side), torch.inference_mode():
                run()
            self.stream.wait_stream(side)
            graph, _CAPTURING[0] = torch.cuda.CUDAGraph(), True  # no call plan records into a graph
            try:
                with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=side):
                    out = run()
            finally:
                _CAPTURING[0] = False
            self.stream.wait_stream(side)
        return graph, out

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0


def as_platform(device: "torch.device | str | Platform") -> "Platform":
    """A Platform as given, or the reference-path Platform of a plain device."""
    return device if isinstance(device, Platform) else Platform(device)


class HostCopy:
    """A device-to-host copy into a reused host buffer (pinned on a GPU), finished when `fetch` returns.
    The array it returns is overwritten by the next fetch. On the reference path it is a view."""

    def __init__(self, platform: Platform):
        self.platform = platform
        self.buffer: torch.Tensor | None = None

    def fetch(self, tensor: torch.Tensor) -> np.ndarray:
        platform = self.platform
        if not platform.gpu_path:
            return tensor.numpy()
        n = tensor.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != tensor.dtype:
            size = max(n, 2 * self.buffer.numel() if self.buffer is not None else 0, 1024)
            self.buffer = torch.empty(size, dtype=tensor.dtype, pin_memory=platform.cuda)
        host = self.buffer[:n].view(tensor.shape)
        platform.touch("fetch")
        host.copy_(tensor, non_blocking=True)
        if platform.cuda:
            torch.cuda.current_stream(platform.device).synchronize()
        return host.numpy()


class Staging:
    """A growable host buffer (pinned on a GPU) and its device twin, reused every step, for arrays that go
    to the device together in ONE copy. Each part starts 16-byte aligned in both, so any slice can go to an
    ahead-of-time kernel (compiled for aligned pointers). On the CPU reference path: tensors, no copy."""

    def __init__(self, platform: Platform, dtype: torch.dtype):
        self.platform, self.dtype, self.size = platform, dtype, 0
        self.host = self.dev = self.host_view = None
        self.numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.quantum = max(1, ALIGN_BYTES // self.numpy_dtype.itemsize)  # elements per alignment step
        self._parts: list[np.ndarray] = []
        self._layout: list[tuple[int, int]] = []
        self._staged = False  # the last parts went through the staging buffer (a GPU-path upload)

    def flat(self) -> np.ndarray:
        """The last parts uploaded or kept, concatenated without padding (host memory)."""
        if self._staged:
            return np.concatenate([self.host_view[a:a + n] for a, n in self._layout]) if self._layout else \
                np.zeros(0, self.numpy_dtype)
        return np.concatenate(self._parts).astype(self.numpy_dtype, copy=False)

    def keep(self, parts: list[np.ndarray]) -> None:
        """Hold the parts for `flat()` without putting them on the device."""
        self._parts, self._staged = parts, False

    def upload(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        if not self.platform.gpu_path:
            self.keep(parts)
            return [torch.from_numpy(np.ascontiguousarray(p, dtype=self.numpy_dtype)) for p in parts]
        self._staged = True
        q = self.quantum
        layout, offset = [], 0
        for part in parts:
            layout.append((offset, len(part)))
            offset += -(-len(part) // q) * q
        self._layout = layout
        if offset > self.size:
            self.size = max(offset, 2 * self.size, 1024)
            self.host = torch.empty(self.size, dtype=self.dtype, pin_memory=self.platform.cuda)
            self.dev = torch.empty(self.size, dtype=self.dtype, device=self.platform.device)
            self.host_view = self.host.numpy()
        view = self.host_view
        for (start, n), part in zip(layout, parts):
            view[start:start + n] = part
        if offset:
            self.platform.touch("staging")
            self.dev[:offset].copy_(self.host[:offset], non_blocking=True)
        return [self.dev[start:start + n] for start, n in layout]

    def upload_one(self, array: np.ndarray) -> torch.Tensor:
        return self.upload([array])[0]


class KernelLaunchError(RuntimeError):
    """A kernel could not be found, loaded, checked or launched; the message says which and why.
    (The CUDA driver calls themselves are nemodiff/cuda_driver.py.)"""
