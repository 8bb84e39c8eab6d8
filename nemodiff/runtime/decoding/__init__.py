"""Place: checkpoint → builder → engine dir → [runtime/decoding] → serving. What happens after the logits.

strategies/ (one per mode: which segment a request runs next, and what it does with its
answers); decision_pass.py (every request's token choices of a step in one batched pass),
decision_pass_numpy.py (its numpy variant for greedy needs on a CPU device), decision_kinds.py (the
vectorised kinds: denoising, speculative verification, QuadraticSpec cycles); batched_sampling.py
(sampling many rows at once on the device) and reference_sampler.py (its one-row reference); bias.py,
grammar.py and logprobs.py (a request's logit bias, structured-output masks, log-probabilities).
Imports: runtime/model (segments), runtime/request.py.
"""
