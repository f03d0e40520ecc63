"""The TorchServe handlers in-process, with TorchServe's real Context and metrics cache."""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from camserve.codecs.http import decode_map
from camserve.errors import InvalidRequestError
from camserve.torchserve import resources
from camserve.torchserve.archive import zoo_models

with warnings.catch_warnings():  # TorchServe leaves ts/version.txt open at import
    warnings.simplefilter("ignore", ResourceWarning)
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.utils.util import list_classes_from_module

REPO_ROOT = Path(__file__).resolve().parents[2]
STORE = REPO_ROOT / "model_store"
HANDLER_DIR = REPO_ROOT / "handlers"
HANDLERS = {
    "classifier": "classifier_handler.py",
    "captioner": "caption_handler.py",
    "vqa": "vqa_handler.py",
}


def handler_module(kind: str) -> ModuleType:
    if str(HANDLER_DIR) not in sys.path:  # as in a worker: the archive's files are importable
        sys.path.insert(0, str(HANDLER_DIR))
    path = HANDLER_DIR / HANDLERS[kind]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_name(kind: str) -> str:
    if not (STORE / "manifest.json").exists():
        pytest.fail("model_store/ is not built: run `camserve build-models` (scripts/test.sh does)")
    names = sorted(n for n, i in zoo_models(STORE).items() if i["kind"] == kind)
    assert names, f"no {kind} model in the store"
    return names[0]


def context(name: str, headers: list[dict[str, str]]) -> Context:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        cache = MetricsCacheYamlImpl(str(resources.metrics_yaml()))
    cache.initialize_cache()
    cache.model_name = name
    ctx = Context(
        name,
        str(STORE),
        {"model": {"modelName": name}},
        len(headers),
        None,
        "0.12.0",
        metrics=cache,
    )
    ctx.request_processor = [RequestProcessor(h) for h in headers]
    ids = {i: f"req-{i}" for i in range(len(headers))}
    ctx.request_ids = ids
    cache.set_request_ids(ids)
    return ctx


def scene(seed: int, n: int = 1) -> tuple[bytes, Any]:
    import io

    from PIL import Image

    from camserve.zoo.scenes import generate_scene

    s = generate_scene(np.random.default_rng(seed), 64, n)
    buf = io.BytesIO()
    Image.fromarray(s.image).save(buf, format="PNG")
    return buf.getvalue(), s


@pytest.mark.parametrize("kind", sorted(HANDLERS))
def test_each_handler_file_has_exactly_one_class(kind: str) -> None:
    classes = list_classes_from_module(handler_module(kind))
    assert len(classes) == 1 and hasattr(classes[0], "handle")


def test_classifier_handler_batch_with_per_item_errors(caplog: pytest.LogCaptureFixture) -> None:
    name = model_name("classifier")
    image, sc = scene(1)
    ctx = context(name, [{"x-camserve-methods": "gradcam,layercam"}, {}, {}, {}])
    data = [
        {"body": bytearray(image), "top_k": b"2"},
        {
            "body": {
                "image": base64.b64encode(image).decode(),
                "labels": [sc.objects[0].label],
                "output": "png",
            }
        },
        {"body": b"definitely not an image"},
        {"body": {"image": base64.b64encode(image).decode(), "methods": ["nosuch"]}},
    ]
    handler = handler_module("classifier").ClassifierHandler()
    handler.initialize(ctx)
    with caplog.at_level(logging.INFO):
        out = handler.handle(data, ctx)
    assert len(out) == 4 and all(isinstance(o, str) for o in out)
    statuses = [ctx.get_response_status(i)[0] for i in range(4)]
    assert statuses == [200, 200, 400, 400]
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(4))
    first = json.loads(out[0])
    assert len(first["explanations"]) == 2
    assert set(first["explanations"][0]["maps"]) == {"gradcam", "layercam"}
    assert decode_map(first["explanations"][0]["maps"]["gradcam"]).shape == tuple(
        first["input_size"]
    )
    second = json.loads(out[1])
    assert second["explanations"][0]["label"] == sc.objects[0].label
    assert second["explanations"][0]["maps"]["gradcam"]["format"] == "png"
    assert ctx.get_response_status(3)[1].startswith("unknown method 'nosuch'")
    assert json.loads(out[3])["error"]["type"] == "UnknownNameError"
    metrics = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert any(m.startswith("[METRICS]camserve_method_latency_seconds.Seconds:") for m in metrics)
    assert any(f"model:{name},status:InvalidImageError" in m for m in metrics)


def test_caption_handler() -> None:
    name = model_name("captioner")
    image, _ = scene(2, 2)
    ctx = context(name, [{}])
    handler = handler_module("captioner").CaptionHandler()
    handler.initialize(ctx)
    [out] = handler.handle([{"body": image, "output": b"box"}], ctx)
    assert ctx.get_response_status(0)[0] == 200, out
    res = json.loads(out)
    assert res["words"] and len(res["explanations"]) == len(res["words"]) + 1


def test_vqa_handler_counterfactual_answers() -> None:
    name = model_name("vqa")
    image, sc = scene(3)
    ctx = context(name, [{}, {}])
    handler = handler_module("vqa").VQAHandler()
    handler.initialize(ctx)
    q = f"what colour is the {sc.objects[0].shape}"
    outs = handler.handle(
        [{"body": image, "question": q.encode(), "answers": b"green,yellow"}, {"body": image}], ctx
    )
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 400]
    res = json.loads(outs[0])
    want = [res["answer"]] + [a for a in ("green", "yellow") if a != res["answer"]]
    assert [e["answer"] for e in res["explanations"]] == want
    assert res["answer"] == sc.objects[0].colour  # the trained model answers right here


def test_handler_refuses_the_wrong_kind_of_model() -> None:
    name = model_name("captioner")
    handler = handler_module("classifier").ClassifierHandler()
    with pytest.raises(InvalidRequestError, match="is a captioner, not a classifier"):
        handler.initialize(context(name, [{}]))
