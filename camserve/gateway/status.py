"""The one table from camserve's exception tree to gRPC status codes, and back.

A caller's mistake is never ``INTERNAL``: invalid fields are
``INVALID_ARGUMENT`` (the message names the field and the value), an unknown
model is ``NOT_FOUND``, a full queue ``RESOURCE_EXHAUSTED``, a passed deadline
``DEADLINE_EXCEEDED``, a backend that cannot be reached ``UNAVAILABLE``.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from camserve.errors import (
    CamserveError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelFailureError,
    OverloadedError,
    UnavailableError,
    UnknownNameError,
)

__all__ = [
    "InternalError",
    "ModelFailureError",
    "RemoteError",
    "UnavailableError",
    "code_of",
    "error_of",
    "status_of",
]


_TABLE: tuple[tuple[type[CamserveError], grpc.StatusCode], ...] = (
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelFailureError, grpc.StatusCode.INTERNAL),
    (InternalError, grpc.StatusCode.INTERNAL),
)


def code_of(error: CamserveError) -> grpc.StatusCode:
    """The gRPC status code of an error (first match in the table; unknown kinds: INTERNAL)."""
    if isinstance(error, UnknownNameError) and error.kind == "model":
        return grpc.StatusCode.NOT_FOUND
    for kind, code in _TABLE:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def status_of(error: CamserveError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error (a failed item of a batch or a stream)."""
    return status_pb2.Status(code=code_of(error).value[0], message=str(error))


_ERRORS: dict[grpc.StatusCode, type[CamserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.INTERNAL: ModelFailureError,
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class RemoteError(CamserveError):
    """An error answered by the server with a code outside the table (UNAUTHENTICATED, ...)."""


def error_of(code: grpc.StatusCode | int, message: str) -> CamserveError:
    """The camserve error a client raises for a status (the inverse of :func:`code_of`).

    ``NOT_FOUND`` and ``INVALID_ARGUMENT`` both give an :class:`InvalidRequestError`
    (the message says which); a code outside the table gives a :class:`RemoteError`
    whose message starts with the code's name.
    """
    status = (
        code if isinstance(code, grpc.StatusCode) else _CODES.get(code, grpc.StatusCode.UNKNOWN)
    )
    kind = _ERRORS.get(status)
    if kind is None:
        return RemoteError(f"{status.name}: {message}")
    return kind(message)
