"""Place: checkpoint → builder → engine dir → [runtime/decoding] → serving. What happens after the logits.

strategies/ (one per mode: which segment a request runs next, and what it does with its
answers), decide*.py (every request's token choices of a step in one batched pass), sampling.py
(batched sampling) and sampler.py (its one-row reference). Imports: runtime/model (segments),
request.py.
"""
