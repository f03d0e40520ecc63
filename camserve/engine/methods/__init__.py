"""The method registry: ids, what each needs from the engine, and their options.

Methods are pure functions (see :mod:`.gradient`, :mod:`.activation`,
:mod:`.guided`, and the re-running methods in :mod:`.perturbation` and
:mod:`.reference`); they never register hooks or import the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from camserve.engine.methods import activation, gradient, perturbation, reference
from camserve.engine.methods.guided import REDUCTIONS
from camserve.errors import InvalidRequestError, UnknownNameError

__all__ = [
    "GRADIENT_METHODS",
    "INPUT_METHODS",
    "LAYER_METHODS",
    "METHOD_SPECS",
    "RERUN_METHODS",
    "CostClass",
    "GradKind",
    "MethodSpec",
    "activation",
    "check_options",
    "gradient",
    "list_methods",
    "method_spec",
    "perturbation",
    "reference",
    "rerun_function",
]

GradKind = Literal["normal", "guided", "deconv"]

GradientMethod = Callable[[Tensor, Tensor], Tensor]

GRADIENT_METHODS: dict[str, tuple[GradientMethod, GradKind]] = {
    "gradcam": (gradient.gradcam, "normal"),
    "gradcam_pos": (gradient.gradcam_pos, "normal"),
    "xgradcam": (gradient.xgradcam, "normal"),
    "layercam": (gradient.layercam, "normal"),
    "hirescam": (gradient.hirescam, "normal"),
    "counterfactual": (gradient.counterfactual, "normal"),
    "gradcam_norelu": (gradient.gradcam_norelu, "normal"),
    "gradcam_abs": (gradient.gradcam_abs, "normal"),
    "gradcam_gmp": (gradient.gradcam_gmp, "normal"),
    "gradcam_guidedrelu": (gradient.gradcam, "guided"),
    "gradcam_deconvrelu": (gradient.gradcam, "deconv"),
}
"""Methods whose map is a pure function of (activations, gradients of one kind)."""

RERUN_METHODS: dict[str, Callable[..., Tensor]] = {
    "ablationcam": perturbation.ablation_cam,
    "scorecam": perturbation.score_cam,
    "occlusion": perturbation.occlusion,
    "integrated_gradients": reference.integrated_gradients,
    "gradient_shap": reference.gradient_shap,
}
"""Re-running methods: id -> pure implementation (options go to its keyword arguments)."""

LAYER_METHODS: tuple[str, ...] = (
    "cam",
    "gradcam",
    "gradcam_pos",
    "gradcampp",
    "xgradcam",
    "ablationcam",
    "scorecam",
    "layercam",
    "hirescam",
    "counterfactual",
    "gradcam_norelu",
    "gradcam_abs",
    "gradcam_gmp",
    "gradcam_guidedrelu",
    "gradcam_deconvrelu",
)
"""Methods giving maps ``(N, K, h, w)`` at a layer's resolution."""

INPUT_METHODS: tuple[str, ...] = (
    "guided_backprop",
    *(f"guided_{m}" for m in LAYER_METHODS),
    "occlusion",
    "integrated_gradients",
    "gradient_shap",
)
"""Methods giving maps ``(N, K, H, W)`` at the input resolution (layer key ``"input"``)."""

# method id -> option name -> (accepted types, allowed values or None)
_OPTIONS: dict[str, dict[str, tuple[tuple[type, ...], tuple[object, ...] | None]]] = {
    "gradcampp": {"normalize_alpha": ((bool,), None), "stats": ((bool,), None)},
    "ablationcam": {"form": ((str,), ("score", "sum")), "batch_size": ((int,), None)},
    "scorecam": {"batch_size": ((int,), None)},
    "occlusion": {
        "mask": ((int,), None),
        "stride": ((int,), None),
        "fill": ((float, int), None),
        "batch_size": ((int,), None),
    },
    "integrated_gradients": {
        "baseline": ((Tensor, type(None)), None),
        "steps": ((int,), None),
        "rule": ((str,), None),
        "batch_size": ((int,), None),
    },
    "gradient_shap": {
        "baselines": ((Tensor, type(None)), None),
        "samples": ((int,), None),
        "stdev": ((float, int), None),
        "seed": ((int,), None),
        "batch_size": ((int,), None),
    },
    "guided_backprop": {"reduce": ((str,), REDUCTIONS)},
}
_POSITIVE = {"batch_size", "mask", "stride", "steps", "samples"}


