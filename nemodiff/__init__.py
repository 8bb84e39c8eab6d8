"""nemodiff: build and serve Nemotron-Labs-Diffusion models.

checkpoint ──nemodiff-build──▶ engine dir ──nemodiff.LLM / nemodiff serve──▶ clients

Public Python API: `LLM`, `SamplingParams`, `RequestOutput`.
"""

__version__ = "0.1.0"

from nemodiff.runtime.llm import LLM, RequestOutput  # noqa: E402
from nemodiff.runtime.request import SamplingParams  # noqa: E402

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]
