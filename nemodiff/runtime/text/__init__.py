"""Place: checkpoint → builder → engine dir → [runtime/text] → serving. Text in and out: tokenizer, detokenizer, stream deltas.

Imports: nothing of the runtime but request.py (streaming reads a request's detokenizer).
"""
