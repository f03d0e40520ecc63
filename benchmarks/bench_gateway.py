"""The gRPC gateway's cost and its batching gain.

1. Latency at one client: ``ExplainService.run([item])`` in this process against
   the same item through ``camserve gateway`` (a subprocess on loopback, the
   in-process backend) with :class:`camserve.client.Client`; p50 and p99.
   Goal: p50 overhead <= 2 ms (GAP classifier).
2. Throughput (items/s) with batching on (``--max-batch-size 16``) and off
   (``1``) at 1, 4, 16 and 64 concurrent clients (asyncio, one channel).
   Goal: >= 3x at 16 clients.
3. ``--torchserve``: the same through the TorchServe backend (a real
   TorchServe with the handlers) against the in-process backend.
4. The ceiling of any batching gain: ``ExplainService.run`` in this process on
   16 items at once against 16 calls of one item (per-item time, interleaved).
   No front door can gain more from grouping than the service itself does.

Every item: one PNG of the model's input size, Grad-CAM of the top class,
``normalized`` maps. Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_gateway.py --model resnet_gap --torchserve \\
        --json benchmarks/results/gateway-<commit>.json
    .venv/bin/python benchmarks/bench_gateway.py --model efficientnet_lite0 --clients 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camserve.client import AsyncClient, Client  # noqa: E402
from camserve.gateway.inprocess import InProcessBackend  # noqa: E402
from camserve.service import ExplainRequest, ExplainResult  # noqa: E402


def image_png(size: int, seed: int = 0) -> bytes:
    """A scene from the zoo's examples, or random pixels, as PNG of ``size`` x ``size``."""
    example = ROOT / "model_store" / "examples" / "scene_0.png"
    if example.exists():
        img = Image.open(example).convert("RGB").resize((size, size))
    else:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


@dataclass
class Served:
    """A gateway subprocess: its address and its process (for its CPU time)."""

    address: str
    process: psutil.Process

    def cpu(self) -> float:
        """CPU seconds (user + system) the gateway has used so far."""
        t = self.process.cpu_times()
        return float(t.user + t.system)


