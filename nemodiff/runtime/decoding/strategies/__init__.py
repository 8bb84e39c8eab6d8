"""Place: checkpoint → builder → engine dir → [runtime/decoding/strategies] → serving. One decoding strategy per mode.

The registry maps each mode name (request.MODES) to its strategy."""

from .ar import ARStrategy
from .diffusion import DiffusionStrategy
from .linear_spec import LinearSpecStrategy
from .quadratic_spec import QuadraticSpecStrategy

STRATEGIES = {
    "ar": ARStrategy,
    "diffusion": DiffusionStrategy,
    "linear-spec": LinearSpecStrategy,
    "quadratic-spec": QuadraticSpecStrategy,
}
