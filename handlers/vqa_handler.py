"""TorchServe handler: a VQA answer with maps for it and for other answers (counterfactual).

001 Fig. A3: "why green and not yellow" is the map of each named answer.

The shared work is in :mod:`camserve_base` (shipped in the archive beside this file).
"""

from __future__ import annotations

from camserve_base import CamserveHandler


class VQAHandler(CamserveHandler):
    """VQA: the answer, its maps, and the maps of the answers the caller names (counterfactual)."""

    kind = "vqa"
