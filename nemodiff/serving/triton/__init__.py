"""Place: checkpoint → builder → engine dir → runtime → [serving/triton]. nemodiff's model inside Triton Inference Server.

model.py: the decoupled Python-backend model over an AsyncEngine. inputs.py: one request's
tensors into prompt ids and SamplingParams. metrics.py: Prometheus series. requests.py: the
per-request state. Imports: the runtime, nemodiff/serving/async_engine.py.
"""
