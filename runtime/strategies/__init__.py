"""Registry of decoding strategies by mode name."""

from .ar import ARStrategy

STRATEGIES = {
    "ar": ARStrategy,
}
