"""Fixtures of the ONNX tests: the zoo store, real held-out inputs, graphs exported once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import Tensor, nn

from camserve.export import ExportReport, export_onnx
from camserve.export.zoo import zoo_example
from camserve.zoo.store import ModelEntry, load
from tests.zoo.conftest import zoo_store

__all__ = ["zoo_store"]

Exported = tuple[nn.Module, ModelEntry, ExportReport]


@pytest.fixture(scope="session")
def exported(
    zoo_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Exported]:
    """``exported(name)``: the zoo model, its entry and its export report (exported once)."""
    cache: dict[str, Exported] = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name: str) -> Exported:
        if name not in cache:
            model, entry = load(zoo_store, name)
            report = export_onnx(
                model,
                zoo_example(zoo_store, entry),
                entry.target_layer,
                folder / f"{name}.onnx",
                targets=5,
            )
            cache[name] = (model, entry, report)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def real_inputs(zoo_store: Path) -> Callable[[str, int], tuple[Tensor, ...]]:
    """``real_inputs(name, n)``: n held-out scenes (and questions) of a zoo model."""

    def get(name: str, n: int) -> tuple[Tensor, ...]:
        _, entry = load(zoo_store, name)
        return zoo_example(zoo_store, entry, n)

    return get
