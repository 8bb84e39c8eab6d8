"""Place: checkpoint → builder → engine dir → runtime → serving, [plugins] beside them. GPU kernels written in Triton.

Each kernel comes with its PyTorch reference; the builder compiles kernel variants per arch and
the runtime launches them. Imports: engine_format (and, lazily, the runtime's reference math).

spec.py: what a kernel variant is. registry.py: the kernel modules (norm, rotary, activation,
fp8_gemm). launch.py: interpreter and JIT launchers. aot.py: ahead-of-time compilation and the
cubin launcher. ops.py: `KernelLibrary`, the operations the model calls, and `load_kernels`.
"""
