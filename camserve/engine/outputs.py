"""Model outputs of any structure: tensors, tuples, namedtuples, dicts, dataclasses.

A model may return one tensor, a tuple or namedtuple (Inception's
``(logits, aux_logits)``), a dict, a dataclass, or a HuggingFace-style output
object (a dataclass that is also an ordered dict). The engine walks every such
structure to detach it and to check that it is finite, and finds the class
logits in it when they are unambiguous (see :func:`find_logits`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from camserve.errors import InvalidRequestError, ModelFailureError

__all__ = [
    "NonFiniteOutputError",
    "check_finite",
    "find_logits",
    "leaves",
    "require_logits",
    "tree_map",
]


class NonFiniteOutputError(ModelFailureError):
    """The model's output (or a score computed from it) is NaN or infinite.

    Attributes:
        images: indices of the images of the call whose output is not finite;
            the other images of the batch may be explained without them.
    """

    def __init__(self, message: str, images: tuple[int, ...]) -> None:
        super().__init__(message)
        self.images = images


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def tree_map(fn: Callable[[Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, its structure (and types) kept."""
    if isinstance(value, Tensor):
        return fn(value)
    if _is_namedtuple(value):
        return type(value)(*(tree_map(fn, v) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(tree_map(fn, v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Mapping):  # HuggingFace ModelOutput: keyword construction
            return type(value)(**{k: tree_map(fn, v) for k, v in value.items()})
        changes = {
            f.name: tree_map(fn, getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, Mapping):
        items = {k: tree_map(fn, v) for k, v in value.items()}
        try:
            return type(value)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    return value


def leaves(value: Any, path: str = "output") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in ``value`` with its path (``output.logits``, ``output[1]``)."""
    if isinstance(value, Tensor):
        yield path, value
    elif _is_namedtuple(value):
        for name, v in zip(value._fields, value, strict=True):
            yield from leaves(v, f"{path}.{name}")
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from leaves(v, f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name), f"{path}.{f.name}")


def _logits_field(value: Any) -> Any:
    if isinstance(value, Mapping):
        return value.get("logits")
    return getattr(value, "logits", None)


def _is_class_scores(t: object, n: int | None) -> bool:
    return (
        isinstance(t, Tensor)
        and t.dim() == 2
        and t.is_floating_point()
        and (n is None or t.shape[0] == n)
    )


def find_logits(output: Any, n: int | None = None) -> Tensor | None:
    """The class scores ``(N, C)`` in a model output, when they are unambiguous.

    In order: the output itself when it is a float ``(N, C)`` tensor; its
    ``logits`` field or key (namedtuples, dicts, dataclasses, HuggingFace
    outputs) when that is one; the only float ``(N, C)`` tensor in the
    structure. Otherwise (none, or several without a ``logits`` field) None.
    """
    if isinstance(output, Tensor):
        return output if _is_class_scores(output, n) else None
    named = _logits_field(output)
    if _is_class_scores(named, n):
        return named  # type: ignore[no-any-return]
    found = [t for _, t in leaves(output) if _is_class_scores(t, n)]
    return found[0] if len(found) == 1 else None


def require_logits(output: Any, n: int | None = None) -> Tensor:
    """:func:`find_logits`, or an error saying why class targets do not apply.

    Raises:
        InvalidRequestError: no unambiguous ``(N, C)`` float tensor; the message
            lists the tensors found and says to pass a score function.
    """
    logits = find_logits(output, n)
    if logits is not None:
        return logits
    found = [(p, tuple(t.shape)) for p, t in leaves(output)]
    shown = ", ".join(f"{p} {s}" for p, s in found[:8]) or f"a {type(output).__name__}"
    candidates = [p for p, t in leaves(output) if _is_class_scores(t, n)]
    why = (
        f"several (N, C) float tensors ({', '.join(candidates)}) and no 'logits' field"
        if len(candidates) > 1
        else "no (N, C) float tensor"
    )
    raise InvalidRequestError(
        f"class targets need the class scores (N, C) of the model output, and it has {why}: "
        f"{shown}; pass a score function as targets (targets=lambda out: ...)"
    )


def check_finite(output: Any, model: str, n: int) -> None:
    """Raise :class:`NonFiniteOutputError` when a float tensor of ``output`` is NaN or inf.

    Rows of batch-first tensors (first dimension ``n``) are attributed to
    their images; a non-finite tensor of any other shape fails every image.

    Raises:
        NonFiniteOutputError: naming the model, the output field, the images
            and the kind of value (NaN, +inf, -inf).
    """
    bad: set[int] = set()
    problems: list[str] = []
    for path, t in leaves(output):
        if not t.is_floating_point() and not t.is_complex():
            continue
        ok = torch.isfinite(t)
        if bool(ok.all()):
            continue
        kinds = [
            name
            for name, mask in (
                ("NaN", torch.isnan(t)),
                ("+inf", torch.isposinf(t)),
                ("-inf", torch.isneginf(t)),
            )
            if bool(mask.any())
        ]
        if t.dim() >= 1 and t.shape[0] == n:
            rows = (~ok).reshape(n, -1).any(dim=1).nonzero().flatten().tolist()
        else:
            rows = list(range(n))
        bad.update(rows)
        problems.append(f"{path} has {'/'.join(kinds)} for images {rows}")
    if problems:
        images = tuple(sorted(bad))
        raise NonFiniteOutputError(
            f"model {model!r} gave a non-finite output ({'; '.join(problems)}); "
            "no map is computed from it",
            images,
        )
