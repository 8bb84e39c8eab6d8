"""Place: checkpoint → builder → engine dir → [runtime] → serving. Runs an engine: the forward, the step loop, decoding.

Wings: model/ (the forward over segments), text/ (tokens ↔ text), images/ (VLM image inputs),
decoding/ (what happens after the logits), engine/ (the step loop), parallel/ (tensor parallelism).
At the top: request.py (what a request asks for, and its state) and llm.py (the Python API).
The map and the import rules: docs/architecture.md.
"""
