"""How a request's error is named, and how a front that sees only its message tells the kind.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: error kinds and their messages]

The model answers every failed request with a Triton error (INVALID_ARG, UNAVAILABLE, INTERNAL).
Two of the paths to a client keep only the message: Triton's HTTP generate endpoints answer
every model error with status 400, and a gRPC stream opened without Triton's
`triton_grpc_error` header carries the message alone (that header, in turn, makes Triton log
"HandleCancellation called even when the context was not cancelled" for every error). So every
message of a kind other than "invalid" starts with a fixed phrase, defined here and used both
where the messages are made (`AsyncEngine`) and where they are read (the HTTP front, the OpenAI
backend): `kind_of(message)` is exact for our own messages, and anything else is a bad request.
"""

from __future__ import annotations

KINDS = ("invalid", "internal", "unavailable", "timeout")

# Refusals: the request never ran; retrying later can succeed (HTTP 503 with Retry-After).
AT_CAPACITY = "the server is at capacity"
SHUTTING_DOWN = "the server is shutting down"
ENGINE_FAILED = "the engine has failed and the server is restarting"
UNKNOWN_MODEL = "Request for unknown model"  # Triton's own, while the model is (un)loading
REFUSALS = (AT_CAPACITY, SHUTTING_DOWN, ENGINE_FAILED, UNKNOWN_MODEL)
TIMED_OUT = "request timeout expired"
INTERNAL = "internal error"

HTTP_STATUS = {"invalid": 400, "unavailable": 503, "timeout": 503, "internal": 500}
RETRY_AFTER_S = 1  # what a refused client is told to wait


def internal(message: str) -> str:
    """An internal error's message, starting with the phrase that marks the kind."""
    return message if message.startswith(INTERNAL) else f"{INTERNAL}: {message}"


def kind_of(message: str) -> str:
    """The kind of one of our error messages (see the module docstring); "invalid" for anything else."""
    if message.startswith(REFUSALS):
        return "unavailable"
    if message.startswith(TIMED_OUT):
        return "timeout"
    if message.startswith(INTERNAL):
        return "internal"
    return "invalid"


def is_refusal(message: str) -> bool:
    """The request was refused before it ran (full, draining, failed): the client may retry."""
    return message.startswith(REFUSALS)
