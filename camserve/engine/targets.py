"""Which scores to explain: top-k classes, given class ids, or any score function.

A target is separate from a method: a class logit, a class probability (002
footnote 1), a caption word's log-probability or a VQA answer's score all
plug in as a :data:`ScoreFn` without changing the engine (001 sec. 2.2, 2.3).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from torch import Tensor

from camserve.engine.outputs import require_logits
from camserve.errors import InvalidRequestError, UnknownNameError

__all__ = ["SCORES", "ScoreFn", "Target", "Targets", "resolve_targets"]

ScoreFn: TypeAlias = Callable[..., Tensor]
"""``fn(output) -> (B, K)`` scores to explain from the model output of a batch of B rows.

If the function takes a second positional parameter (or one named ``rows``),
the engine passes ``rows``: a LongTensor ``(B,)`` giving, for each row of the
output, the index of the request image it comes from. Re-running methods
(Ablation-CAM, Score-CAM, occlusion, Integrated Gradients, Gradient SHAP) call
the function on batches of variants of one image, so a function that depends
on per-image data (the answer id of each image, the caption word of each
image) must index that data with ``rows``; one that does not may ignore it.
"""

Targets: TypeAlias = (
    int | Sequence[int] | Sequence[Sequence[int]] | Tensor | np.ndarray[Any, Any] | ScoreFn
)
SCORES = ("logit", "probability")


def _accepts_rows(fn: ScoreFn) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.name == "rows" for p in params):
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.default is inspect.Parameter.empty
    ]
    return len(positional) >= 2


@dataclass(frozen=True)
class Target:
    """The resolved targets of one call.

    Attributes:
        ids: LongTensor ``(N, K)``: class ids (``arange(K)`` for a score function).
        score: ``"logit"`` or ``"probability"`` (ignored for a score function).
        fn: the score function, or None for class targets.
    """

    ids: Tensor
    score: str
    fn: ScoreFn | None = None

    @property
    def k(self) -> int:
        """Targets per image."""
        return int(self.ids.shape[1])

    def scores(
        self, output: Any, rows: Tensor, *, kind: Literal["chosen", "logit"] = "chosen"
    ) -> Tensor:
        """The ``(B, K)`` target scores of a model output whose rows come from images ``rows``.

        Args:
            output: the model output for a batch of B rows.
            rows: LongTensor ``(B,)``, the request image of each row.
            kind: ``"chosen"`` for the score the caller picked, ``"logit"`` for
                the pre-softmax score (Grad-CAM++'s alphas, 002 eq. 9).
        """
        ids = self.ids.to(rows.device)[rows]
        if self.fn is not None:
            out = self.fn(output, rows) if _accepts_rows(self.fn) else self.fn(output)
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != rows.shape[0]:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise InvalidRequestError(
                    f"the score function must return a Tensor (B, K) with B={rows.shape[0]}, "
                    f"got {shape}"
                )
            if out.shape[1] != self.k:
                raise InvalidRequestError(
                    f"the score function returned {out.shape[1]} scores per row, "
                    f"the first call gave {self.k}"
                )
            return out
        logits = require_logits(output, int(rows.shape[0]))
        if self.score == "probability" and kind == "chosen":
            logits = torch.softmax(logits.float(), dim=1).to(logits.dtype)
        return logits.gather(1, ids.to(logits.device))


def _as_k(targets: object) -> int | None:
    """``targets`` as top-k when it is an integer scalar (int, numpy integer, 0-d array/tensor)."""
    if isinstance(targets, bool | np.bool_):
        raise InvalidRequestError(
            f"targets must be an int k, class ids or a score function, got {targets!r}"
        )
    if isinstance(targets, int | np.integer):
        return int(targets)
    if isinstance(targets, np.ndarray | Tensor) and targets.ndim == 0:
        _check_integer_dtype(targets)
        return int(targets.item())
    return None


def _check_integer_dtype(a: np.ndarray[Any, Any] | Tensor) -> None:
    if isinstance(a, Tensor):
        ok = not (a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool)
    else:
        ok = a.dtype.kind in "iu"
    if not ok:
        raise InvalidRequestError(
            f"class ids must be an integer tensor or array, got dtype {a.dtype}"
        )


def _class_ids(targets: object, n: int) -> Tensor:
    """Class ids ``(N, K)`` from a tensor, a numpy array or (nested) sequences of integers.

    A 2-D form is ``(N, K)``. A flat form (1-D tensor or array, a list of
    integers) is one image's K ids when N is 1, and one id per image when its
    length is N; any other length is ambiguous and refused.
    """
    if isinstance(targets, np.ndarray | Tensor):
        _check_integer_dtype(targets)
        arr = (
            targets.detach().cpu()
            if isinstance(targets, Tensor)
            else torch.from_numpy(np.ascontiguousarray(targets))
        )
        ids = arr.long()
    elif isinstance(targets, Sequence) and not isinstance(targets, str | bytes):
        if all(_is_integer(v) for v in targets):
            ids = torch.tensor([_integer(v) for v in targets], dtype=torch.long)
        else:
            rows: list[list[int]] = []
            for row in targets:
                if isinstance(row, np.ndarray | Tensor):
                    _check_integer_dtype(row)
                    values = row.reshape(-1).tolist()
                elif isinstance(row, Sequence) and not isinstance(row, str | bytes):
                    values = list(row)
                else:
                    raise InvalidRequestError(
                        "targets must be an int k, class ids (one list per image, or one "
                        f"id per image) or a score function, got the item {row!r}"
                    )
                rows.append([_integer(v) for v in values])
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise InvalidRequestError(
                    f"every image needs the same number of class ids, got lengths {sorted(lengths)}"
                )
            ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)
    else:
        raise InvalidRequestError(
            "targets must be an int k, class ids (a list per image, a tensor or array (N, K)) "
            f"or a score function, got {type(targets).__name__}"
        )
    if ids.dim() == 1:
        if n == 1:
            ids = ids[None, :]
        elif ids.shape[0] == n:
            ids = ids[:, None]
        else:
            raise InvalidRequestError(
                f"a flat list of {ids.shape[0]} class ids for {n} images is ambiguous; give one "
                f"id per image ({n} ids) or one list of ids per image ([[...], ...])"
            )
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 1:
        raise InvalidRequestError(
            f"class ids must have shape (N={n}, K>=1), got {tuple(ids.shape)}"
        )
    return ids


def _is_integer(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return (
        isinstance(value, np.ndarray | Tensor)
        and value.ndim == 0
        and (
            value.dtype.kind in "iu"
            if isinstance(value, np.ndarray)
            else not (
                value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
            )
        )
    )


def _integer(value: object) -> int:
    if not _is_integer(value):
        raise InvalidRequestError(f"class ids must be integers, got {value!r}")
    return operator.index(value)  # type: ignore[arg-type]


def resolve_targets(
    targets: Targets, output: Any, n: int, score: str, device: torch.device
) -> tuple[Target, Tensor | None]:
    """Turn the caller's ``targets`` into class ids ``(N, K)`` (or a score function).

    A score function is called once here, in the caller's grad mode, and its
    ``(N, K)`` scores are returned beside the target (None for class targets).

    Args:
        targets: ``k`` (top-k classes by score; an int, a numpy integer or a
            0-d integer array/tensor), per-image class ids (``list[list[int]]``,
            an integer tensor or numpy array ``(N, K)``, a list of per-image
            arrays), a flat list / 1-D tensor / 1-D array (the K ids of the only
            image when N is 1, else one id per image; other lengths are
            ambiguous and refused), or a :data:`ScoreFn`.
        output: the model output of the N images (detached); class targets
            need its class scores (see :func:`~camserve.engine.outputs.find_logits`).
        n: the batch size N.
        score: ``"logit"`` or ``"probability"``.
        device: where the rows index of a score function lives.

    Raises:
        InvalidRequestError: bad k, ragged, mis-shaped, ambiguous or
            non-integer ids, or an output without unambiguous class scores.
        UnknownNameError: an unknown score kind, or a class id out of range.
    """
    if score not in SCORES:
        raise UnknownNameError("score", score, SCORES)
    if callable(targets) and not isinstance(targets, Tensor):
        rows = torch.arange(n, device=device)
        probe = targets(output, rows) if _accepts_rows(targets) else targets(output)
        if (
            not isinstance(probe, Tensor)
            or probe.dim() != 2
            or probe.shape[0] != n
            or probe.shape[1] < 1
        ):
            shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
            raise InvalidRequestError(
                f"the score function must return a Tensor (N={n}, K>=1), got {shape}"
            )
        if not probe.is_floating_point():
            raise InvalidRequestError(f"the score function must return floats, got {probe.dtype}")
        kf = int(probe.shape[1])
        return Target(torch.arange(kf).expand(n, kf).clone(), score, targets), probe
    logits = require_logits(output, n)
    c = int(logits.shape[1])
    k = _as_k(targets)
    if k is not None:
        if not 1 <= k <= c:
            raise InvalidRequestError(
                f"targets (top-k) must be in 1..{c} for a model with {c} classes, got {k}"
            )
        ids = logits.detach().float().topk(k, dim=1).indices
        return Target(ids.cpu(), score), None
    ids = _class_ids(targets, n)
    bad = ids[(ids < 0) | (ids >= c)]
    if bad.numel():
        raise UnknownNameError("class", int(bad[0]), range(c))
    return Target(ids, score), None
