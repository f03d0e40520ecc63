"""A worker killed mid-request: that request fails; after the restart, later ones succeed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from camserve.torchserve.process import TorchServe

from .conftest import Reply, model_of, post, scene_png, start

pytestmark = pytest.mark.slow

SLOW = "?methods=scorecam,ablationcam,occlusion,integrated_gradients,gradient_shap&top_k=12"
RECEIVED = "Backend received inference"


@pytest.fixture(scope="module")
def lone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    ts = start(tmp_path_factory.mktemp("ts_crash"), models=[model_of("classifier")], batch_size=1)
    try:
        yield ts
    finally:
        ts.stop()


def worker_pid(server: TorchServe, name: str) -> int | None:
    req = urllib.request.Request(f"{server.management_url}/models/{name}")
    req.add_header("Authorization", f"Bearer {server.token('management')}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        info = json.loads(resp.read())
    for version in info:
        for w in version["workers"]:
            if w.get("status") == "READY" and int(w.get("pid", -1)) > 0:
                return int(w["pid"])
    return None


def wait_for_new_worker(server: TorchServe, name: str, old: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = worker_pid(server, name)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.2)
    raise AssertionError(f"no new READY worker within {timeout} s")


def test_kill_worker_mid_request(lone_server: TorchServe, tmp_path: Path) -> None:
    name = model_of("classifier")
    image, _ = scene_png(1)
    png = {"Content-Type": "image/png"}
    assert post(lone_server, name, image, "?methods=gradcam", png).status == 200
    pid = worker_pid(lone_server, name)
    assert pid is not None
    result: list[Reply] = []
    started = time.monotonic()
    log = lone_server.run_dir / "logs" / "model_log.log"
    seen = log.read_text().count(RECEIVED)
    t = threading.Thread(target=lambda: result.append(post(lone_server, name, image, SLOW, png)))
    t.start()
    deadline = time.monotonic() + 30
    while log.read_text().count(RECEIVED) == seen:  # wait until the worker has it
        assert time.monotonic() < deadline, "the slow request never reached the worker"
        time.sleep(0.02)
    time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=120)
    assert result, "the killed request never returned"
    assert result[0].status >= 500, (result[0].status, time.monotonic() - started)
    new = wait_for_new_worker(lone_server, name, pid)
    assert new != pid
    for seed in range(3):
        r = post(lone_server, name, scene_png(seed)[0], "?methods=gradcam", png)
        assert r.status == 200, r.body
