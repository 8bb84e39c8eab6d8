"""Place: checkpoint → builder → engine dir → runtime → [serving]. The engine behind network fronts.

async_engine.py puts an engine on a thread of its own (submit, stream, cancel), triton/ is the
Triton Inference Server model and its request parsing and metrics, http/ the public HTTP port in
front of Triton's, openai/ the OpenAI-compatible API, dynamo/ `nemodiff worker` (the engine behind
NVIDIA Dynamo's frontend), cli.py and process.py `nemodiff serve` and the tritonserver process it
supervises; errors.py names the kinds of errors, metric_names.py the `nemodiff_*` series every front
exports, control.py is how `nemodiff serve` and the model talk. Imports: the runtime and engine_format; the runtime never
imports serving.
"""
