"""Registry of decoding strategies by mode name (see request.MODES)."""

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
