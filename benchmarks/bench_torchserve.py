"""Predictions + maps through TorchServe vs TorchServe's stock image classifier.

One TorchServe serves the same zoo classifier (same state dict) four times:
camserve's handler (predictions + a Grad-CAM map, normalised and upsampled)
with batching on and off, and TorchServe's stock ``image_classifier`` handler
(predictions only) with batching on and off. The stock handler is used as
shipped except for its ``image_processing`` transform, set to the model's input
(64 px, the zoo's mean/std) instead of ImageNet's 256/224 crop, so both do the
same model work. It needs ``torchvision`` and ``captum`` (the ``bench`` extra).

Clients are threads with keep-alive HTTP connections sending the same 64x64
PNG scene. The workloads run interleaved in rounds (the machine has slowdown
episodes) and the medians over rounds are reported.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_torchserve.py --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import os  # noqa: E402

from camserve.torchserve.archive import zoo_models  # noqa: E402
from camserve.torchserve.config import ServeConfig  # noqa: E402
from camserve.torchserve.process import TorchServe  # noqa: E402

MODEL_FILE = """
from camserve.zoo.models import {cls} as _Base


class StockModel(_Base):
    def __init__(self):
        super().__init__(**{kwargs!r})
"""


def scene_png() -> bytes:
    from camserve.zoo.scenes import generate_scene

    scene = generate_scene(np.random.default_rng(0), 64, 1)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return buf.getvalue()


def build_stock_archive(store: Path, name: str, out: Path) -> None:
    """A stock-handler archive of zoo model ``name`` in ``out``."""
    import subprocess

    from camserve import zoo

    model, entry = zoo.load(store, name)
    work = out / "stock_src"
    work.mkdir(parents=True, exist_ok=True)
    (work / "stock_model.py").write_text(
        MODEL_FILE.format(cls=type(model).__name__, kwargs=dict(entry.kwargs))
    )
    import torch

    torch.save(model.state_dict(), work / "weights.pth")
    labels = list(entry.labels)
    (work / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}))
    (work / "input.json").write_text(json.dumps({"mean": list(entry.mean), "std": list(entry.std)}))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from model_archiver.model_packaging import generate_model_archive as g; g()",
            "--model-name",
            "stock",
            "--version",
            "1.0",
            "--model-file",
            str(work / "stock_model.py"),
            "--serialized-file",
            str(work / "weights.pth"),
            "--handler",
            str(REPO / "benchmarks" / "stock_classifier_handler.py"),
            "--extra-files",
            f"{work / 'index_to_name.json'},{work / 'input.json'}",
            "--export-path",
            str(out),
            "--force",
        ],
        check=True,
    )


class Client:
    """One keep-alive connection."""

    def __init__(self, server: TorchServe) -> None:
        self.conn = http.client.HTTPConnection(
            server.config.host, server.config.inference_port, timeout=120
        )
        token = server.token("inference")
        # camserve's handler: predictions + the top class's Grad-CAM map (normalised,
        # upsampled, float32) and its box; the stock handler ignores the header.
        self.headers = {"Content-Type": "image/png", "X-Camserve-Methods": "gradcam"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def run_load(
    server: TorchServe, path: str, body: bytes, clients: int, total: int
) -> dict[str, float]:
    """``total`` requests from ``clients`` threads; latency percentiles and throughput."""
    per = max(1, total // clients)
    lat: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def work() -> None:
        c = Client(server)
        c.post(path, body)  # connection warm-up, not timed
        barrier.wait()
        mine = []
        for _ in range(per):
            t0 = time.perf_counter()
            status, _ = c.post(path, body)
            mine.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(status)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {sorted(set(errors))}")
    arr = np.array(lat) * 1000.0
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "rps": len(lat) / wall,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-store", default=str(REPO / "model_store"))
    p.add_argument("--model", help="zoo classifier (default: the first one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=160, help="requests per workload and round")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    deps = REPO / "build" / "ts_bench_deps"
    if deps.is_dir():
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(deps), os.environ.get("PYTHONPATH", "")) if p
        )
    store = Path(args.model_store).resolve()
    models = zoo_models(store)
    name = args.model or sorted(n for n, i in models.items() if i["kind"] == "classifier")[0]
    levels = [int(c) for c in args.concurrency.split(",")]
    body = scene_png()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bench_store = Path(tmp) / "store"
        bench_store.mkdir()
        (bench_store / "ours.mar").symlink_to(store / f"{name}.mar")
        build_stock_archive(store, name, bench_store)
        on = {"batchSize": 8, "maxBatchDelay": 5}
        off = {"batchSize": 1, "maxBatchDelay": 0}
        regs = {
            "ours": {"marName": "ours.mar", **on},
            "ours_nobatch": {"marName": "ours.mar", **off},
            "stock": {"marName": "stock.mar", **on},
            "stock_nobatch": {"marName": "stock.mar", **off},
        }
        cfg = ServeConfig.free_ports(
            model_store=bench_store, run_dir=Path(tmp) / "run", registrations=regs
        )
        paths = {
            "ours": "/predictions/ours",
            "ours_nobatch": "/predictions/ours_nobatch",
            "stock": "/predictions/stock",
            "stock_nobatch": "/predictions/stock_nobatch",
        }
        results: dict[str, list[dict[str, float]]] = {}
        with TorchServe(cfg) as server:
            for path in paths.values():  # warm-up
                run_load(server, path, body, 1, 20)
            for r in range(args.rounds):
                # Pairs run back to back, in alternating order, so that a slowdown
                # episode of the machine hits both sides of a ratio alike.
                pairs = [(("stock", "ours"), c, "") for c in levels]
                pairs.append((("stock", "stock_nobatch"), 16, " (batching pair)"))
                pairs.append((("ours", "ours_nobatch"), 16, " (batching pair)"))
                for keys, c, tag in pairs:
                    for key in keys if r % 2 == 0 else keys[::-1]:
                        res = run_load(server, paths[key], body, c, max(args.requests, 8 * c))
                        results.setdefault(f"{key}@{c}{tag}", []).append(res)
                print(f"[bench] round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
    print(f"model: {name}; {args.rounds} rounds; medians over rounds")
    print(f"{'workload':36s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}")
    for k, v in med.items():
        print(f"{k:36s} {v['p50_ms']:8.2f} {v['p90_ms']:8.2f} {v['p99_ms']:8.2f} {v['rps']:8.1f}")

    def ratios(a: str, b: str, metric: str) -> list[float]:
        return [x[metric] / y[metric] for x, y in zip(results[a], results[b], strict=True)]

    def show(label: str, values: list[float]) -> str:
        return (
            f"{label} {statistics.median(values):.2f}x (rounds {min(values):.2f}-{max(values):.2f})"
        )

    print("ratios (median over rounds of the per-round ratio):")
    for c in levels:
        p50 = ratios(f"ours@{c}", f"stock@{c}", "p50_ms")
        rps = ratios(f"ours@{c}", f"stock@{c}", "rps")
        print(f"  concurrency {c:2d}: " + show("p50 maps/stock", p50) + ", " + show("req/s", rps))
    for key in ("ours", "stock"):
        tag = " (batching pair)"
        on_off = ratios(f"{key}@16{tag}", f"{key}_nobatch@16{tag}", "rps")
        print(f"  {key}: " + show("batching on/off at 16 clients, req/s", on_off))
    print(f"load average before/after: {load_before} / {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": name, "medians": med, "rounds": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
