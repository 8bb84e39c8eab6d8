"""GPU kernels written in Triton, each with its PyTorch reference, and how they are compiled and launched.

checkpoint ──builder (compiles kernel variants per arch)──▶ engine dir ──runtime (launches them)──▶ Triton

spec.py: what a kernel variant is. registry.py: the kernel modules (norm, rotary, activation,
fp8_gemm). launch.py: interpreter and JIT launchers. aot.py: ahead-of-time compilation and the
cubin launcher. library.py: `KernelLibrary`, the operations the model calls, and `load_kernels`.
"""
