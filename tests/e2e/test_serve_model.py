"""`camserve serve --model SPEC`: a user's own model (factory module + state dict) served by a
real TorchServe beside a zoo model, answering what the model computes in-process."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tsctl.user_model import LABELS, MODULE, NAME, SIZE, write_user_model

from camserve.torchserve.config import ServeConfig
from camserve.torchserve.process import TorchServe

from .conftest import REPO_ROOT, STORE, free_run, model_of

pytestmark = pytest.mark.slow


def test_serve_a_user_model_beside_the_zoo(tmp_path: Path) -> None:
    user = tmp_path / "user"
    spec = write_user_model(user)
    zoo = model_of("classifier")
    store = tmp_path / "store"
    store.mkdir()
    (store / f"{zoo}.mar").symlink_to(STORE / f"{zoo}.mar")
    run = tmp_path / "run"
    port, grpc_port = free_run(3), free_run(2) + 1000
    # The factory's module is importable the way an installed package would be.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(user)])}
    cli = [sys.executable, "-m", "camserve.cli"]
    serve = [*cli, "serve", "--background", "--model-store", str(store), "--run-dir", str(run)]
    serve += ["--model", str(spec), "--port", str(port), "--grpc-port", str(grpc_port)]
    try:
        out = subprocess.run(
            serve, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        config = ServeConfig(run_dir=run, inference_port=port, management_port=port + 1)
        server = TorchServe(config)
        assert sorted(server.management.models()) == sorted([NAME, zoo])

        rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        import urllib.request

        req = urllib.request.Request(
            f"{server.inference_url}/predictions/{NAME}", data=buf.getvalue(), method="POST"
        )
        req.add_header("Authorization", f"Bearer {server.token('inference')}")
        req.add_header("Content-Type", "image/png")
        req.add_header("X-Camserve-Methods", "gradcam")
        req.add_header("X-Camserve-Top-K", "3")
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())

        # The same model, weights and input in-process (mean 0, std 1: pixels / 255).
        sys.path.insert(0, str(user))
        try:
            model = importlib.import_module(MODULE).tiny(len(LABELS))
        finally:
            sys.path.remove(str(user))
            sys.modules.pop(MODULE, None)
        model.load_state_dict(torch.load(user / "tiny.pt", weights_only=True))
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            probs = model.eval()(x).softmax(1)[0]
        top = int(probs.argmax())

        assert answer["model"] == NAME
        assert [p["label"] for p in answer["predictions"]][:1] == [LABELS[top]]
        assert answer["predictions"][0]["probability"] == pytest.approx(float(probs[top]), abs=1e-4)
        assert {e["label"] for e in answer["explanations"]} == set(LABELS)
        assert answer["explanations"][0]["maps"]["gradcam"]["shape"] == [SIZE, SIZE]
    finally:
        stop = subprocess.run(
            [*cli, "stop", "--run-dir", str(run)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert stop.returncode == 0, stop.stdout + stop.stderr
