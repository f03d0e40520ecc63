"""Synthetic scenes with ground truth and the demo models trained on them.

This package knows nothing of serving; the engine is used only by its tests.
"""
