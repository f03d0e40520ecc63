"""The exception tree of camserve.

Every error a caller can cause is a :class:`CamserveError`; its message names
the bad value and, where there is a fixed set, the valid choices. The errors
carry no transport codes: each front door maps the tree to its own status codes
in one table (HTTP in :mod:`camserve.codecs.http`, gRPC in the gateway).
"""

from __future__ import annotations

from collections.abc import Iterable


class CamserveError(Exception):
    """Base of all camserve errors."""


class InvalidRequestError(CamserveError, ValueError):
    """The caller's request is malformed (wrong type, shape, dtype, empty batch...)."""


class UnknownNameError(InvalidRequestError, KeyError):
    """A named thing (method, layer, class, label, model) does not exist."""

    def __init__(self, kind: str, value: object, choices: Iterable[object] = ()) -> None:
        self.kind = kind
        self.value = value
        items = list(choices)
        ints = [c for c in items if isinstance(c, int)]
        if len(ints) == len(items):  # class ids in numeric order
            self.choices = [str(c) for c in sorted(ints)]
        else:
            self.choices = sorted(str(c) for c in items)
        shown = ", ".join(self.choices[:50])
        more = "" if len(self.choices) <= 50 else f", ... ({len(self.choices)} in all)"
        plural = f"{kind}es" if kind.endswith(("s", "x")) else f"{kind}s"
        hint = f"; valid {plural}: {shown}{more}" if self.choices else ""
        super().__init__(f"unknown {kind} {value!r}{hint}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedMethodError(InvalidRequestError):
    """The method cannot explain this model (e.g. CAM without a GAP + linear head)."""


class ExportError(CamserveError):
    """A model could not be exported to ONNX with its gradients (see :mod:`camserve.export`).

    Args:
        message: why.
        operator: the ATen operator the exporter could not translate
            (``"aten.median.dim"``), when that is the reason; it is named in the message.
    """

    def __init__(self, message: str, *, operator: str | None = None) -> None:
        self.operator = operator
        prefix = f"operator {operator} cannot be exported to ONNX: " if operator else ""
        super().__init__(prefix + message)


class InvalidImageError(InvalidRequestError):
    """An image could not be decoded, or is too large."""


class ImageTooLargeError(InvalidImageError):
    """An image exceeds the configured pixel or byte cap."""


class OverloadedError(CamserveError):
    """The server refuses work it cannot take on now (back-pressure)."""


class DeadlineExceededError(CamserveError):
    """The request's deadline passed before its work finished."""


class ModelFailureError(CamserveError):
    """The model failed on a valid request, or gave a non-finite output.

    Args:
        message: what went wrong.
        model: the model's name; the message is prefixed with it when given.
    """

    def __init__(self, message: str, *, model: str | None = None) -> None:
        self.model = model
        super().__init__(message if model is None else f"model {model!r}: {message}")


class UnavailableError(CamserveError):
    """A backend (a model worker, a TorchServe instance) is down or unreachable."""


class InternalError(CamserveError):
    """An unexpected failure inside camserve (a bug); the message says no more than that."""
