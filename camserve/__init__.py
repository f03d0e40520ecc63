"""camserve: predictions and class activation maps of the Grad-CAM family in one call.

Layers: :mod:`camserve.engine` (explanations, no serving), :mod:`camserve.zoo`
(demo models and data), :mod:`camserve.serving` (codec and metrics shared by the
TorchServe handlers and the gRPC gateway).
"""

__version__ = "0.1.0"
