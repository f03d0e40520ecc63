"""TorchServe's stock ``image_classifier`` handler, with the zoo models' input transform.

Used by bench_torchserve.py as the predictions-only baseline. Only
``image_processing`` differs from the stock class (the model's 64 px input and
mean/std instead of ImageNet's resize-256 / crop-224), so both handlers do the
same model work.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import torch

from camserve.zoo.train import MEAN, STD


def _declare_torchvision_ops() -> Any:
    """Lets torchvision's pure-Python parts import where its C ops cannot load.

    torchvision's PyPI wheel is built for CUDA: on torch's CPU build its C ops do
    not load, and importing torchvision then fails registering fake kernels for
    nms/qnms. Declaring those two schemas (never called here) avoids that.
    """
    spec = importlib.util.find_spec("torchvision")
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin or ""), "_C*.so")) if spec else []
    try:
        torch.ops.load_library(libs[0])
        return None
    except (IndexError, OSError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return lib


_LIB = _declare_torchvision_ops()

from torchvision import transforms  # noqa: E402
from ts.torch_handler.image_classifier import ImageClassifier  # noqa: E402


class StockClassifier(ImageClassifier):
    """The stock image classifier: top-5 labels and probabilities, no maps."""

    image_processing = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean=list(MEAN), std=list(STD))]
    )
