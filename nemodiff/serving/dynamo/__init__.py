"""Place: checkpoint → builder → engine dir → runtime → [serving: a worker behind NVIDIA Dynamo].

`nemodiff worker ENGINE_DIR` registers the engine with Dynamo and serves it through Dynamo's frontend
(docs/dynamo.md): engine.py is the Dynamo engine (an `LLMEngine` on an `AsyncEngine`), requests.py
translates Dynamo's request dicts and chunks, card.py writes the Hugging Face model card the frontend
tokenizes with, kv_events.py tells Dynamo's KV router which prefix pages the worker holds, metrics.py
exports the `nemodiff_*` series, cli.py is the command. Dynamo (`ai-dynamo`) is imported only here.
"""
