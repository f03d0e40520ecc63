"""Which scores to explain: top-k classes, given class ids, or any score function.

A target is separate from a method: a class logit, a class probability (002
footnote 1), a caption word's log-probability or a VQA answer's score all
plug in as a :data:`ScoreFn` without changing the engine (001 sec. 2.2, 2.3).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

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

Targets: TypeAlias = int | Sequence[Sequence[int]] | Tensor | ScoreFn
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
        logits = _as_logits(output)
        if self.score == "probability" and kind == "chosen":
            logits = torch.softmax(logits.float(), dim=1).to(logits.dtype)
        return logits.gather(1, ids.to(logits.device))


def _as_logits(output: Any) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() != 2 or not output.is_floating_point():
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise InvalidRequestError(
            f"class targets need a model output of shape (N, C) floats, got {shape}; "
            "pass a score function as targets for other outputs"
        )
    return output


def resolve_targets(
    targets: Targets, output: Any, n: int, score: str, device: torch.device
) -> tuple[Target, Tensor | None]:
    """Turn the caller's ``targets`` into class ids ``(N, K)`` (or a score function).

    A score function is called once here, in the caller's grad mode, and its
    ``(N, K)`` scores are returned beside the target (None for class targets).

    Args:
        targets: ``k`` (top-k classes by score), per-image class ids
            (``list[list[int]]`` or LongTensor ``(N, K)``), or a :data:`ScoreFn`.
        output: the model output of the N images (detached).
        n: the batch size N.
        score: ``"logit"`` or ``"probability"``.
        device: where the rows index of a score function lives.

    Raises:
        InvalidRequestError: bad k, ragged or mis-shaped ids.
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
        k = int(probe.shape[1])
        return Target(torch.arange(k).expand(n, k).clone(), score, targets), probe
    logits = _as_logits(output)
    c = int(logits.shape[1])
    if isinstance(targets, bool):
        raise InvalidRequestError(
            f"targets must be an int k, class ids or a score function, got {targets!r}"
        )
    if isinstance(targets, int):
        if not 1 <= targets <= c:
            raise InvalidRequestError(
                f"targets (top-k) must be in 1..{c} for a model with {c} classes, got {targets}"
            )
        ids = logits.detach().float().topk(targets, dim=1).indices
        return Target(ids.cpu(), score), None
    if isinstance(targets, Tensor):
        if (
            targets.dtype.is_floating_point
            or targets.dtype.is_complex
            or targets.dtype == torch.bool
        ):
            raise InvalidRequestError(
                f"class ids must be an integer tensor, got dtype {targets.dtype}"
            )
        ids = targets.detach().long().cpu()
        if ids.dim() == 1:
            ids = ids[:, None]
    else:
        try:
            id_rows = [[int(v) for v in row] for row in targets]
        except TypeError as exc:
            raise InvalidRequestError(
                "targets must be an int k, per-image class ids (list of lists) "
                f"or a score function, got {targets!r}"
            ) from exc
        lengths = {len(r) for r in id_rows}
        if len(lengths) > 1:
            raise InvalidRequestError(
                f"every image needs the same number of class ids, got lengths {sorted(lengths)}"
            )
        ids = torch.tensor(id_rows, dtype=torch.long).reshape(len(id_rows), -1)
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 1:
        raise InvalidRequestError(
            f"class ids must have shape (N={n}, K>=1), got {tuple(ids.shape)}"
        )
    bad = ids[(ids < 0) | (ids >= c)]
    if bad.numel():
        raise UnknownNameError("class", int(bad[0]), range(c))
    return Target(ids, score), None
