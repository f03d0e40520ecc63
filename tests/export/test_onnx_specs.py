"""Loading a spec with ``runtime = "onnx"``: the binding it gets and the errors it raises."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from camserve.export.zoo import export_zoo_specs
from camserve.models import ModelSpec, SpecError, load_model, read_spec, resolve
from camserve.service import ExplainRequest, ExplainResult, ExplainService
from tests.export.conftest import Exported


@pytest.fixture(scope="module")
def onnx_spec(exported: Callable[[str], Exported], zoo_store: Path) -> ModelSpec:
    _, _, report = exported("resnet_gap")
    spec = read_spec(zoo_store / "resnet_gap.toml")
    return replace(spec, runtime="onnx", onnx=report.path)


def test_load_model_binds_onnxruntime(onnx_spec: ModelSpec) -> None:
    loaded = load_model(onnx_spec)
    assert loaded.runtime == "onnx"
    assert loaded.provider == "CPUExecutionProvider"
    assert str(loaded.runtime_device) == "cpu"
    assert loaded.explainer_factory is not None


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"layer": "layer1"}, "layer", "explains layer 'layer2'"),
        ({"onnx": Path("/nonexistent/model.onnx")}, "onnx", "no such file"),
        ({"onnx": None}, "onnx", "needs an onnx file"),
    ],
)
def test_wrong_onnx_specs_name_the_field(
    onnx_spec: ModelSpec, change: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(SpecError, match=words) as info:
        load_model(replace(onnx_spec, **change))  # type: ignore[arg-type]
    assert info.value.field == field


def test_a_file_that_is_no_camserve_export_is_refused(
    onnx_spec: ModelSpec, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx graph")
    with pytest.raises(SpecError, match="onnxruntime cannot load it") as info:
        load_model(replace(onnx_spec, onnx=junk))
    assert info.value.field == "onnx"


@pytest.mark.slow
def test_zoo_specs_with_runtime_onnx_serve(zoo_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for f in zoo_store.iterdir():
        if f.suffix in (".json", ".toml", ".pt"):
            shutil.copy2(f, store / f.name)
    (store / "datasets").symlink_to(zoo_store / "datasets")
    written = export_zoo_specs(store)
    assert sorted(written) == ["resnet_gap", "vgg_fc"]
    image = (zoo_store / "examples" / "scene_0.png").read_bytes()
    for name in written:
        spec = resolve(f"{name}_onnx", store)
        assert (spec.runtime, spec.onnx) == ("onnx", store / f"{name}.onnx")
        service = ExplainService.from_specs([spec], device="cpu")
        assert service.describe(spec.name).runtime == "onnx"
        (out,) = service.run([ExplainRequest(model=spec.name, image=image, top_k=2)])
        assert isinstance(out, ExplainResult) and len(out.targets) == 2
