"""The one place that knows the device (docs/design.md §13).

checkpoint ──builder──▶ engine dir ──runtime──▶ serving; this module is the ground under the runtime,
beside engine_format.py: every stage may import it, and it imports nothing of nemodiff.

What differs between a CPU and a GPU lives here and nowhere else: host staging memory (pinned on
a GPU), moving host arrays to the device and back, synchronisation, CUDA-graph capture, the SM
count and architecture, the host allocator setting, and the CUDA driver API that launches the
ahead-of-time kernels. The rest of the code asks a `Platform` and never branches on the device
type (tests/test_device.py lists the files that do, so a new branch fails CI).

A `Platform` runs one of three ways:
- on a GPU: everything real;
- on the CPU, reference path (`gpu_path=False`): host memory is the device's memory, tensors are
  handed over without copies, and greedy decisions run in numpy;
- on the CPU, emulating the GPU path (`gpu_path=True`; `kernels="aot-check"`): the same staging
  (a host buffer standing in for pinned memory, one copy into a separate "device" buffer, slices
  of it), the padded static graph path run eagerly (capture is a driver call), decisions on
  tensors as on a GPU. Only the driver calls are left out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

ALIGN_BYTES = 16  # every pointer an AOT kernel reads is compiled as 16-byte aligned (nemodiff/plugins/aot.py)
CPU_SM_COUNT = 8  # CPU runs: enough "SMs" that long contexts exercise split grids, few enough to interpret


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


def gpu_sm(device: torch.device) -> str:
    """The engine-format name of a GPU's architecture: sm_80, sm_89, sm_90a, sm_100a..."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if is_cuda(device) else (platform.processor() or "cpu")


def probability_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (the exactness tests compare with float64 references); float32 on GPUs,
    where a float64 softmax of 1024 rows over a 131k vocabulary would take 1 GB."""
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
        torch.cuda.empty_cache()


class Timer:
    """Wall time of device work: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = is_cuda(device)

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self._t0)


def keep_freed_memory() -> bool:
    """CPU runs: raise glibc's mmap threshold to its ceiling (32 MiB) and its trim threshold to 1 GiB,
    so that memory a step frees is reused by the next step from the heap, as a GPU caching allocator
    reuses its blocks. (Measured on a 2-core VM, QuadraticSpec k = 8 at 32 requests, 3 MB of logits:
    otherwise freeing them took 2-2.5 ms in about half of the steps.) True if it took effect; on
    other C libraries it does nothing."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters (malloc.h)
    done = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
    log.debug("CPU device: freed memory %s kept for reuse", "is" if done else "is not")
    return done


class Platform:
    """What the runtime asks about its device. See the module docstring for the three ways it runs."""

    def __init__(self, device: torch.device | str, gpu_path: bool | None = None, sm: str | None = None,
                 sm_count: int | None = None):
        self.device = torch.device(device)
        self.cuda = is_cuda(self.device)
        self.gpu_path = self.cuda if gpu_path is None else (gpu_path or self.cuda)
        self.emulated = self.gpu_path and not self.cuda
        self.sm = gpu_sm(self.device) if self.cuda else sm
        self._sm_count = sm_count

    @classmethod
    def for_kernels(cls, device: torch.device | str, kernels: str, sm: str | None = None) -> "Platform":
        """The platform of an engine run with a `load_kernels` mode: "aot-check" emulates the GPU path."""
        return cls(device, gpu_path=kernels == "aot-check" or None, sm=sm)

    def __repr__(self) -> str:
        return f"Platform({self.device}, {'emulated GPU path' if self.emulated else 'GPU' if self.cuda else 'CPU'})"

    @property
    def host_decisions(self) -> bool:
        """Greedy decisions run in numpy on views of the logits (the CPU reference path only)."""
        return not self.gpu_path and self.device.type == "cpu"

    @property
    def sm_count(self) -> int:
        return multiprocessor_count(self.device, self._sm_count or CPU_SM_COUNT)

    def own_memory(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights read from a file, in memory of their own as a copy to a GPU gives them (16-byte aligned
        allocations, not views into a mapped file at 8-byte offsets): only the emulated GPU path copies."""
        return {name: t.clone() for name, t in tensors.items()} if self.emulated else tensors

    def prepare_process(self) -> None:
        if not self.cuda:
            keep_freed_memory()

    # -- host <-> device --------------------------------------------------------------------------
    def staging(self, dtype: torch.dtype) -> "Staging":
        return Staging(self, dtype)

    def host_copy(self) -> "HostCopy":
        return HostCopy(self)

    # -- CUDA graphs ------------------------------------------------------------------------------
    @property
    def captures_graphs(self) -> bool:
        return self.cuda

    def graph_pool(self):
        return torch.cuda.graph_pool_handle() if self.cuda else None

    def capture(self, run: Callable[[], torch.Tensor], pool) -> tuple[object, torch.Tensor]:
        """(graph, its output) of `run`, warmed up once outside the graph on a side stream."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        _CAPTURING[0] = True
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                out = run()
        finally:
            _CAPTURING[0] = False
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
        host.copy_(tensor, non_blocking=True)
        if platform.cuda:
            torch.cuda.current_stream(platform.device).synchronize()
        return host.numpy()


class Staging:
    """A growable host buffer (pinned on a GPU) and its device twin, reused every step, for arrays
    that go to the device together in ONE copy. Each part starts on a 16-byte boundary of both
    buffers, so every slice can be handed to an ahead-of-time kernel (its pointers are compiled as
    16-byte aligned). On the CPU reference path the parts become tensors as they are, with no copy."""

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
            self.dev[:offset].copy_(self.host[:offset], non_blocking=True)
        return [self.dev[start:start + n] for start, n in layout]

    def upload_one(self, array: np.ndarray) -> torch.Tensor:
        return self.upload([array])[0]


class KernelLaunchError(RuntimeError):
    """A kernel could not be found, loaded, checked or launched; the message says which and why."""


def cuda_driver():
    """The CUDA driver API module of cuda-python (`cuda.bindings.driver`, or the older `cuda.cuda`)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6
    return driver


