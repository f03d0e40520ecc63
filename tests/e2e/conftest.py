"""A real TorchServe over model_store/, on free loopback ports in a temporary folder."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from camserve.torchserve.archive import zoo_models
from camserve.torchserve.config import ServeConfig
from camserve.torchserve.process import TorchServe

REPO_ROOT = Path(__file__).resolve().parents[2]
STORE = REPO_ROOT / "model_store"


def store_models() -> dict[str, dict[str, Any]]:
    """The zoo's models; fails (not skips) when the store is not built."""
    if not (STORE / "manifest.json").exists():
        pytest.fail("model_store/ is not built: run `camserve build-models` (scripts/test.sh does)")
    models = zoo_models(STORE)
    missing = [m for m in models if not (STORE / f"{m}.mar").exists()]
    if missing:
        pytest.fail(f"no archives for {missing}: run `camserve build-models`")
    return models


def model_of(kind: str) -> str:
    """The first model of a kind (classifier, captioner, vqa), preferring CAM-capable ones."""
    names = sorted(n for n, info in store_models().items() if info["kind"] == kind)
    assert names, f"no {kind} in the model store"
    return names[0]


def scene_png(seed: int = 0, n_objects: int = 1) -> tuple[bytes, Any]:
    """A synthetic scene as PNG bytes, and the scene."""
    from camserve.zoo.scenes import generate_scene

    scene = generate_scene(np.random.default_rng(seed), 64, n_objects)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return buf.getvalue(), scene


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def post(
    server: TorchServe,
    model: str,
    body: bytes,
    options: str = "",
    headers: dict[str, str] | None = None,
) -> Reply:
    """POST /predictions/<model> with the inference token.

    ``options`` is written like a query string (``?methods=gradcam&top_k=2``) and
    sent as ``X-Camserve-<option>`` headers: TorchServe drops the query string of
    prediction requests.
    """
    req = urllib.request.Request(
        f"{server.inference_url}/predictions/{model}", data=body, method="POST"
    )
    token = server.token("inference")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in urllib.parse.parse_qsl(options.lstrip("?")):
        req.add_header(f"X-Camserve-{key}", value)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return Reply(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.read())


def free_run(count: int) -> int:
    """A base port with ``count`` consecutive free ports."""
    for base in range(23000, 60000, 97):
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def start(tmp: Path, **kwargs: Any) -> TorchServe:
    server = TorchServe(ServeConfig.free_ports(model_store=STORE, run_dir=tmp, **kwargs))
    server.start()
    try:
        server.wait_ready(timeout=240)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """Every archive, token auth on, batching with a delay long enough to batch concurrent calls."""
    store_models()
    ts = start(tmp_path_factory.mktemp("ts"), batch_size=8, max_batch_delay_ms=250)
    try:
        yield ts
    finally:
        ts.stop()
