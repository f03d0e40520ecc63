"""`camserve serve --model SPEC` with ``runtime = "onnx"``: a real TorchServe serves the
exported graph and answers as the torch spec in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from camserve.codecs.http import decode_map
from camserve.export import export_onnx
from camserve.export.zoo import zoo_example
from camserve.models import read_spec, write_spec
from camserve.service import ExplainRequest, ExplainResult, ExplainService
from camserve.torchserve.config import ServeConfig
from camserve.torchserve.process import TorchServe
from camserve.zoo.store import load

from .conftest import REPO_ROOT, STORE, free_run

pytestmark = pytest.mark.slow


def test_serve_an_onnx_spec(tmp_path: Path) -> None:
    model, entry = load(STORE, "resnet_gap")
    onnx = export_onnx(
        model, zoo_example(STORE, entry), entry.target_layer, tmp_path / "gap.onnx", targets=5
    ).path
    torch_spec = read_spec(STORE / "resnet_gap.toml")
    spec_file = write_spec(
        replace(torch_spec, name="gap_onnx", runtime="onnx", onnx=onnx), tmp_path / "gap.toml"
    )
    alone = replace(
        torch_spec, name="gap_alone", runtime="onnx", onnx=onnx, factory=None, weights=None,
        factory_kwargs={},
    )  # fmt: skip
    alone_file = write_spec(alone, tmp_path / "alone.toml")
    store, run = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    port, grpc_port = free_run(3), free_run(2) + 1000
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cli = [sys.executable, "-m", "camserve.cli"]
    serve = [*cli, "serve", "--background", "--model-store", str(store), "--run-dir", str(run)]
    serve += ["--model", str(spec_file), "--model", str(alone_file)]
    serve += ["--port", str(port), "--grpc-port", str(grpc_port)]
    image = (STORE / "examples" / "scene_0.png").read_bytes()
    try:
        out = subprocess.run(
            serve, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        server = TorchServe(ServeConfig(run_dir=run, inference_port=port, management_port=port + 1))
        assert sorted(server.management.models()) == ["gap_alone", "gap_onnx"]

        def ask(model: str, methods: str) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(
                f"{server.inference_url}/predictions/{model}", data=image, method="POST"
            )
            req.add_header("Authorization", f"Bearer {server.token('inference')}")
            req.add_header("Content-Type", "image/png")
            req.add_header("X-Camserve-Methods", methods)
            req.add_header("X-Camserve-Top-K", "2")
            req.add_header("X-Camserve-Output", "raw")
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, answer = ask("gap_onnx", "gradcam,scorecam")
        assert status == 200, answer
        alone_status, alone_answer = ask("gap_alone", "gradcam")
        refused_status, refused = ask("gap_alone", "scorecam")
    finally:
        stop = subprocess.run(
            [*cli, "stop", "--run-dir", str(run)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    logs = "".join(f.read_text(errors="replace") for f in run.rglob("*.log"))
    assert "model gap_onnx: onnx (CPUExecutionProvider, cpu) at layer layer2" in logs

    service = ExplainService.from_specs([torch_spec], device="cpu")
    (want,) = service.run([ExplainRequest(
        model="resnet_gap", image=image, methods=("gradcam", "scorecam"), top_k=2, output="raw"
    )])
    assert isinstance(want, ExplainResult)
    assert [p["label"] for p in answer["predictions"]] == [p.label for p in want.predictions]
    assert [e["label"] for e in answer["explanations"]] == [t.label for t in want.targets]
    for got_t, want_t in zip(answer["explanations"], want.targets, strict=True):
        for m in ("gradcam", "scorecam"):  # scorecam: the torch engine behind the graph
            w = want_t.maps[m].data
            assert w is not None
            scale = max(1.0, float(np.abs(w).max()))
            np.testing.assert_allclose(decode_map(got_t["maps"][m]), w, atol=1e-4 * scale)
    # the ONNX file alone: the same predictions and Grad-CAM; Score-CAM refused by name
    assert alone_status == 200, alone_answer
    assert [p["label"] for p in alone_answer["predictions"]] == [p.label for p in want.predictions]
    for got_t, want_t in zip(alone_answer["explanations"], want.targets, strict=True):
        w = want_t.maps["gradcam"].data
        assert w is not None
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(decode_map(got_t["maps"]["gradcam"]), w, atol=1e-4 * scale)
    assert refused_status == 400, refused
    assert "scorecam" in refused["error"]["message"]
