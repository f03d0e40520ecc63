"""The explanation engine: predictions and Grad-CAM-family maps from one pass.

Example:
    >>> from camserve.engine import Explainer
    >>> ex = Explainer(model, "layer4")  # doctest: +SKIP
    >>> res = ex.explain(images, methods=("gradcam", "gradcampp"), targets=5)  # doctest: +SKIP
    >>> res.upsampled("gradcam").shape  # (N, 5, H, W)  # doctest: +SKIP
"""

from camserve.engine.explainer import Explainer
from camserve.engine.explanation import INPUT_LAYER, Explanation
from camserve.engine.methods import list_methods
from camserve.engine.targets import ScoreFn

__all__ = ["INPUT_LAYER", "Explainer", "Explanation", "ScoreFn", "list_methods"]
