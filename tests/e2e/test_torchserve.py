"""End to end through a real TorchServe: REST and gRPC, batching, per-item errors, metrics."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch

from camserve.codecs.http import decode_map
from camserve.engine import Explainer
from camserve.torchserve.process import TorchServe

from .conftest import REPO_ROOT, STORE, Reply, model_of, post, scene_png

pytestmark = pytest.mark.slow


def engine_maps(name: str, image: bytes, inputs_extra: Any = None, **kw: Any) -> Any:
    """The engine called directly on the same image and model (the zoo's own loader)."""
    from camserve import zoo
    from camserve.service.images import InputTransform, decode_image

    model, entry = zoo.load(STORE, name)
    _, h, w = entry.input_size
    x = InputTransform((h, w), entry.mean, entry.std)(decode_image(image))[None]
    inputs = x if inputs_extra is None else (x, inputs_extra)
    with torch.enable_grad():
        return Explainer(model, entry.target_layer).explain(inputs, **kw)


def concurrently(calls: list[Any]) -> list[Reply]:
    """Runs the calls in threads released together (so that TorchServe batches them)."""
    out: list[Reply | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_raw_png_with_header_options_matches_the_engine(server: TorchServe) -> None:
    name = model_of("classifier")
    image, _ = scene_png(1)
    r = post(
        server, name, image, "?methods=gradcam,gradcampp&top_k=2", {"Content-Type": "image/png"}
    )
    assert r.status == 200, r.body
    out = r.json()
    exp = engine_maps(name, image, methods=("gradcam", "gradcampp"), targets=2)
    assert [e["id"] for e in out["explanations"]] == exp.target_ids[0].tolist()
    for j, e in enumerate(out["explanations"]):
        for m in ("gradcam", "gradcampp"):
            np.testing.assert_allclose(
                decode_map(e["maps"][m]), exp.upsampled(m)[0, j].numpy(), atol=1e-5
            )
    top = int(torch.argmax(exp.probabilities[0]))
    assert out["predictions"][0]["id"] == top


def test_json_body_raw_output(server: TorchServe) -> None:
    name = model_of("classifier")
    image, scene = scene_png(2)
    body = json.dumps(
        {
            "image": base64.b64encode(image).decode(),
            "labels": [scene.objects[0].label],
            "methods": ["xgradcam"],
            "output": "raw",
            "score": "probability",
        }
    ).encode()
    r = post(server, name, body, headers={"Content-Type": "application/json"})
    assert r.status == 200, r.body
    out = r.json()
    assert out["explanations"][0]["label"] == scene.objects[0].label
    exp = engine_maps(
        name,
        image,
        methods=("xgradcam",),
        targets=[[out["explanations"][0]["id"]]],
        score="probability",
    )
    np.testing.assert_allclose(
        decode_map(out["explanations"][0]["maps"]["xgradcam"]),
        exp.map("xgradcam")[0, 0],
        atol=1e-5,
    )


def test_per_item_errors_inside_one_batch(server: TorchServe) -> None:
    name = model_of("classifier")
    good, _ = scene_png(3)
    png = {"Content-Type": "image/png"}
    calls = [
        lambda: post(server, name, good, "?methods=gradcam", png),
        lambda: post(server, name, good, "?methods=nosuchcam", png),
        lambda: post(server, name, b"\x89PNG\r\n\x1a\nbroken", "", png),
        lambda: post(server, name, good, "?layer=no.such.layer", png),
        lambda: post(server, name, good, "?class_ids=9999", png),
        lambda: post(server, name, good, "?methods=gradcam,layercam&top_k=3", png),
    ]
    replies = concurrently(calls)
    assert [r.status for r in replies] == [200, 400, 400, 400, 400, 200], [
        r.body[:200] for r in replies
    ]
    assert "unknown method 'nosuchcam'" in replies[1].json()["error"]["message"]
    assert replies[2].json()["error"]["type"] == "InvalidImageError"
    assert "unknown layer 'no.such.layer'" in replies[3].json()["error"]["message"]
    assert "unknown class 9999" in replies[4].json()["error"]["message"]
    # They were answered together: TorchServe put several of them in one batch.
    assert max(r.json()["batch_size"] for r in (replies[0], replies[5])) > 1


def test_sixteen_concurrent_requests_agree_with_single_ones(server: TorchServe) -> None:
    name = model_of("classifier")
    images = [scene_png(10 + i)[0] for i in range(4)]
    png = {"Content-Type": "image/png"}
    single = [post(server, name, im, "?methods=gradcam", png).json() for im in images]
    replies = concurrently(
        [lambda im=im: post(server, name, im, "?methods=gradcam", png) for im in images * 4]
    )
    for i, r in enumerate(replies):
        assert r.status == 200
        want = single[i % 4]["explanations"][0]["maps"]["gradcam"]
        got = r.json()["explanations"][0]["maps"]["gradcam"]
        np.testing.assert_allclose(decode_map(got), decode_map(want), atol=1e-5)


def test_too_large_request_and_image(server: TorchServe) -> None:
    name = model_of("classifier")
    # Over max_request_size: TorchServe refuses it from the headers (100-continue).
    conn = http.client.HTTPConnection(server.config.host, server.config.inference_port, timeout=30)
    conn.putrequest("POST", f"/predictions/{name}")
    for key, value in {
        "Content-Type": "image/png",
        "Content-Length": "7000000",
        "Expect": "100-continue",
        "Authorization": f"Bearer {server.token('inference')}",
    }.items():
        conn.putheader(key, value)
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(buf, format="PNG")
    r = post(server, name, buf.getvalue(), "", {"Content-Type": "image/png"})
    assert r.status == 413
    assert "20000000 pixels" in r.json()["error"]["message"]


def test_captioning(server: TorchServe) -> None:
    name = model_of("captioner")
    image, _ = scene_png(4, n_objects=2)
    r = post(server, name, image, "?methods=gradcam&output=box", {"Content-Type": "image/png"})
    assert r.status == 200, r.body
    out = r.json()
    assert out["caption"] == " ".join(out["words"]) and out["words"]
    assert len(out["explanations"]) == len(out["words"]) + 1
    assert [e["word"] for e in out["explanations"][:-1]] == out["words"]
    assert out["explanations"][-1]["caption"] == out["caption"]


def test_vqa_with_counterfactual_answers(server: TorchServe) -> None:
    name = model_of("vqa")
    image, scene = scene_png(5)
    body = json.dumps(
        {
            "image": base64.b64encode(image).decode(),
            "question": f"what colour is the {scene.objects[0].shape}?",
            "answers": ["green", "yellow"],
            "methods": ["gradcam", "counterfactual"],
        }
    ).encode()
    r = post(server, name, body, headers={"Content-Type": "application/json"})
    assert r.status == 200, r.body
    out = r.json()
    want = [out["answer"]] + [a for a in ("green", "yellow") if a != out["answer"]]
    assert [e["answer"] for e in out["explanations"]] == want
    bad = json.dumps(
        {"image": base64.b64encode(image).decode(), "question": "what colour", "answers": ["mauve"]}
    ).encode()
    r = post(server, name, bad, headers={"Content-Type": "application/json"})
    assert r.status == 400 and "unknown answer 'mauve'" in r.json()["error"]["message"]


def test_token_auth_is_on(server: TorchServe) -> None:
    name = model_of("classifier")
    image, _ = scene_png(6)
    req = urllib.request.Request(f"{server.inference_url}/predictions/{name}", data=image)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    with info.value:
        assert info.value.code in (400, 401)
        assert b"Token Authorization failed" in info.value.read()


def test_grpc_predictions(server: TorchServe) -> None:
    import grpc

    from camserve.torchserve.protos import load_stubs

    pb2, pb2_grpc, _, _ = load_stubs(REPO_ROOT / "build" / "ts_grpc")
    name = model_of("classifier")
    image, _ = scene_png(7)
    auth = [("authorization", f"Bearer {server.token('inference')}")]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        reply = stub.Predictions(
            pb2.PredictionsRequest(model_name=name, input={"data": image, "methods": b"gradcam"}),
            metadata=auth,
            timeout=60,
        )
        out = json.loads(reply.prediction)
        rest = post(server, name, image, "?methods=gradcam", {"Content-Type": "image/png"}).json()
        np.testing.assert_allclose(
            decode_map(out["explanations"][0]["maps"]["gradcam"]),
            decode_map(rest["explanations"][0]["maps"]["gradcam"]),
            atol=1e-5,
        )
        # TorchServe 0.12 maps only whole-batch failures to gRPC status codes: a
        # per-item error comes back OK, with the error JSON as the prediction.
        junk = stub.Predictions(
            pb2.PredictionsRequest(model_name=name, input={"data": b"junk"}),
            metadata=auth,
            timeout=60,
        )
        err = json.loads(junk.prediction)["error"]
        assert err["type"] == "InvalidImageError" and err["status"] == 400
        assert "cannot identify the image" in err["message"]
        with pytest.raises(grpc.RpcError) as info:
            stub.Predictions(
                pb2.PredictionsRequest(model_name="no_such_model", input={"data": image}),
                metadata=auth,
                timeout=60,
            )
        assert info.value.code() == grpc.StatusCode.INTERNAL  # not NOT_FOUND, in 0.12
        with pytest.raises(grpc.RpcError) as info:
            stub.Predictions(
                pb2.PredictionsRequest(model_name=name, input={"data": image}), timeout=60
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_metrics_endpoint_has_per_method_and_stage_histograms(server: TorchServe) -> None:
    name = model_of("classifier")
    image, _ = scene_png(8)
    assert (
        post(server, name, image, "?methods=gradcam,layercam", {"Content-Type": "image/png"}).status
        == 200
    )
    with urllib.request.urlopen(server.metrics_url, timeout=30) as resp:
        text = resp.read().decode()
    assert "# TYPE camserve_method_latency_seconds histogram" in text
    assert f'camserve_method_latency_seconds_count{{model="{name}",method="layercam"' in text
    assert f'camserve_stage_latency_seconds_bucket{{model="{name}",stage="forward"' in text
    assert f'camserve_request_latency_seconds_count{{model="{name}",status="ok"' in text
    assert f'camserve_requests_total{{model="{name}",status="ok"' in text
