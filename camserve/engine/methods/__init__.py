"""The method registry: one :class:`MethodSpec` per method id, the single source of truth.

A spec says what a method needs from the engine (layer gradients of which
kind, the guided gradient at the input, a re-run of the network), its
resolution, its options (types and ranges), its cost class, its pure function
and how the engine calls that function (:data:`Call`). The explainer
dispatches from the specs only, so adding a method means one function and one
spec in :data:`METHOD_SPECS`.

Methods are pure functions (see :mod:`.gradient`, :mod:`.activation`,
:mod:`.guided`, and the re-running methods in :mod:`.perturbation` and
:mod:`.reference`); they never register hooks or import the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from camserve.engine.methods import activation, gradient, guided, perturbation, reference
from camserve.engine.methods.guided import REDUCTIONS
from camserve.engine.methods.reference import IG_RULES
from camserve.errors import InvalidRequestError, UnknownNameError

__all__ = [
    "METHOD_SPECS",
    "Call",
    "CostClass",
    "GradKind",
    "MethodSpec",
    "OptionSpec",
    "activation",
    "check_options",
    "gradient",
    "list_methods",
    "method_spec",
    "option_names",
    "perturbation",
    "reference",
]

GradKind = Literal["normal", "guided", "deconv"]
"""Layer gradients: the true gradient, Guided-ReLU's, deconv-ReLU's (001 sec. 5.3.4)."""

CostClass = Literal["single_pass", "rerun"]
"""``single_pass``: a pure function of the shared forward/backward (cheap);
``rerun``: re-runs (part of) the network many times (Ablation-CAM, Score-CAM,
occlusion, Integrated Gradients, Gradient SHAP, and their guided products)."""

Call = Literal[
    "gradient",
    "head",
    "tail",
    "masked_input",
    "input_score",
    "input_gradient",
    "guided_backprop",
    "guided_product",
]
"""How the engine calls a method's function (``**options`` are its options):

