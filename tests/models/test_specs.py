"""Model spec files and loaders: a user's own model through the service; every wrong field."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from camserve.errors import UnknownNameError
from camserve.models import (
    ModelSpec,
    SpecError,
    bundle,
    load_model,
    read_spec,
    resolve,
    write_spec,
)
from camserve.service import ExplainRequest, ExplainResult, ExplainService

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def make(classes: int = 3, width: int = 4) -> nn.Module:
    return Net(classes, width)
"""


@pytest.fixture
def user_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's package (``usernets.py``), its weights and labels, and a spec file naming them."""
    (tmp_path / "usernets.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usernets", None)
    import usernets  # type: ignore[import-not-found]

    torch.manual_seed(0)
    torch.save(usernets.make(3, 4).state_dict(), tmp_path / "net.pt")
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    spec = tmp_path / "net.toml"
    spec.write_text(
        textwrap.dedent(
            """\
            name = "pets"
            kind = "classifier"
            layer = "features.1"
            input_size = [3, 16, 16]
            mean = [0.5, 0.5, 0.5]
            std = [0.25, 0.25, 0.25]
            labels_file = "labels.txt"
            factory = "usernets:make"
            weights = "net.pt"

            [factory_kwargs]
            classes = 3
            width = 4
            """
        )
    )
    yield spec
    sys.modules.pop("usernets", None)


