"""Serving a model spec with ``runtime = "onnx"``: the plug-in of :data:`camserve.models.RUNTIMES`.

:func:`onnx_runtime` opens the spec's ONNX file in an onnxruntime session and
returns the binding :func:`camserve.models.load_model` puts into the loaded
model: at the graph's layer a :class:`~camserve.export.FallbackExplainer`
(onnxruntime where the graph can answer, the torch engine otherwise), at every
other layer the torch engine. A classifier spec with the ONNX file alone (no
factory, no program) is served by the graph alone: predictions from its
``logits`` output, and the methods it computes (the others are refused with
:class:`~camserve.errors.UnsupportedMethodError`, naming them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.errors import CamserveError
from camserve.export.runtime import FallbackExplainer, OnnxExplainer
from camserve.models.files import SpecError
from camserve.models.loading import LayerExplainer, RuntimeBinding
from camserve.models.spec import ModelSpec

__all__ = ["OnnxLogits", "onnx_runtime"]


class OnnxLogits(nn.Module):
    """A classifier's graph as a module that predicts: ``forward(images) -> logits (N, C)``.

    It stands for the torch model of a spec that has none: the service's
    predictions (and ``predict_only`` requests) call it; it has no parameters
    and no autograd (the graph's own gradients serve the maps).

    Args:
        onnx: the graph's explainer.
    """

    def __init__(self, onnx: OnnxExplainer) -> None:
        super().__init__()
        self.onnx = onnx

    def forward(self, images: Tensor) -> Tensor:
        """float32 logits ``(N, C)`` of images ``(N, 3, H, W)``."""
        return self.onnx.logits(images)


def onnx_runtime(spec: ModelSpec, device: torch.device) -> RuntimeBinding:
    """The onnxruntime binding of ``spec`` (``spec.onnx`` explains ``spec.layer``).

    Args:
        spec: a spec with ``runtime = "onnx"`` and an ``onnx`` file written by
            :func:`~camserve.export.export_onnx`.
        device: the torch model's device: a CUDA device asks onnxruntime for
            CUDA (when onnxruntime-gpu finds it), else the CPU provider. Idle
            onnxruntime threads sleep rather than spin (the torch engine and
            other requests share the cores).

    Raises:
        SpecError: no ``onnx`` file, a file onnxruntime cannot load or that is
            not a camserve export, a graph of another layer than ``spec.layer``;
            without a torch model: a kind other than classifier, or labels that
            do not match the graph's classes.
    """
    if spec.onnx is None:
        raise SpecError("onnx", None, "the onnx runtime needs an onnx file", spec.origin)
    path = Path(spec.onnx)
    if not path.is_file():
        raise SpecError("onnx", str(path), "no such file", spec.origin)
    try:
        onnx = OnnxExplainer(
            path, provider=None if device.type == "cuda" else "cpu", spinning=False
        )
    except CamserveError as exc:
        raise SpecError("onnx", str(path), str(exc), spec.origin) from exc
    except Exception as exc:  # onnxruntime's own errors (not an ONNX file, bad graph)
        raise SpecError(
            "onnx", str(path), f"onnxruntime cannot load it: {exc}", spec.origin
        ) from exc
    if onnx.layers != (spec.layer,):
        raise SpecError(
            "layer",
            spec.layer,
            f"the ONNX graph {path.name} explains layer {onnx.layers[0]!r}",
            spec.origin,
        )

    def factory(torch_explainer: Explainer | None) -> LayerExplainer:
        if torch_explainer is None:  # no torch model: the graph alone
            return FallbackExplainer(onnx, None)
        if torch_explainer.layers != onnx.layers:
            return torch_explainer
        return FallbackExplainer(onnx, torch_explainer)

    if spec.factory is None and spec.program is None:
        if spec.kind != "classifier" or not onnx.classes:
            raise SpecError(
                "factory",
                None,
                "an ONNX file alone serves classifiers (class logits); a captioner or VQA "
                "model needs its torch model too (a factory or a program)",
                spec.origin,
            )
        if onnx.num_classes is not None and onnx.num_classes != len(spec.labels):
            raise SpecError(
                "labels",
                f"{len(spec.labels)} labels",
                f"the ONNX graph {path.name} has {onnx.num_classes} classes",
                spec.origin,
            )
        return RuntimeBinding(
            "onnx", onnx.device, onnx.provider, factory, model=OnnxLogits(onnx), layers=onnx.layers
        )
    return RuntimeBinding("onnx", onnx.device, onnx.provider, factory)
