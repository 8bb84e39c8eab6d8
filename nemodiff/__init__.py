"""Place: [checkpoint → builder → engine dir → runtime → serving]: the ground and the top of the flow.

nemodiff builds and serves Nemotron-Labs-Diffusion models. This package holds the public Python
API (`LLM`, `SamplingParams`, `Guide`, `RequestOutput`), the `nemodiff` command line (cli.py) and the
engine-directory contract every stage shares (engine_format.py). Map: docs/architecture.md.
"""

from nemodiff.engine_format import NEMODIFF_VERSION as __version__
from nemodiff.runtime.llm import LLM, RequestOutput
from nemodiff.runtime.request import Guide, SamplingParams

__all__ = ["LLM", "Guide", "RequestOutput", "SamplingParams", "__version__"]
