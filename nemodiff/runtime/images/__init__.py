"""Place: checkpoint → builder → engine dir → [runtime/images] → serving. VLM prompts with images.

preprocess.py decodes and resizes images and lays out their placeholder tokens, encoder.py is the
vision tower and projector, feature_cache.py keeps encoder outputs by content, pipeline.py ties
them together for the engine. Imports: engine_format, nemodiff/runtime/model.
"""
