"""Place: checkpoint → builder → engine dir → [runtime/engine] → serving. The step loop.

loop.py: schedule, one forward for everyone, one batched decision, one sync. scheduler.py:
admission, chunked prefill, preemption.
Imports: nemodiff/runtime/model, nemodiff/runtime/images, nemodiff/runtime/decoding, nemodiff/runtime/text, request.py.
"""