def png_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_a_users_model_is_explained_through_the_service(user_model: Path) -> None:
    spec = read_spec(user_model)
    assert spec.labels == ("cat", "dog", "bird") and spec.weights == user_model.parent / "net.pt"
    svc = ExplainService.from_specs([spec], device="cpu")
    [out] = svc.run([ExplainRequest(model="pets", image=png_bytes(1), methods=("gradcam", "cam"))])
    assert isinstance(out, ExplainResult), out
    assert out.layer == "features.1" and out.input_size == (16, 16)
    assert {p.label for p in out.predictions} == {"cat", "dog", "bird"}
    m = out.targets[0].maps["cam"]
    assert m.data is not None and m.data.shape == (16, 16) and m.box is not None
    # The weights are the user's: the service's logits are the model's own.
    loaded = load_model(spec)
    import usernets

    net = usernets.make(3, 4)
    net.load_state_dict(torch.load(user_model.parent / "net.pt", weights_only=True))
    for a, b in zip(loaded.model.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not loaded.model.training


def test_yaml_specs_and_round_trips(user_model: Path, tmp_path: Path) -> None:
    spec = read_spec(user_model)
    for suffix in (".toml", ".yaml"):
        path = write_spec(spec, tmp_path / "out" / f"copy{suffix}")
        again = read_spec(path)
        assert again.weights == spec.weights and again.labels == spec.labels
        assert again.factory_kwargs == spec.factory_kwargs and again.input_size == spec.input_size
    data = yaml.safe_load((tmp_path / "out" / "copy.yaml").read_text())
    assert data["weights"] == str(spec.weights)  # outside the spec's folder: absolute
    write_spec(spec, tmp_path / "beside.yaml")
    assert yaml.safe_load((tmp_path / "beside.yaml").read_text())["weights"] == "net.pt"


def test_bundle_is_self_contained(user_model: Path, tmp_path: Path) -> None:
    spec = read_spec(user_model)
    path = bundle(spec, tmp_path / "bundle")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.toml", "net.pt"]
    copy = read_spec(path)
    assert copy.weights == path.parent / "net.pt" and copy.labels == spec.labels
    assert "labels_file" not in path.read_text()


def test_resolve_by_path_store_name_and_unknown(user_model: Path) -> None:
    assert resolve(user_model).name == "pets"
    assert resolve("net", user_model.parent).name == "pets"
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'; valid models: .*net"):
        resolve("nope", user_model.parent)


BAD_FIELDS: list[tuple[str, Any, str]] = [
    ("colour", "red", "field 'colour' = 'red': unknown field; valid fields: name, kind"),
    ("kind", "detector", "field 'kind' = 'detector': valid kinds: classifier, captioner, vqa"),
    ("name", "", "field 'name' = '': must be a non-empty string"),
    ("layer", 5, "field 'layer' = 5: must be a non-empty string"),
    ("input_size", [3, 16], "field 'input_size' = [3, 16]: must be [3, height, width]"),
    ("input_size", [1, 16, 16], "must be [3, height, width] of positive integers"),
    ("mean", [0.5, 0.5], "field 'mean' = [0.5, 0.5]: must be a list of 3 finite numbers"),
    ("std", [0.0, 1.0, 1.0], "field 'std' = [0.0, 1.0, 1.0]: must be positive"),
    ("labels_file", "missing.txt", "field 'labels_file' = 'missing.txt': no such file"),
    ("weights", "missing.pt", "field 'weights' = 'missing.pt': no such file"),
    ("factory", "usernets", "field 'factory' = 'usernets': must be 'package.module:function'"),
    ("runtime", "tvm", "field 'runtime' = 'tvm': valid runtimes: torch, onnx"),
    ("factory_kwargs", 3, "field 'factory_kwargs' = 3: must be a table"),
]


def _rewrite(spec: Path, key: str, value: Any) -> Path:
    data = yaml.safe_load(_as_yaml(spec))
    data[key] = value
    out = spec.with_suffix(".yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def _as_yaml(spec: Path) -> str:
    import tomllib

    return yaml.safe_dump(tomllib.loads(spec.read_text()))


@pytest.mark.parametrize("key, value, needle", BAD_FIELDS)
def test_each_wrong_field_is_named_with_its_value(
    user_model: Path, key: str, value: Any, needle: str
) -> None:
    path = _rewrite(user_model, key, value)
    with pytest.raises(SpecError, match=re.escape(needle)) as info:
        read_spec(path)
    assert info.value.field == key


def test_missing_required_fields_and_sources(user_model: Path) -> None:
    data = yaml.safe_load(_as_yaml(user_model))
    for key in ("name", "kind", "layer", "input_size"):
        broken = {k: v for k, v in data.items() if k != key}
        path = user_model.with_suffix(".yml")
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(SpecError, match=f"field '{key}' = None: required field is missing"):
            read_spec(path)
    no_source = {k: v for k, v in data.items() if k not in ("factory", "weights")}
    path.write_text(yaml.safe_dump(no_source))
    with pytest.raises(SpecError, match="exactly one source"):
        read_spec(path)
    with pytest.raises(SpecError, match="no such file"):
        read_spec(user_model.parent / "absent.toml")


def _spec(user_model: Path, **changes: Any) -> ModelSpec:
    import dataclasses

    return dataclasses.replace(read_spec(user_model), **changes)


def test_load_errors_name_the_field_and_the_value(user_model: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"field 'layer' = 'features.7': no such module; modules: "):
        load_model(_spec(user_model, layer="features.7"))
    with pytest.raises(SpecError, match=r"field 'factory' = 'nomodule:make': cannot import"):
        load_model(_spec(user_model, factory="nomodule:make"))
    with pytest.raises(SpecError, match=r"field 'factory' = 'usernets:nothing': .*no callable"):
        load_model(_spec(user_model, factory="usernets:nothing"))
    with pytest.raises(SpecError, match=r"field 'factory_kwargs' = \{'depth': 3\}"):
        load_model(_spec(user_model, factory_kwargs={"depth": 3}))
    # Weights of another architecture: the missing and unexpected keys are named.
    torch.save({"fc.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(SpecError) as info:
        load_model(_spec(user_model, weights=tmp_path / "w.pt"))
    text = str(info.value)
    assert "field 'weights'" in text and "missing keys ['fc.bias', 'features.0.bias'" in text
    assert "unexpected keys ['head.bias']" in text
    # Weights of the right keys but another width: the shapes are named.
    with pytest.raises(
        SpecError,
        match=r"shapes do not fit: \['features.0.weight: file \(4, 3, 3, 3\), model \(8, 3, 3, 3\)",
    ):
        load_model(_spec(user_model, factory_kwargs={"classes": 3, "width": 8}))
    torch.save({"not": "a tensor dict", "x": object()}, tmp_path / "pickle.pt")
    with pytest.raises(SpecError, match=r"field 'weights'.*not a loadable state dict"):
        load_model(_spec(user_model, weights=tmp_path / "pickle.pt"))


def test_a_captioner_needs_generate_and_eos(user_model: Path) -> None:
    spec = _spec(user_model, kind="captioner", vocab=("<pad>", "<eos>", "a"))
    with pytest.raises(SpecError, match="field 'kind' = 'captioner': a captioner needs a generate"):
        load_model(spec)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_and_export_programs(user_model: Path, tmp_path: Path) -> None:
    import usernets

    net = usernets.make(3, 4).eval()
    x = torch.rand(1, 3, 16, 16)
    torch.jit.save(torch.jit.trace(net, x), tmp_path / "net.ts")
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "net.pt2")
    for program in ("net.ts", "net.pt2"):
        # torch.export keeps the modules with parameters: explain at the conv.
        spec = _spec(
            user_model, factory=None, weights=None, program=tmp_path / program, layer="features.0"
        )
        loaded = load_model(spec)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), net(x))
    with pytest.raises(SpecError, match=r"field 'program'.*not a TorchScript or torch.export"):
        load_model(_spec(user_model, factory=None, weights=None, program=user_model))
