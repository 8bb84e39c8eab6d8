"""Compiled CUDA kernels and their bindings.

checkpoint ──builder (compiles these)──▶ engine dir ──runtime (loads them)──▶ Triton

Empty for now: every operation runs on the PyTorch reference path in `nemodiff.runtime`.
"""
