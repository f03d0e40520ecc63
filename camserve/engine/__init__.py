"""The explanation engine: predictions and Grad-CAM-family maps from one pass.

Example:
    >>> from camserve.engine import Explainer
    >>> ex = Explainer(model, "layer4")  # doctest: +SKIP
    >>> res = ex.explain(images, methods=("gradcam", "gradcampp"), targets=5)  # doctest: +SKIP
    >>> res.upsampled("gradcam").shape  # (N, 5, H, W)  # doctest: +SKIP

Token layers (ViT, DeiT, Swin) are read automatically, or with a layout:
    >>> Explainer(vit, vit.blocks[-1].norm1, layout=TokenGrid(prefix=1))  # doctest: +SKIP
"""

from camserve.engine.explainer import Explainer
from camserve.engine.explanation import INPUT_LAYER, Explanation
from camserve.engine.layout import Layout, TokenGrid
from camserve.engine.methods import MethodSpec, list_methods, method_spec
from camserve.engine.outputs import NonFiniteOutputError
from camserve.engine.targets import ScoreFn

__all__ = [
    "INPUT_LAYER",
    "Explainer",
    "Explanation",
    "Layout",
    "MethodSpec",
    "NonFiniteOutputError",
    "ScoreFn",
    "TokenGrid",
    "list_methods",
    "method_spec",
]
