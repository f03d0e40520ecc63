"""TorchServe's stock ``image_classifier`` handler, with the zoo model's input transform.

Used by bench_torchserve.py as the predictions-only baseline. Only
``image_processing`` differs from the stock class (the model's own input size and
mean/std instead of ImageNet's resize-256 / crop-224), so both handlers do the
same model work.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Any

import torch


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
    """The stock image classifier: top-5 labels and probabilities, no maps.

    ``input.json`` (an extra file of the archive) gives the model's mean and std.
    """

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        path = os.path.join(context.system_properties["model_dir"], "input.json")
        with open(path) as f:
            cfg = json.load(f)
        self.image_processing = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean=cfg["mean"], std=cfg["std"])]
        )
