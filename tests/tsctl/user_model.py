"""A user's own model written into a folder: a factory module, a state dict, labels, a spec."""

from __future__ import annotations

import textwrap
from pathlib import Path

MODULE = "camserve_user_nets"
NAME = "user_tiny"
LABELS = ("apple", "pear", "plum")
SIZE = 32

FACTORY = textwrap.dedent(
    """
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, classes)

        def forward(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1))


    def tiny(classes: int = 3) -> nn.Module:
        return TinyNet(classes)
    """
)


def write_user_model(folder: Path, layer: str = "features.2") -> Path:
    """Writes the module (importable from ``folder``), weights, labels and spec; returns the spec.

    The caller puts ``folder`` on ``sys.path`` / ``PYTHONPATH`` (the factory's module
    must be importable where the model is loaded, as any installed package would be).
    """
    import importlib
    import sys

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(FACTORY)
    sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        module = importlib.import_module(MODULE)
        torch.manual_seed(0)
        torch.save(module.tiny(len(LABELS)).state_dict(), folder / "tiny.pt")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    spec = folder / "tiny.toml"
    spec.write_text(
        textwrap.dedent(
            f"""
            name = "{NAME}"
            kind = "classifier"
            layer = "{layer}"
            input_size = [3, {SIZE}, {SIZE}]
            labels_file = "labels.txt"
            factory = "{MODULE}:tiny"
            weights = "tiny.pt"

            [factory_kwargs]
            classes = {len(LABELS)}
            """
        )
    )
    return spec
