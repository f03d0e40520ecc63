"""camserve: predictions and class activation maps of the Grad-CAM family in one call.

Layers: :mod:`camserve.engine` (explanations, no serving), :mod:`camserve.service`
(typed requests and outcomes, the explanation service every front door calls),
:mod:`camserve.models` (model specs and loaders), :mod:`camserve.codecs` (wire
formats), :mod:`camserve.render` (boxes, colour maps, overlays),
:mod:`camserve.torchserve` (TorchServe), :mod:`camserve.zoo` (demo models and data).
"""

__version__ = "0.1.0"
