"""ONNX export and the onnxruntime explainer, with their commands.

:func:`export_onnx` writes a graph whose one onnxruntime call gives the
predictions, a layer's activations and the gradients of the target scores
with respect to it (and CAM maps for a GAP + linear head);
:class:`OnnxExplainer` turns them into the Grad-CAM family with the torch
engine's own method functions. ``export_zoo`` lives in
:mod:`camserve.export.zoo` (it needs the demo zoo).
"""

from camserve.export.exporter import DEFAULT_TOLERANCE, ExportReport, export_onnx
from camserve.export.runtime import (
    GRAPH_METHODS,
    FallbackExplainer,
    OnnxExplainer,
    select_providers,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "GRAPH_METHODS",
    "ExportReport",
    "FallbackExplainer",
    "OnnxExplainer",
    "export_onnx",
    "select_providers",
]