- ``gradient``: ``fn(acts (N, C, h, w), grads (N, K, C, h, w), **options) -> (N, K, h, w)``
  with the layer gradients of the spec's single kind; with ``logit_gradient``
  also ``logit_grads=`` (the pre-softmax score's gradients, or None); with
  ``returns_stats`` it returns ``(maps, stats)``.
- ``head``: ``fn(acts, class_weights (N, K, C))``, the weights of the model's
  GAP + linear head (CAM).
- ``tail``: ``fn(acts, target_scores (N, K), tail, **options)`` where
  ``tail(i, acts (B, C, h, w)) -> (B, K)`` re-runs the network after the layer.
- ``masked_input``: ``fn(images, acts, score, **options)`` where
  ``score(i, x (B, ...)) -> (B, K)`` runs the whole model.
- ``input_score``: ``fn(images, target_scores, score, **options)``.
- ``input_gradient``: ``fn(images, input_grad, **options)`` where
  ``input_grad(i, x) -> (scores (B, K), grads (B, K, ...))``.
- ``guided_backprop``: ``fn(guided input gradients (N, K, C, H, W), **options)``.
- ``guided_product``: ``fn(guided_backprop map, map of the spec's base method)``.
"""


@dataclass(frozen=True)
class OptionSpec:
    """One option of a method: its accepted types and its allowed values.

    Attributes:
        types: accepted Python types (``bool`` is accepted only when listed).
        choices: the allowed values, or None for any value of ``types``.
        minimum: the smallest allowed number (inclusive), or None.
        maximum: the largest allowed number (inclusive), or None.
        finite: numbers must be finite (no NaN, no inf).
    """

    types: tuple[type, ...]
    choices: tuple[object, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    finite: bool = True

    def check(self, method: str, name: str, value: object) -> None:
        """Validate ``value`` for option ``method.name``.

        Raises:
            InvalidRequestError: a value of the wrong type or out of range.
            UnknownNameError: a value outside :attr:`choices`.
        """
        if not isinstance(value, self.types) or (
            isinstance(value, bool) and bool not in self.types
        ):
            names = "/".join(t.__name__ for t in self.types)
            raise InvalidRequestError(f"option {method}.{name} must be {names}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UnknownNameError(f"{method}.{name} value", value, self.choices)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.finite and not math.isfinite(value):
                raise InvalidRequestError(
                    f"option {method}.{name} must be a finite number, got {value!r}"
                )
            if self.minimum is not None and value < self.minimum:
                raise InvalidRequestError(
                    f"option {method}.{name} must be >= {self.minimum:g}, got {value!r}"
                )
            if self.maximum is not None and value > self.maximum:
                raise InvalidRequestError(
                    f"option {method}.{name} must be <= {self.maximum:g}, got {value!r}"
                )

    def describe(self) -> str:
        """A one-line human description (``int in [1, 4096]``)."""
        text = "/".join(t.__name__ for t in self.types)
        if self.choices is not None:
            return f"{text} in {{{', '.join(map(str, self.choices))}}}"
        if self.minimum is not None or self.maximum is not None:
            lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
            hi = "inf" if self.maximum is None else f"{self.maximum:g}"
            return f"{text} in [{lo}, {hi}]"
        return text


@dataclass(frozen=True)
class MethodSpec:
    """What one method id needs from the engine, what it costs, and how it is called.

    Attributes:
        id: the method id.
        resolution: ``layer`` (maps ``(N, K, h, w)`` at a layer) or ``input``
            (``(N, K, H, W)`` at the input, layer key ``"input"``).
        gradients: the kinds of layer gradients it reads (``normal``, ``guided``,
            ``deconv``); empty for methods that read none.
        input_gradient: it needs the guided-backprop gradient at the input.
        rerun: the method re-running the network, if any (itself, or the map
            method of a ``guided_<m>`` product).
        cost: its cost class; requests are grouped with cheap ones only when
            every method is ``single_pass``.
        options: option name -> :class:`OptionSpec` (types and ranges).
        function: the pure implementation (see :data:`Call`).
        call: how the engine calls :attr:`function`.
        base: for ``guided_<m>``, the layer method ``m`` whose map is multiplied.
        logit_gradient: also needs the pre-softmax score's gradient when the
            explained score is a probability (Grad-CAM++'s alphas, 002 eq. 9).
        returns_stats: the function returns ``(maps, stats)``.
        source: the paper and equation it implements.
    """

    id: str
    resolution: Literal["layer", "input"]
    gradients: frozenset[GradKind]
    input_gradient: bool
    rerun: str | None
    cost: CostClass
    options: Mapping[str, OptionSpec]
    function: Callable[..., Any] = field(repr=False, compare=False)
    call: Call = "gradient"
    base: str | None = None
    logit_gradient: bool = False
    returns_stats: bool = False
    source: str = ""

    @property
    def gradient_kind(self) -> GradKind:
        """The single gradient kind of a ``gradient`` method."""
        (kind,) = self.gradients
        return kind


_BATCH = OptionSpec((int,), minimum=1, maximum=4096)
_GUIDED_OPTIONS = {"reduce": OptionSpec((str,), REDUCTIONS)}


def _gradient_spec(
    mid: str,
    fn: Callable[..., Any],
    kind: GradKind,
    source: str,
    options: Mapping[str, OptionSpec] | None = None,
    **extra: Any,
) -> MethodSpec:
    return MethodSpec(
        mid,
        "layer",
        frozenset({kind}),
        False,
        None,
        "single_pass",
        options or {},
        fn,
        "gradient",
        source=source,
        **extra,
    )


def _rerun_spec(
    mid: str,
    resolution: Literal["layer", "input"],
    fn: Callable[..., Any],
    call: Call,
    options: Mapping[str, OptionSpec],
    source: str,
) -> MethodSpec:
    return MethodSpec(
        mid,
        resolution,
        frozenset(),
        False,
        mid,
        "rerun",
        {"batch_size": _BATCH, **options},
        fn,
        call,
        source=source,
    )


_LAYER_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "cam",
        "layer",
        frozenset(),
        False,
        None,
        "single_pass",
        {},
        activation.cam,
        "head",
        source="000 eq. 1 (class activation mapping)",
    ),
    _gradient_spec("gradcam", gradient.gradcam, "normal", "001 eq. 1-2"),
    _gradient_spec("gradcam_pos", gradient.gradcam_pos, "normal", "002 eq. 4 (Grad-CAM+)"),
    _gradient_spec(
        "gradcampp",
        gradient.gradcampp,
        "normal",
        "002 eq. 9",
        logit_gradient=True,
        returns_stats=True,
        options={"normalize_alpha": OptionSpec((bool,)), "stats": OptionSpec((bool,))},
    ),
    _gradient_spec("xgradcam", gradient.xgradcam, "normal", "000 eq. 9, 004"),
    _rerun_spec(
        "ablationcam",
        "layer",
        perturbation.ablation_cam,
        "tail",
        {"form": OptionSpec((str,), ("score", "sum"))},
        "Desai & Ramaswamy 2020 eq. 3; 000",
    ),
    _rerun_spec(
        "scorecam",
        "layer",
        perturbation.score_cam,
        "masked_input",
        {},
        "Wang et al. 2020 eq. 6-8",
    ),
    _gradient_spec("layercam", gradient.layercam, "normal", "Jiang et al. 2021 eq. 4-5"),
    _gradient_spec("hirescam", gradient.hirescam, "normal", "Draelos & Carin 2020"),
    _gradient_spec("counterfactual", gradient.counterfactual, "normal", "001 sec. 5.3"),
    _gradient_spec("gradcam_norelu", gradient.gradcam_norelu, "normal", "001 Table A2"),
    _gradient_spec("gradcam_abs", gradient.gradcam_abs, "normal", "001 Table A2"),
    _gradient_spec("gradcam_gmp", gradient.gradcam_gmp, "normal", "001 Table A2"),
    _gradient_spec("gradcam_guidedrelu", gradient.gradcam, "guided", "001 Table A2, sec. 5.3.4"),
    _gradient_spec("gradcam_deconvrelu", gradient.gradcam, "deconv", "001 Table A2, sec. 5.3.4"),
)


def _guided_product_spec(base: MethodSpec) -> MethodSpec:
    return MethodSpec(
        id=f"guided_{base.id}",
        resolution="input",
        gradients=base.gradients,
        input_gradient=True,
        rerun=base.rerun,
        cost=base.cost,
        options={**base.options, **_GUIDED_OPTIONS},
        function=guided.guided_product,
        call="guided_product",
        base=base.id,
        logit_gradient=base.logit_gradient,
        source=f"001 sec. 2 (Guided Grad-CAM), 004; the map of {base.id}: {base.source}",
    )


_INPUT_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "guided_backprop",
        "input",
        frozenset(),
        True,
        None,
        "single_pass",
        _GUIDED_OPTIONS,
        guided.guided_backprop,
        "guided_backprop",
        source="Springenberg et al. 2015; 001 sec. 2",
    ),
    *(_guided_product_spec(s) for s in _LAYER_SPECS),
    _rerun_spec(
        "occlusion",
        "input",
        perturbation.occlusion,
        "input_score",
        {
            "mask": OptionSpec((int,), minimum=1, maximum=4096),
            "stride": OptionSpec((int,), minimum=1, maximum=4096),
            "fill": OptionSpec((float, int)),
        },
        "001 sec. 5.1 (Zeiler & Fergus occlusion)",
    ),
    _rerun_spec(
        "integrated_gradients",
        "input",
        reference.integrated_gradients,
        "input_gradient",
        {
            "baseline": OptionSpec((Tensor, type(None))),
            "steps": OptionSpec((int,), minimum=1, maximum=1024),
            "rule": OptionSpec((str,), IG_RULES),
        },
        "Sundararajan et al. 2017 eq. 1; 003",
    ),
    _rerun_spec(
        "gradient_shap",
        "input",
        reference.gradient_shap,
        "input_gradient",
        {
            "baselines": OptionSpec((Tensor, type(None))),
            "samples": OptionSpec((int,), minimum=1, maximum=1024),
            "stdev": OptionSpec((float, int), minimum=0.0),
            "seed": OptionSpec((int,), minimum=0),
        },
        "Lundberg & Lee 2017 (expected gradients); 003",
    ),
)

METHOD_SPECS: dict[str, MethodSpec] = {s.id: s for s in (*_LAYER_SPECS, *_INPUT_SPECS)}
"""Every method id -> its :class:`MethodSpec` (layer methods first, in the README's order)."""


def _check_registry() -> None:
    for spec in METHOD_SPECS.values():
        if spec.call == "gradient" and len(spec.gradients) != 1:  # pragma: no cover
            raise AssertionError(f"{spec.id}: a gradient method reads exactly one kind")
        if (spec.cost == "rerun") != (spec.rerun is not None):  # pragma: no cover
            raise AssertionError(f"{spec.id}: cost and rerun disagree")
        if spec.base is not None and METHOD_SPECS[spec.base].resolution != "layer":
            raise AssertionError(f"{spec.id}: base must be a layer method")  # pragma: no cover


_check_registry()


def list_methods() -> list[str]:
    """Every method id the engine knows."""
    return list(METHOD_SPECS)


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``.

    Raises:
        UnknownNameError: an unknown method id (the message lists the valid ones).
    """
    spec = METHOD_SPECS.get(method)
    if spec is None:
        raise UnknownNameError("method", method, METHOD_SPECS)
    return spec


def option_names(method: str) -> list[str]:
    """The options ``method`` accepts.

    Raises:
        UnknownNameError: an unknown method id.
    """
    return sorted(method_spec(method).options)


def check_options(options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Validate ``explain(options=...)``: known methods, known option names, types and ranges.

    Options given for ``guided_backprop`` also apply to every ``guided_<m>``;
    options of ``m`` also apply to the map of ``guided_<m>``.

    Raises:
        UnknownNameError: an unknown method or option name, or a value outside
            the option's choices.
        InvalidRequestError: a value of the wrong type or out of range.
    """
    out: dict[str, dict[str, Any]] = {}
    for method, opts in (options or {}).items():
        spec = method_spec(method)
        if not isinstance(opts, Mapping):
            raise InvalidRequestError(
                f"options[{method!r}] must be a mapping, got {type(opts).__name__}"
            )
        for name, value in opts.items():
            option = spec.options.get(name)
            if option is None:
                raise UnknownNameError(
                    "option", f"{method}.{name}", [f"{method}.{n}" for n in spec.options]
                )
            option.check(method, name, value)
        out[method] = dict(opts)
    return out
