"""Place: checkpoint → builder → engine dir → runtime → [serving/openai]. The OpenAI-compatible API.

app.py: the Starlette app (routes, request validation, response shapes). backend.py: the way to
the engine, Triton's gRPC streaming API. frontend.py: the thread that runs the app next to
tritonserver. Imports: the runtime's tokenizer and image preprocessing, nemodiff/serving/triton/inputs.py.
"""
