"""Each error type, with a message naming the bad value and the valid choices."""

from __future__ import annotations

import pytest
import torch

from camserve.engine import Explainer, list_methods
from camserve.errors import InvalidRequestError, UnknownNameError, UnsupportedMethodError
from tests.engine._nets import ResNetish, gap_net, vgg_net


@pytest.fixture(scope="module")
def ex() -> Explainer:
    return Explainer(vgg_net(), "features.3")


def x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16)


def test_unknown_method(ex: Explainer) -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown method 'gradcamx'; valid methods: .*gradcampp"
    ) as err:
        ex.explain(x(), methods=["gradcam", "gradcamx"])
    assert err.value.kind == "method" and set(err.value.choices) == set(list_methods())
    with pytest.raises(UnknownNameError, match="guided_nothing"):
        ex.explain(x(), methods="guided_nothing")


def test_unknown_layer() -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown layer 'layer9'; valid layers: .*features\.3"
    ) as err:
        Explainer(vgg_net(), "layer9")
    assert "classifier.2" in err.value.choices
    with pytest.raises(UnknownNameError, match="nope"):
        Explainer(vgg_net(), ["features.3", "nope"])


def test_class_id_out_of_range(ex: Explainer) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown class 7; valid classes: 0, 1, 2, 3, 4$"):
        ex.explain(x(), targets=[[1], [7]])
    with pytest.raises(UnknownNameError, match="unknown class -1"):
        ex.explain(x(), targets=torch.tensor([[0], [-1]]))


@pytest.mark.parametrize("k", [0, 6, -1])
def test_bad_k(ex: Explainer, k: int) -> None:
    with pytest.raises(InvalidRequestError, match=rf"must be in 1\.\.5 .* got {k}"):
        ex.explain(x(), targets=k)


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        (torch.randn(3, 16, 16), r"shape \(N, C, H, W\), got \(3, 16, 16\)"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.long), "float tensor, got dtype torch.int64"),
        (
            torch.zeros(2, 3, 16, 16, dtype=torch.float64),
            "dtype torch.float64, the model's parameters torch.float32",
        ),
        (torch.zeros(0, 3, 16, 16), r"empty batch or image: shape \(0, 3, 16, 16\)"),
        (torch.full((1, 3, 16, 16), float("nan")), "NaN or inf"),
        ("not a tensor", "inputs must be a Tensor"),
        (
            (torch.zeros(2, 3, 16, 16), torch.zeros(3, 4)),
            r"extra input 1 must share the batch size 2",
        ),
    ],
)
def test_bad_inputs(ex: Explainer, inputs, pattern: str) -> None:
    with pytest.raises(InvalidRequestError, match=pattern):
        ex.explain(inputs)


def test_bad_targets(ex: Explainer) -> None:
    with pytest.raises(
        InvalidRequestError, match=r"same number of class ids, got lengths \[1, 2\]"
    ):
        ex.explain(x(), targets=[[1], [1, 2]])
    with pytest.raises(InvalidRequestError, match=r"shape \(N=2, K>=1\), got \(3, 1\)"):
        ex.explain(x(), targets=[[1], [2], [3]])
    with pytest.raises(InvalidRequestError, match="integer tensor"):
        ex.explain(x(), targets=torch.zeros(2, 1))
    with pytest.raises(
        InvalidRequestError, match=r"score function must return a Tensor \(N=2, K>=1\)"
    ):
        ex.explain(x(), targets=lambda out: out[:, 0])
    with pytest.raises(
        UnknownNameError, match="unknown score 'softmax'; valid scores: logit, probability"
    ):
        ex.explain(x(), score="softmax")


def test_cam_without_gap_linear_head() -> None:
    with pytest.raises(
        UnsupportedMethodError,
        match=r"cam needs a global-average-pooling \+ linear head .*'features\.3'.*gradcam",
    ):
        Explainer(vgg_net(), "features.3").explain(x(), methods=["cam"])
    # conv output before the in-place ReLU: the head is not linear in it
    with pytest.raises(UnsupportedMethodError, match=r"features\.2"):
        Explainer(gap_net(), "features.2").explain(x(), methods=["cam"])
    with pytest.raises(UnsupportedMethodError, match="score function"):
        Explainer(gap_net(), "features").explain(x(), methods=["cam"], targets=lambda o: o[:, :2])
    # a GAP + linear head written functionally is found too
    assert Explainer(ResNetish(), "block2").explain(x(), methods=["cam"]).map("cam").shape == (
        2,
        1,
        8,
        8,
    )


def test_bad_options(ex: Explainer) -> None:
    with pytest.raises(
        UnknownNameError,
        match=r"unknown option 'gradcampp\.alpha'; valid options: gradcampp\.normalize_alpha",
    ):
        ex.explain(x(), methods=["gradcampp"], options={"gradcampp": {"alpha": 1}})
    with pytest.raises(InvalidRequestError, match=r"option occlusion\.mask must be int, got 'big'"):
        ex.explain(x(), methods=["gradcam"], options={"occlusion": {"mask": "big"}})
    with pytest.raises(InvalidRequestError, match=r"option occlusion\.stride must be >= 1, got 0"):
        ex.explain(x(), methods=["gradcam"], options={"occlusion": {"stride": 0}})
    with pytest.raises(
        UnknownNameError,
        match=r"unknown ablationcam\.form value 'mean'; valid ablationcam\.form values: score, sum",
    ):
        ex.explain(x(), methods=["gradcam"], options={"ablationcam": {"form": "mean"}})
    with pytest.raises(UnknownNameError, match="unknown method 'gradcam2'"):
        ex.explain(x(), options={"gradcam2": {}})


def test_bad_layers_and_settings() -> None:
    with pytest.raises(InvalidRequestError, match="at least one layer"):
        Explainer(vgg_net(), [])
    with pytest.raises(InvalidRequestError, match="distinct"):
        Explainer(vgg_net(), ["features.3", "features.3"])
    with pytest.raises(InvalidRequestError, match="batch_size must be a positive int, got 0"):
        Explainer(vgg_net(), "features.3", batch_size=0)
    with pytest.raises(
        InvalidRequestError,
        match=r"layer 'flat' must output a float tensor \(N, C, h, w\), \(N, h, w, C\) or tokens "
        r"\(N, T, C\), got \(2, 512\)",
    ):
        Explainer(vgg_net(), "flat").explain(x())
    with pytest.raises(InvalidRequestError, match="at least one method"):
        Explainer(vgg_net(), "features.3").explain(x(), methods=[])


def test_model_not_on_the_device() -> None:
    with pytest.raises(
        InvalidRequestError, match=r"parameters are on \['cpu'\], not on device meta"
    ):
        Explainer(vgg_net(), "features.3", device="meta")
    assert Explainer(vgg_net(), "features.3", device="cpu").device == torch.device("cpu")
