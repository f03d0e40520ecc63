"""A user's transformers through the service: ViT token layers and Swin-like channels-last maps.

The user's package (a small ViT and a Swin-like net, plain ``torch.nn``) is
written into a temporary folder with its state dicts and a spec file giving
the layer's ``layout``; :class:`ExplainService` loads it like any user model.
The maps are checked against the engine's direct call and against the
Grad-CAM / Layer-CAM formulas (Selvaraju et al. 2017, eq. 1-2; Jiang et al.
2021, eq. 6) on activations reshaped by hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from camserve.codecs.http import decode_map, encode_outcome, parse_request
from camserve.engine import Explainer
from camserve.engine.layout import TokenGrid
from camserve.models import SpecError, read_spec, write_spec
from camserve.service import ExplainRequest, ExplainResult, ExplainService
from camserve.service.images import InputTransform, decode_image

from .conftest import png

NETS = """
import torch
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class ViT(nn.Module):
    # patch embedding (4 x 4 patches), prefix tokens (class first), two blocks, a head
    def __init__(self, prefix: int = 1, grid: int = 4, dim: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(torch.zeros(1, prefix, dim))
        self.pos = nn.Parameter(torch.zeros(1, prefix + grid * grid, dim))
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.blocks(t)
        return self.head(self.norm(t)[:, 0])


class Mix(nn.Module):
    # a channels-last stage: a LayerNorm and an MLP over C of (N, h, w, C)
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return t + self.mlp(self.norm(t))


class SwinLike(nn.Module):
    def __init__(self, dim: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.stage = nn.Sequential(Mix(dim), Mix(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).permute(0, 2, 3, 1)  # (N, h, w, C)
        return self.head(self.stage(t).mean(dim=(1, 2)))


def vit(prefix: int = 1) -> nn.Module:
    return ViT(prefix)


def swin() -> nn.Module:
    return SwinLike()
"""

SPEC = """\
name = "{name}"
kind = "classifier"
layer = "{layer}"
input_size = [3, 16, 16]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
labels = ["cat", "dog", "bird"]
factory = "usertransformers:{factory}"
weights = "{name}.pt"
{layout}
[factory_kwargs]
{kwargs}
"""

TRANSFORM = InputTransform(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The user's module ``usertransformers`` importable from ``tmp_path``."""
    (tmp_path / "usertransformers.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usertransformers", None)
    import usertransformers  # type: ignore[import-not-found]

    yield usertransformers
    sys.modules.pop("usertransformers", None)


def write_model(
    folder: Path,
    module: Any,
    name: str,
    factory: str,
    layer: str,
    layout: str = "",
    **kwargs: int,
) -> Path:
    """Random weights (seeded, pos and prefix included) and a spec file; returns the spec path."""
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(module, factory)(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / f"{name}.pt")
    spec = folder / f"{name}.toml"
    args = "\n".join(f"{k} = {v}" for k, v in kwargs.items())
    spec.write_text(
        SPEC.format(name=name, layer=layer, factory=factory, layout=layout, kwargs=args)
    )
    return spec


def input_of(image: bytes) -> Tensor:
    return TRANSFORM(decode_image(image))[None]


def hooked(model: nn.Module, layer: str, x: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's output and the gradient of logit ``c`` with respect to it; the logits."""
    module = dict(model.named_modules())[layer]
    store: list[Tensor] = []

    def keep(m: nn.Module, a: object, out: Tensor) -> None:
        out.retain_grad()
        store.append(out)

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            logits[0, c].backward()
    finally:
        handle.remove()
    act = store[0]
    assert act.grad is not None
    return act.detach(), act.grad.detach(), logits.detach()


def gradcam(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM of one image: ``a, g (C, h, w)``: ReLU(sum_k mean(g_k) a_k)."""
    return torch.relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(0))


def layercam(a: Tensor, g: Tensor) -> Tensor:
    """Layer-CAM of one image: ReLU(sum_k ReLU(g_k) * a_k)."""
    return torch.relu((torch.relu(g) * a).sum(0))


def tokens_to_grid(t: Tensor, prefix: int, h: int, w: int) -> Tensor:
    """``(1, prefix + h*w, C)`` -> ``(C, h, w)`` by hand."""
    return t[0, prefix:].reshape(h, w, -1).permute(2, 0, 1)


def result(outcome: Any) -> ExplainResult:
    assert isinstance(outcome, ExplainResult), outcome
    return outcome


def test_a_vit_token_layer_is_explained_through_the_service(
    user_package: Any, tmp_path: Path
) -> None:
    spec_path = write_model(
        tmp_path,
        user_package,
        "vit",
        "vit",
        "blocks.1.norm1",
        layout="layout = {prefix = 1, grid = [4, 4]}",
        prefix=1,
    )
    spec = read_spec(spec_path)
    assert spec.layout == TokenGrid(prefix=1, grid=(4, 4))
    svc = ExplainService.from_specs([spec], device="cpu")
    assert svc.describe("vit").layout == "tokens: 1 prefix token(s), grid 4 x 4"
    images = [png(1, (16, 16)), png(2, (20, 24))]
    methods = ("gradcam", "layercam", "ablationcam")
    outs = svc.run(
        [
            ExplainRequest(model="vit", image=im, methods=methods, top_k=2, output="raw")
            for im in images
        ]
    )
    model = svc._models["vit"].task.model
    for image, out in zip(images, outs, strict=True):
        res = result(out)
        assert res.layer == "blocks.1.norm1"
        x = input_of(image)
        direct = Explainer(model, "blocks.1.norm1", layout=TokenGrid(1, (4, 4))).explain(
            x, methods=methods, targets=2
        )
        for j, t in enumerate(res.targets):
            assert t.id == int(direct.target_ids[0, j])
            for m in methods:
                got = t.maps[m].data
                assert got is not None and got.shape == (4, 4)
                np.testing.assert_allclose(got, direct.map(m)[0, j].numpy(), rtol=1e-5, atol=1e-6)
            # the formulas on the class logit, on tokens reshaped by hand
            assert t.id is not None
            a, g, _ = hooked(model, "blocks.1.norm1", x, t.id)
            a, g = tokens_to_grid(a, 1, 4, 4), tokens_to_grid(g, 1, 4, 4)
            for m, formula in (("gradcam", gradcam), ("layercam", layercam)):
                got = t.maps[m].data
                assert got is not None
                np.testing.assert_allclose(got, formula(a, g).numpy(), rtol=1e-4, atol=1e-6)
        assert float(np.abs(res.targets[0].maps["gradcam"].data).max()) > 0  # type: ignore[arg-type]


def test_ablationcam_on_service_tokens_follows_the_definition(
    user_package: Any, tmp_path: Path
) -> None:
    """Ablation-CAM (Desai & Ramaswamy 2020, eq. 3): (s - s_k) / s weights, class token kept."""
    spec = read_spec(write_model(tmp_path, user_package, "vit", "vit", "blocks.0", prefix=1))
    svc = ExplainService.from_specs([spec], device="cpu")
    image = png(5, (16, 16))
    [out] = svc.run(
        [ExplainRequest(model="vit", image=image, methods=("ablationcam",), output="raw")]
    )
    res = result(out)
    model = svc._models["vit"].task.model
    module = dict(model.named_modules())["blocks.0"]
    x = input_of(image)
    c = res.targets[0].id
    assert c is not None
    with torch.no_grad():
        store: list[Tensor] = []
        handle = module.register_forward_hook(lambda m, a, o: store.append(o.clone()))
        s = float(model(x)[0, c])
        handle.remove()
        tokens = store[0]
        acts = tokens_to_grid(tokens, 1, 4, 4)
        want = torch.zeros(4, 4)
        for k in range(acts.shape[0]):
            ablated = tokens.clone()
            ablated[0, 1:, k] = 0.0
            handle = module.register_forward_hook(lambda m, a, o, v=ablated: v)
            s_k = float(model(x)[0, c])
            handle.remove()
            want += (s - s_k) / s * acts[k]
    got = res.targets[0].maps["ablationcam"].data
    assert got is not None
    np.testing.assert_allclose(got, want.clamp(min=0).numpy(), rtol=1e-4, atol=1e-5)


def test_the_spec_layout_reads_tokens_auto_detection_would_misread(
    user_package: Any, tmp_path: Path
) -> None:
    """10 prefix tokens + 4 x 4 = 26 tokens: ``auto`` finds 1 + 5 x 5; the spec says 10 + 4 x 4."""
    auto = read_spec(write_model(tmp_path, user_package, "reg", "vit", "blocks.0", prefix=10))
    assert auto.layout == "auto"
    told = write_model(
        tmp_path,
        user_package,
        "reg10",
        "vit",
        "blocks.0",
        layout="layout = {prefix = 10}",
        prefix=10,
    )
    svc = ExplainService.from_specs([auto, read_spec(told)], device="cpu")
    assert svc.describe("reg").layout == "auto"
    assert svc.describe("reg10").layout == (
        "tokens: 10 prefix token(s), grid of the input's aspect ratio"
    )
    image = png(3, (16, 16))
    a, b = svc.run(
        [
            ExplainRequest(model=name, image=image, methods=("gradcam",), output="raw")
            for name in ("reg", "reg10")
        ]
    )
    assert result(a).targets[0].maps["gradcam"].data.shape == (5, 5)  # type: ignore[union-attr]
    res = result(b)
    model = svc._models["reg10"].task.model
    c = res.targets[0].id
    assert c is not None
    act, grad, _ = hooked(model, "blocks.0", input_of(image), c)
    want = gradcam(tokens_to_grid(act, 10, 4, 4), tokens_to_grid(grad, 10, 4, 4))
    got = res.targets[0].maps["gradcam"].data
    assert got is not None
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ['layout = "channels_last"', ""])
def test_a_swin_like_channels_last_stage_through_the_service(
    user_package: Any, tmp_path: Path, layout: str
) -> None:
    spec = read_spec(write_model(tmp_path, user_package, "swin", "swin", "stage.1", layout=layout))
    svc = ExplainService.from_specs([spec], device="cpu")
    assert svc.describe("swin").layout == ("channels_last" if layout else "auto")
    image = png(4, (20, 24))
    [out] = svc.run(
        [ExplainRequest(model="swin", image=image, methods=("gradcam", "layercam"), output="raw")]
    )
    res = result(out)
    c = res.targets[0].id
    assert c is not None
    model = svc._models["swin"].task.model
    act, grad, _ = hooked(model, "stage.1", input_of(image), c)
    a, g = act[0].permute(2, 0, 1), grad[0].permute(2, 0, 1)  # (h, w, C) -> (C, h, w)
    for m, formula in (("gradcam", gradcam), ("layercam", layercam)):
        got = res.targets[0].maps[m].data
        assert got is not None and got.shape == (4, 4)
        np.testing.assert_allclose(got, formula(a, g).numpy(), rtol=1e-4, atol=1e-6)


def test_the_json_codec_carries_token_maps(user_package: Any, tmp_path: Path) -> None:
    spec = read_spec(
        write_model(
            tmp_path, user_package, "vit", "vit", "blocks.1.norm1", layout="layout = {prefix = 1}"
        )
    )
    svc = ExplainService.from_specs([spec], device="cpu")
    image = png(6, (20, 24))
    import base64

    body = {"image": base64.b64encode(image).decode(), "methods": ["gradcam"], "top_k": 2}
    request = parse_request({"body": body}, {}, model="vit")
    [outcome] = svc.run([request])
    status, _, text = encode_outcome(outcome)
    assert status == 200, text
    payload = json.loads(text)
    assert payload["layer"] == "blocks.1.norm1"
    model = svc._models["vit"].task.model
    direct = Explainer(model, "blocks.1.norm1", layout=TokenGrid(prefix=1)).explain(
        input_of(image), methods=("gradcam",), targets=2
    )
    assert len(payload["explanations"]) == 2
    for j, e in enumerate(payload["explanations"]):
        assert e["id"] == int(direct.target_ids[0, j])
        got = decode_map(e["maps"]["gradcam"])
        assert got.shape == (16, 16)
        np.testing.assert_allclose(got, direct.upsampled("gradcam")[0, j].numpy(), atol=1e-6)
        assert float(got.max()) > 0


def test_layout_round_trips_and_wrong_layouts_are_named(user_package: Any, tmp_path: Path) -> None:
    path = write_model(
        tmp_path,
        user_package,
        "vit",
        "vit",
        "blocks.0",
        layout="layout = {prefix = 1, grid = [4, 4]}",
    )
    spec = read_spec(path)
    for suffix in (".toml", ".yaml"):
        assert read_spec(write_spec(spec, tmp_path / f"copy{suffix}")).layout == spec.layout
    text = path.read_text()
    bad = [
        ('layout = "tokens"', "layout", "valid layouts: auto, channels_first, channels_last"),
        ("layout = 3", "layout", "must be a layout name or a table"),
        ("layout = {prefix = -1}", "layout.prefix", "must be a non-negative integer"),
        ("layout = {prefix = 1, grid = [4]}", "layout.grid", "must be [height, width]"),
        ("layout = {prefix = 1, rows = 4}", "layout", "unknown key(s) ['rows']"),
    ]
    for line, field, needle in bad:
        path.write_text(text.replace("layout = {prefix = 1, grid = [4, 4]}", line))
        with pytest.raises(SpecError) as info:
            read_spec(path)
        assert info.value.field == field and needle in str(info.value), str(info.value)


def test_a_layout_that_does_not_fit_the_layer_is_refused_per_request(
    user_package: Any, tmp_path: Path
) -> None:
    spec = read_spec(
        write_model(
            tmp_path,
            user_package,
            "vit",
            "vit",
            "blocks.0",
            layout="layout = {prefix = 1, grid = [3, 5]}",
        )
    )
    svc = ExplainService.from_specs([spec], device="cpu")
    out, ok = svc.run(
        [
            ExplainRequest(model="vit", image=png(1, (16, 16))),
            ExplainRequest(
                model="vit", image=png(1, (16, 16)), layer="patch", methods=("gradcam",)
            ),
        ]
    )
    assert not isinstance(out, ExplainResult)
    assert "blocks.0" in str(out.error) and "1 prefix token(s) + a grid (3, 5)" in str(out.error)
    assert not isinstance(ok, ExplainResult)  # the patch conv's (N, C, h, w) is not tokens
    assert "'patch'" in str(ok.error)


def test_a_channels_last_layout_reads_the_last_dimension_as_channels() -> None:
    """The task's explainers get the layout (no spec file): ClassifierTask(..., layout=...)."""
    from camserve.service.tasks import ClassifierTask

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 4, 4, stride=4)
            self.stage = nn.Identity()
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.stage(self.patch(x).permute(0, 2, 3, 1)).mean(dim=(1, 2)))

    torch.manual_seed(0)
    net = Net().eval()
    task = ClassifierTask("net", net, ("a", "b", "c"), "stage", TRANSFORM, layout="channels_last")
    svc = ExplainService({"net": task})
    [out] = svc.run([ExplainRequest(model="net", image=png(2, (16, 16)), output="raw")])
    res = result(out)
    assert res.targets[0].maps["gradcam"].data.shape == (4, 4)  # type: ignore[union-attr]
    assert svc.describe("net").layout == "channels_last"


def test_the_grpc_model_info_carries_the_layout(user_package: Any, tmp_path: Path) -> None:
    from camserve.gateway.convert import description_from_proto, model_info_of

    spec = read_spec(
        write_model(
            tmp_path, user_package, "vit", "vit", "blocks.0", layout="layout = {prefix = 1}"
        )
    )
    described = ExplainService.from_specs([spec], device="cpu").describe("vit")
    info = model_info_of(described)
    assert info.layout == "tokens: 1 prefix token(s), grid of the input's aspect ratio"
    assert description_from_proto(info) == described
