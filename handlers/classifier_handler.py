"""TorchServe handler: predictions plus CAM maps for an image classifier.

The shared work is in :mod:`camserve_base` (shipped in the archive beside this file).
"""

from __future__ import annotations

from camserve_base import CamserveHandler


class ClassifierHandler(CamserveHandler):
    """Image classifier: top-k predictions and, per requested class and method, a map."""

    kind = "classifier"