@contextmanager
def gateway(
    model: str, store: Path, batch: int, *extra: str, delay_ms: float = 0.0
) -> Iterator[Served]:
    """``camserve gateway`` in a subprocess."""
    cmd = [
        sys.executable, "-m", "camserve.cli", "gateway", "--model", model,
        "--model-store", str(store), "--port", "0", "--no-metrics",
        "--max-batch-size", str(batch), "--max-batch-delay-ms", str(delay_ms),
        "--max-queue-size", "1024", *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    drain = None
    try:
        address = None
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"listening on (\S+:\d+)", line)
            if found:
                address = found.group(1)
                break
        if address is None:
            raise RuntimeError(f"the gateway did not start (exit {proc.wait()})")
        # keep reading its output, so that a full pipe never blocks it
        drain = threading.Thread(target=proc.stdout.read, daemon=True)
        drain.start()
        yield Served(address, psutil.Process(proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)
        if drain is not None:
            drain.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def _throughput(
    gw: Served, request: ExplainRequest, clients: int, items: int
) -> tuple[float, float, float]:
    async with AsyncClient(gw.address, timeout=600) as client:
        for _ in range(3):  # warm: channel, first batches
            await client.explain(request)
        left = items
        cpu0, own0 = gw.cpu(), time.process_time()
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                result = await client.explain(request)
                assert isinstance(result, ExplainResult)

        await asyncio.gather(*(worker() for _ in range(clients)))
        rate = items / (time.perf_counter() - start)
        gateway_cpu, client_cpu = gw.cpu() - cpu0, time.process_time() - own0
        return rate, gateway_cpu / items * 1000, client_cpu / items * 1000


def throughput(
    gw: Served, request: ExplainRequest, clients: int, items: int
) -> tuple[float, float, float]:
    """(items per second, CPU milliseconds per item of the gateway, and of the client).

    CPU time does not grow with the machine's load the way wall time does.
    """
    return asyncio.run(_throughput(gw, request, clients, items))


def cpu_per_call(call: Any, n: int, gw: Served | None = None) -> float:
    """CPU milliseconds per call, of this process and of the gateway if given."""
    cpu0, own0 = gw.cpu() if gw else 0.0, time.process_time()
    for _ in range(n):
        call()
    cpu = (gw.cpu() - cpu0 if gw else 0.0) + time.process_time() - own0
    return cpu / n * 1000


@contextmanager
def torchserve(model: str, store: Path) -> Iterator[Any]:
    from camserve.torchserve.config import ServeConfig
    from camserve.torchserve.process import TorchServe

    with tempfile.TemporaryDirectory(prefix="camserve-bench-ts-") as tmp:
        server = TorchServe(
            ServeConfig.free_ports(
                model_store=store,
                run_dir=Path(tmp),
                models=[model],
                batch_size=16,
                max_batch_delay_ms=5,
            )
        )
        server.start()
        try:
            server.wait_ready(timeout=300)
            yield server
        finally:
            server.stop()


def interleaved(calls: dict[str, Any], n: int, warmup: int) -> dict[str, dict[str, float]]:
    """Latency of several calls measured alternately (the machine's load hits all alike)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(n):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    out = {
        k: {"p50_ms": pct(v, 50) * 1000, "p99_ms": pct(v, 99) * 1000, "n": n}
        for k, v in times.items()
    }
    names = list(calls)
    for other in names[1:]:
        diffs = [b - a for a, b in zip(times[names[0]], times[other], strict=True)]
        out[other]["paired_p50_overhead_ms"] = pct(diffs, 50) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet_gap")
    parser.add_argument("--store", default=str(ROOT / "model_store"))
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--n", type=int, default=200, help="latency samples")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (median)")
    parser.add_argument(
        "--items",
        type=int,
        default=0,
        help="items per throughput run (default: max(64, 16 x clients))",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="the batching gateway's max batch delay (default 0: whatever is queued)",
    )
    parser.add_argument("--torchserve", action="store_true", help="also the TorchServe backend")
    parser.add_argument("--quick", action="store_true", help="few samples (smoke test)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the gateways inherit it
    import torch

    torch.set_num_threads(args.threads)
    store = Path(args.store).resolve()
    clients = [int(c) for c in args.clients.split(",")]
    n, warmup, rounds = (10, 2, 1) if args.quick else (args.n, 20, args.rounds)

    backend = InProcessBackend.load([args.model], store)
    _, h, _ = backend.describe(args.model).input_size
    request = ExplainRequest(args.model, image=image_png(h), methods=("gradcam",), top_k=1)
    results: dict[str, Any] = {
        "model": args.model,
        "input": h,
        "clients": clients,
        "threads": args.threads,
        "max_batch_delay_ms": args.delay_ms,
    }

    def items_for(c: int) -> int:
        return args.items or (max(16, 4 * c) if args.quick else max(64, 16 * c))

    with contextlib.ExitStack() as stack:
        on = stack.enter_context(gateway(args.model, store, 16, delay_ms=args.delay_ms))
        off = stack.enter_context(gateway(args.model, store, 1))
        client = stack.enter_context(Client(on.address, timeout=600))
        lat = interleaved(
            {"inprocess": lambda: backend.run([request]), "grpc": lambda: client.explain(request)},
            n,
            warmup,
        )
        lat["inprocess"]["cpu_ms"] = cpu_per_call(lambda: backend.run([request]), n)
        lat["grpc"]["cpu_ms"] = cpu_per_call(lambda: client.explain(request), n, on)
        results["latency"] = lat
        batch16 = [request] * 16
        ceiling = interleaved(
            {"one_at_a_time": lambda: [backend.run([request]) for _ in range(16)],
             "sixteen_at_once": lambda: backend.run(batch16)},
            max(n // 10, 5),
            max(warmup // 10, 2),
        )  # fmt: skip
        results["service_batching_ceiling"] = {
            **ceiling,
            "gain": ceiling["one_at_a_time"]["p50_ms"] / ceiling["sixteen_at_once"]["p50_ms"],
        }
        print(
            "[ceiling] the service alone, 16 items: one at a time "
            f"{ceiling['one_at_a_time']['p50_ms'] / 16:.2f} ms per item, in one call "
            f"{ceiling['sixteen_at_once']['p50_ms'] / 16:.2f} ms per item: "
            f"{results['service_batching_ceiling']['gain']:.2f}x"
        )
        overhead = lat["grpc"]["paired_p50_overhead_ms"]
        cpu_overhead = lat["grpc"]["cpu_ms"] - lat["inprocess"]["cpu_ms"]
        print(
            f"[latency] in-process p50 {lat['inprocess']['p50_ms']:.2f} ms p99 "
            f"{lat['inprocess']['p99_ms']:.2f} ms; gRPC p50 {lat['grpc']['p50_ms']:.2f} ms p99 "
            f"{lat['grpc']['p99_ms']:.2f} ms; paired p50 overhead {overhead:.2f} ms; CPU per "
            f"item {lat['inprocess']['cpu_ms']:.2f} ms in-process, {lat['grpc']['cpu_ms']:.2f} ms"
            f" over gRPC (gateway + client): +{cpu_overhead:.2f} ms"
        )
        runs: dict[str, dict[int, list[float]]] = {"off": {}, "on": {}}
        cpu_runs: dict[str, dict[int, list[float]]] = {"off": {}, "on": {}}
        client_runs: dict[str, dict[int, list[float]]] = {"off": {}, "on": {}}
        for _ in range(rounds):
            for c in clients:
                for label, gw in (("off", off), ("on", on)):
                    v, cpu, client_cpu = throughput(gw, request, c, items_for(c))
                    runs[label].setdefault(c, []).append(v)
                    cpu_runs[label].setdefault(c, []).append(cpu)
                    client_runs[label].setdefault(c, []).append(client_cpu)
        tput = {k: {c: statistics.median(v) for c, v in d.items()} for k, d in runs.items()}
        cpu_med = {k: {c: statistics.median(v) for c, v in d.items()} for k, d in cpu_runs.items()}
        results["throughput"] = {
            "batching_off": tput["off"],
            "batching_on": tput["on"],
            "runs": runs,
            "gateway_cpu_ms_per_item": cpu_med,
            "gateway_cpu_runs": cpu_runs,
            "client_cpu_runs": client_runs,
        }
        for label in ("off", "on"):
            print(
                f"[cpu] batching {label}, the gateway's CPU ms per item: "
                + ", ".join(f"{c} clients {v:.2f}" for c, v in cpu_med[label].items())
            )
        cpu_gain = {c: cpu_med["off"][c] / cpu_med["on"][c] for c in clients}
        results["gateway_cpu_gain"] = cpu_gain
        gain = {c: tput["on"][c] / tput["off"][c] for c in clients}
        results["batching_gain"] = gain
        for label in ("off", "on"):
            print(
                f"[throughput] batching {label}: "
                + ", ".join(f"{c} clients {v:.1f}/s" for c, v in tput[label].items())
            )
        print(
            "[throughput] batching gain: "
            + ", ".join(f"{c} clients {g:.2f}x" for c, g in gain.items())
        )

        if args.torchserve:
            ts = stack.enter_context(torchserve(args.model, store))
            extra = (
                "--backend", "torchserve", "--torchserve-address", ts.grpc_target,
                "--torchserve-management-address",
                f"{ts.config.host}:{ts.config.grpc_management_port}",
                "--torchserve-key-file", str(ts.key_file),
            )  # fmt: skip
            remote = stack.enter_context(gateway(args.model, store, 16, *extra))
            ts_client = stack.enter_context(Client(remote.address, timeout=600))
            ts_lat = interleaved(
                {
                    "inprocess_backend": lambda: client.explain(request),
                    "torchserve_backend": lambda: ts_client.explain(request),
                },
                n,
                warmup,
            )
            ts_runs: dict[str, dict[int, list[float]]] = {"inprocess": {}, "torchserve": {}}
            for _ in range(rounds):
                for c in clients:
                    for label, gw in (("inprocess", on), ("torchserve", remote)):
                        v, _, _ = throughput(gw, request, c, items_for(c))
                        ts_runs[label].setdefault(c, []).append(v)
            ts_tput = {
                k: {c: statistics.median(v) for c, v in d.items()} for k, d in ts_runs.items()
            }
            results["backends"] = {"latency": ts_lat, "throughput": ts_tput, "runs": ts_runs}
            print(
                f"[backends] gRPC p50: in-process backend "
                f"{ts_lat['inprocess_backend']['p50_ms']:.2f} ms, TorchServe backend "
                f"{ts_lat['torchserve_backend']['p50_ms']:.2f} ms"
            )
            for label in ("inprocess", "torchserve"):
                print(
                    f"[backends] {label}: "
                    + ", ".join(f"{c} clients {v:.1f}/s" for c, v in ts_tput[label].items())
                )

    print(
        "[cpu] the gateway's CPU per item, batching off / on: "
        + ", ".join(f"{c} clients {g:.2f}x" for c, g in cpu_gain.items())
    )
    print(
        f"Goals: p50 overhead {overhead:.2f} ms (<= 2 ms); batching gain at 16 clients "
        + (f"{gain[16]:.2f}x (>= 3x)" if 16 in clients else "n/a")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
