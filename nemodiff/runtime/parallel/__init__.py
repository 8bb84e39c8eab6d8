"""Place: checkpoint → builder → engine dir → [runtime/parallel] → serving. Tensor parallelism across ranks.

driver.py runs on rank 0 and sends every step, worker.py is rank 1..N-1, comm.py is the wire
level (process groups, collectives, step messages). Imports: nemodiff/runtime/model, nemodiff/runtime/engine.
"""