class CudaDriver:
    """The CUDA driver calls of the ahead-of-time launcher: load a cubin, launch a function on torch's
    current stream (so CUDA-graph capture records it like any other kernel)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cu = cuda_driver()
        self._modules: list = []

    def _check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise KernelLaunchError(f"{what} failed: {err!r}")
        return rest[0] if len(rest) == 1 else rest

    def _ensure_context(self) -> None:
        """Make torch's primary context current on this thread (the driver API needs one)."""
        cu = self.cu
        if int(self._check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")) == 0:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            handle = self._check(cu.cuDeviceGet(index), "cuDeviceGet")
            primary = self._check(cu.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
            self._check(cu.cuCtxSetCurrent(primary), "cuCtxSetCurrent")

    def load(self, cubin: bytes, name: str, shared: int, what: str):
        """The function `name` of a cubin, allowed `shared` bytes of dynamic shared memory."""
        self._ensure_context()
        cu = self.cu
        module = self._check(cu.cuModuleLoadData(cubin), f"loading {what}")
        self._modules.append(module)
        fn = self._check(cu.cuModuleGetFunction(module, name.encode()), f"finding {name} in {what}")
        if shared > 48 * 1024:
            self._check(cu.cuFuncSetAttribute(
                fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared),
                f"allowing {shared} bytes of shared memory for {name}")
        return fn

    def launch(self, fn, grid: tuple[int, int, int], threads: int, shared: int, params_address: int,
               what: str) -> None:
        cu = self.cu
        stream = torch.cuda.current_stream(self.device).cuda_stream
        result = cu.cuLaunchKernel(fn, *grid, threads, 1, 1, shared, stream, params_address, 0)
        if result[0] == cu.CUresult.CUDA_ERROR_INVALID_CONTEXT:  # a thread that has not touched CUDA yet
            self._ensure_context()
            result = cu.cuLaunchKernel(fn, *grid, threads, 1, 1, shared, stream, params_address, 0)
        self._check(result, f"launching {what}")

    def scratch(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
