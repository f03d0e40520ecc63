"""A classifier served from its ONNX file alone (no factory, no program): the graph predicts
and explains what it computes, the rest is refused by name, and the answers equal torch's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from camserve.errors import UnsupportedMethodError
from camserve.export import GRAPH_METHODS
from camserve.models import ModelSpec, SpecError, load_model, read_spec, write_spec
from camserve.service import ExplainError, ExplainRequest, ExplainResult, ExplainService
from tests.export.conftest import Exported


@pytest.fixture(scope="module")
def specs(exported: Callable[[str], Exported], zoo_store: Path) -> tuple[ModelSpec, ModelSpec]:
    """(the zoo's torch spec of resnet_gap, the same model as its ONNX file alone)."""
    _, _, report = exported("resnet_gap")
    torch_spec = read_spec(zoo_store / "resnet_gap.toml")
    alone = replace(
        torch_spec,
        name="gap_alone",
        factory=None,
        factory_kwargs={},
        weights=None,
        runtime="onnx",
        onnx=report.path,
    )
    return torch_spec, alone


def image(zoo_store: Path, i: int) -> bytes:
    return (zoo_store / "examples" / f"scene_{i}.png").read_bytes()


def test_a_spec_file_with_the_onnx_file_alone_reads_and_loads(
    specs: tuple[ModelSpec, ModelSpec], tmp_path: Path
) -> None:
    _, alone = specs
    again = read_spec(write_spec(alone, tmp_path / "alone.toml"))
    assert (again.factory, again.program, again.runtime) == (None, None, "onnx")
    loaded = load_model(again)
    assert loaded.layers == (alone.layer,) and loaded.runtime == "onnx"
    assert not any(True for _ in loaded.model.parameters())  # no torch weights at all


def test_the_graph_alone_answers_as_the_torch_model_does(
    specs: tuple[ModelSpec, ModelSpec], zoo_store: Path
) -> None:
    torch_spec, alone = specs
    service = ExplainService.from_specs([torch_spec, alone], device="cpu")
    methods = ("gradcam", "gradcampp", "layercam", "cam")
    for i in range(3):
        a, b = service.run(
            [
                ExplainRequest(model=name, image=image(zoo_store, i), methods=methods, top_k=3)
                for name in (torch_spec.name, alone.name)
            ]
        )
        assert isinstance(a, ExplainResult) and isinstance(b, ExplainResult), (a, b)
        assert [p.id for p in a.predictions] == [p.id for p in b.predictions]
        for p, q in zip(a.predictions, b.predictions, strict=True):
            assert p.probability == pytest.approx(q.probability, abs=1e-5)
        for s, t in zip(a.targets, b.targets, strict=True):
            assert s.id == t.id and s.score == pytest.approx(t.score, abs=1e-4)
            for m in methods:
                assert s.maps[m].box == t.maps[m].box
                np.testing.assert_allclose(s.maps[m].data, t.maps[m].data, atol=1e-4)
    # predictions alone come from the graph's logits
    a, b = service.run(
        [
            ExplainRequest(model=name, image=image(zoo_store, 1), predict_only=True, top_k=2)
            for name in (torch_spec.name, alone.name)
        ]
    )
    assert isinstance(a, ExplainResult) and isinstance(b, ExplainResult)
    assert [p.id for p in a.predictions] == [p.id for p in b.predictions] and not b.targets


def test_methods_the_graph_cannot_compute_are_refused_by_name(
    specs: tuple[ModelSpec, ModelSpec], zoo_store: Path
) -> None:
    _, alone = specs
    service = ExplainService.from_specs([alone], device="cpu")
    good, bad, other_layer = service.run(
        [
            ExplainRequest(model=alone.name, image=image(zoo_store, 0)),
            ExplainRequest(model=alone.name, image=image(zoo_store, 0), methods=("scorecam",)),
            ExplainRequest(model=alone.name, image=image(zoo_store, 0), layer="layer1"),
        ]
    )
    assert isinstance(good, ExplainResult)
    assert isinstance(bad, ExplainError) and isinstance(bad.error, UnsupportedMethodError)
    assert "scorecam" in str(bad.error)
    assert isinstance(other_layer, ExplainError) and "layer1" in str(other_layer.error)
    described = service.describe(alone.name)
    assert described.runtime == "onnx" and described.layers == (alone.layer,)
    assert {m.id for m in described.methods} == {"cam", *GRAPH_METHODS}


def test_what_the_graph_alone_cannot_serve_is_a_spec_error(
    specs: tuple[ModelSpec, ModelSpec],
) -> None:
    _, alone = specs
    with pytest.raises(SpecError, match="serves classifiers") as info:
        load_model(replace(alone, kind="vqa", vocab=("a",)))
    assert info.value.field == "factory"
    with pytest.raises(SpecError, match="has 12 classes") as info:
        load_model(replace(alone, labels=("a", "b")))
    assert info.value.field == "labels"
    with pytest.raises(SpecError, match="needs an onnx file"):
        load_model(replace(alone, onnx=None))
