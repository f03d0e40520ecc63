"""Synthetic scenes with ground truth and the demo models trained on them.

This package knows nothing of serving; the engine is used only by its tests.
Build the store with ``python -m camserve.zoo.build --out model_store``, then
``model, entry = camserve.zoo.load("model_store", "resnet_gap")``.
"""

from camserve.zoo.store import ModelEntry, load, read_manifest

__all__ = ["ModelEntry", "load", "read_manifest"]
