"""TorchServe handler: a caption plus a Grad-CAM map per word and for the whole caption.

001 Fig. A2 shows what these maps look like.

The shared work is in :mod:`camserve_base` (shipped in the archive beside this file).
"""

from __future__ import annotations

from camserve_base import CamserveHandler


class CaptionHandler(CamserveHandler):
    """Captioner: the caption, and per word and for the whole caption, the requested maps."""

    kind = "captioner"
