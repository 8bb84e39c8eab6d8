"""The CUDA driver half of the device module: cuda-bindings, its driver rule, loading and launching cubins,
and timing device work (`Timer`: CUDA events on a GPU, the host clock on the CPU).

checkpoint ──builder──▶ engine dir/kernels/<sm>/ ──runtime──▶ serving; like nemodiff/device.py this is
ground under the runtime (it imports only device.py). The ahead-of-time launcher
(nemodiff/plugins/aot_launch.py) hands its loads and launches to `CudaDriver`.

Which device: a `CudaDriver` belongs to ONE GPU. It retains that GPU's primary context (the one torch
uses) when it is made, pushes it around every module load, and makes it current on a thread before
the first launch there, so an engine on `cuda:1` loads its cubins into device 1's context and
launches on device 1's stream, whatever device the calling thread had current.

Which bindings: cuda-bindings N.x needs a driver for CUDA N (13.x: driver 580 or newer; 12.x: 525 or
newer). Install the bindings of the CUDA major torch was built with: `pip install 'nemodiff[gpu-cu12]'`
for a cu12x torch, `'nemodiff[gpu-cu13]'` for cu13x (docs/deploy.md). A driver too old for the installed
bindings is one line naming both (`DriverTooOld`, found when the driver is made, before any cubin
loads); `--kernels auto` then runs Triton's JIT instead (nemodiff/plugins/ops.py).
"""

from __future__ import annotations

import threading
import time
from importlib import metadata
from typing import NamedTuple

import torch

from nemodiff.device import KernelLaunchError, is_cuda

MIN_DRIVER = {12: "525", 13: "580"}  # the first Linux driver of each CUDA major


class DriverTooOld(KernelLaunchError):
    """The installed CUDA driver cannot run the installed cuda-bindings; the message names both."""


class CudaVersions(NamedTuple):
    driver: int  # cuDriverGetVersion: the newest CUDA the driver supports, 1000 * major + 10 * minor
    bindings: str  # the cuda-bindings (or older cuda-python) package version
    torch_cuda: str | None  # the CUDA torch was built with (torch.version.cuda)


def cuda_driver():
    """The CUDA driver API module of cuda-python (`cuda.bindings.driver`, or the older `cuda.cuda`)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6
    return driver


def cuda_versions(cu=None) -> CudaVersions:
    """The versions this process runs with (the seam tests replace: CudaDriver(versions=...))."""
    cu = cu or cuda_driver()
    err, driver = cu.cuDriverGetVersion()
    if int(err) != 0:
        raise KernelLaunchError(f"cuDriverGetVersion failed: {err!r}")
    for package in ("cuda-bindings", "cuda-python"):
        try:
            bindings = metadata.version(package)
            break
        except metadata.PackageNotFoundError:
            bindings = "unknown"
    return CudaVersions(int(driver), bindings, torch.version.cuda)


def _cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_problem(versions: CudaVersions) -> str | None:
    """Why the driver cannot run these bindings (one line naming both versions), or None."""
    try:
        major = int(versions.bindings.split(".")[0])
    except ValueError:
        return None
    if versions.driver >= 1000 * major:
        return None
    fit = versions.driver // 1000
    torch_note = f"; torch is built for CUDA {versions.torch_cuda}" if versions.torch_cuda else ""
    return (f"the CUDA driver supports CUDA {_cuda(versions.driver)}, but cuda-bindings {versions.bindings} needs a "
            f"driver for CUDA {major} ({MIN_DRIVER.get(major, 'a newer one')} or newer){torch_note}: install "
            f"cuda-bindings {fit}.x (pip install 'nemodiff[gpu-cu{fit}]') or update the driver")


class CudaDriver:
    """The CUDA driver calls of the ahead-of-time launcher for one GPU: load a cubin into that GPU's
    primary context, launch a function on torch's current stream of that GPU (so CUDA-graph capture
    records it like any other kernel)."""

    def __init__(self, device: torch.device, versions: CudaVersions | None = None):
        device = torch.device(device)
        self.cu = cu = cuda_driver()
        problem = driver_problem(versions or cuda_versions(cu))
        if problem:
            raise DriverTooOld(problem)
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self._modules: list = []
        self._check(cu.cuInit(0), "cuInit")
        handle = self._check(cu.cuDeviceGet(self.index), f"cuDeviceGet({self.index})")
        self.context = self._check(cu.cuDevicePrimaryCtxRetain(handle), f"retaining device {self.index}'s context")
        self._threads = threading.local()  # .ready: this thread has the context current

    def _check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise KernelLaunchError(f"{what} failed: {err!r}")
        return rest[0] if len(rest) == 1 else rest

    def _make_current(self) -> None:
        """This GPU's primary context current on the calling thread (before its first launch here)."""
        current = self._check(self.cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(self.context):
            self._check(self.cu.cuCtxSetCurrent(self.context), f"making device {self.index}'s context current")
        self._threads.ready = True

    def load(self, cubin: bytes, name: str, shared: int, what: str):
        """The function `name` of a cubin, allowed `shared` bytes of dynamic shared memory, loaded into
        this GPU's context (pushed for the load, then popped: the thread's own context is untouched)."""
        cu = self.cu
        self._check(cu.cuCtxPushCurrent(self.context), f"pushing device {self.index}'s context")
        try:
            module = self._check(cu.cuModuleLoadData(cubin), f"loading {what} on device {self.index}")
            self._modules.append(module)
            fn = self._check(cu.cuModuleGetFunction(module, name.encode()), f"finding {name} in {what}")
            if shared > 48 * 1024:
                self._check(cu.cuFuncSetAttribute(
                    fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared),
                    f"allowing {shared} bytes of shared memory for {name}")
        finally:
            self._check(cu.cuCtxPopCurrent(), "cuCtxPopCurrent")
        return fn

    def launch(self, fn, grid: tuple[int, int, int], threads: int, shared: int, params_address: int,
               what: str) -> None:
        cu = self.cu
        if not getattr(self._threads, "ready", False):
            self._make_current()
        stream = torch.cuda.current_stream(self.device).cuda_stream
        result = cu.cuLaunchKernel(fn, *grid, threads, 1, 1, shared, stream, params_address, 0)
        if result[0] in (cu.CUresult.CUDA_ERROR_INVALID_CONTEXT, cu.CUresult.CUDA_ERROR_INVALID_HANDLE):
            self._make_current()  # the thread switched contexts since its first launch
            result = cu.cuLaunchKernel(fn, *grid, threads, 1, 1, shared, stream, params_address, 0)
        self._check(result, f"launching {what} on device {self.index}")

    def scratch(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)


class Timer:
    """Wall time of device work: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = is_cuda(self.device)

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))  # the device's stream, not the current device's
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record(torch.cuda.current_stream(self.device))
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self._t0)
