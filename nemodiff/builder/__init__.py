"""Place: checkpoint → [builder] → engine dir → runtime → serving. A Hugging Face checkpoint in, an engine directory out.

checkpoint.py and vision_checkpoint.py read and validate, convert.py and shard.py lay the weights
out for the runtime, build.py writes the engine atomically, cli.py is `nemodiff-build`.
Imports: engine_format, plugins (to compile kernels).
"""
