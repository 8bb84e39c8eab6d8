"""Place: checkpoint → builder → engine dir → [runtime/model] → serving. The forward pass over a batch of segments.

A step arrives as segments (segments.py), is packed into one ragged batch (batch.py) over the
paged KV cache (kv_cache.py) and runs through the transformer (transformer.py: layers, RoPE,
reference attention, or the Triton kernels with their metadata in kernel_meta.py), eagerly or
replayed from a CUDA graph (graphs.py). loader.py reads an engine directory into a Model.
Imports: engine_format, plugins. Nothing else of the runtime.
"""