def list_methods() -> list[str]:
    """Every method id the engine knows."""
    return [*LAYER_METHODS, *INPUT_METHODS]


def option_names(method: str) -> list[str]:
    """The options ``method`` accepts."""
    return sorted(_OPTIONS.get(method, {}))


def check_options(options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Validate ``explain(options=...)``: known methods, known option names, sane values.

    Options for ``guided_backprop`` also apply to every ``guided_<m>``.

    Raises:
        UnknownNameError: an unknown method or option name.
        InvalidRequestError: a value of the wrong type or out of range.
    """
    out: dict[str, dict[str, Any]] = {}
    known = list_methods()
    for method, opts in (options or {}).items():
        if method not in known:
            raise UnknownNameError("method", method, known)
        if not isinstance(opts, Mapping):
            raise InvalidRequestError(
                f"options[{method!r}] must be a mapping, got {type(opts).__name__}"
            )
        spec = _OPTIONS.get(method, {})
        for name, value in opts.items():
            if name not in spec:
                raise UnknownNameError(
                    "option", f"{method}.{name}", [f"{method}.{n}" for n in spec]
                )
            types, allowed = spec[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = "/".join(t.__name__ for t in types)
                raise InvalidRequestError(f"option {method}.{name} must be {names}, got {value!r}")
            if allowed is not None and value not in allowed:
                raise UnknownNameError(f"{method}.{name} value", value, allowed)
            if name in _POSITIVE and isinstance(value, int) and value < 1:
                raise InvalidRequestError(f"option {method}.{name} must be >= 1, got {value}")
        out[method] = dict(opts)
    return out


def rerun_function(method: str) -> Callable[..., Tensor]:
    """The pure implementation of a re-running method (Ablation-CAM, Score-CAM, ...)."""
    return RERUN_METHODS[method]


CostClass = Literal["single_pass", "rerun"]
"""``single_pass``: a pure function of the shared forward/backward (cheap);
``rerun``: re-runs (part of) the network many times (Ablation-CAM, Score-CAM,
occlusion, Integrated Gradients, Gradient SHAP, and their guided products)."""


@dataclass(frozen=True)
class MethodSpec:
    """What one method id needs from the engine and what it costs.

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
        options: option name -> (accepted types, allowed values or None).
    """

    id: str
    resolution: Literal["layer", "input"]
    gradients: frozenset[GradKind]
    input_gradient: bool
    rerun: str | None
    cost: CostClass
    options: Mapping[str, tuple[tuple[type, ...], tuple[object, ...] | None]]


def _spec(method: str) -> MethodSpec:
    base = method
    guided = method.startswith("guided_") and method != "guided_backprop"
    if guided:
        base = method.removeprefix("guided_")
    grads: set[GradKind] = set()
    if base in GRADIENT_METHODS:
        grads.add(GRADIENT_METHODS[base][1])
    elif base == "gradcampp":
        grads.add("normal")
    rerun = base if base in RERUN_METHODS else None
    options = dict(_OPTIONS.get(base, {}))
    if guided or method == "guided_backprop":
        options.update(_OPTIONS["guided_backprop"])
    return MethodSpec(
        id=method,
        resolution="input" if method in INPUT_METHODS else "layer",
        gradients=frozenset(grads),
        input_gradient=guided or method == "guided_backprop",
        rerun=rerun,
        cost="rerun" if rerun is not None else "single_pass",
        options=options,
    )


METHOD_SPECS: dict[str, MethodSpec] = {m: _spec(m) for m in list_methods()}
"""Every method id -> its :class:`MethodSpec`."""


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``.

    Raises:
        UnknownNameError: an unknown method id (the message lists the valid ones).
    """
    spec = METHOD_SPECS.get(method)
    if spec is None:
        raise UnknownNameError("method", method, METHOD_SPECS)
    return spec
