"""Domain exceptions. The service layer maps each to one gRPC status code; nothing else does.

The engine and the bundles raise these and never import grpc (docs/DESIGN.md § Layout).
"""

from __future__ import annotations


class RagmixError(Exception):
    """Base of every error ragmix reports to a caller."""


class ValidationError(RagmixError, ValueError):
    """A request parameter is out of range. Maps to INVALID_ARGUMENT.

    The message names the parameter, the allowed range and the value received, in the form
    "top_k must be in [1, 20], got 50."
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickled whole, so it crosses a process boundary (a Ray Serve replica) intact."""
        return type(self), (self.param, str(self))


class NotFoundError(RagmixError, LookupError):
    """Something a request names does not exist (a passage id). Maps to NOT_FOUND."""


class ConflictError(RagmixError):
    """What a request would create already exists (a passage id). Maps to ALREADY_EXISTS."""


class OverloadedError(RagmixError):
    """The server refuses new work rather than queue it without bound. Maps to RESOURCE_EXHAUSTED."""


class UnavailableError(RagmixError):
    """The server is shutting down or not ready. Maps to UNAVAILABLE."""


class BundleError(RagmixError):
    """A model or index bundle on disk is missing, corrupt or does not fit the others.

    Raised at load time, so the server refuses to start with a message that says which file and why.
    """


SHOWN_CHARS = 60
"""How much of a client's value an error message repeats. A status message travels in the
grpc-message trailer, which clients refuse past 16 KiB ("metadata size exceeds hard limit", seen
as RESOURCE_EXHAUSTED instead of the error): echoing a 100k-character stop string lost the error."""


def shown(value: object) -> str:
    """repr(value), cut to SHOWN_CHARS with its full length said, for an error message."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    size = (
        f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    )
    return f"{text[:SHOWN_CHARS]}… ({size})"
