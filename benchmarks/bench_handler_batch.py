"""In-process cost of one TorchServe batch through the handlers' path, without TorchServe.

Parses N raw requests like the TorchServe benchmark's (a PNG body and
``X-Camserve-Methods``), answers them with :class:`camserve.service.ExplainService`
and encodes the JSON answers, as ``handlers/camserve_base.py`` does; prints the
median and quartiles of the per-batch wall time and the median CPU time (the
process's, steadier than wall time on a shared machine).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_handler_batch.py --batches 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from camserve.codecs.http import encode_outcome, parse_request
from camserve.models import resolve
from camserve.service import ExplainService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--model", default="resnet_gap")
    parser.add_argument("--image", default="model_store/examples/scene_0.png")
    parser.add_argument("--methods", default="gradcam")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    service = ExplainService.from_specs([resolve(args.model, args.store)], device="cpu")
    body = Path(args.image).read_bytes()
    headers = {"X-Camserve-Methods": args.methods}
    raws = [{"body": bytearray(body)} for _ in range(args.batch)]

    def batch() -> None:
        requests = [parse_request(r, headers, model=args.model) for r in raws]
        answers = [encode_outcome(o) for o in service.run(requests)]
        assert all(a[0] == 200 for a in answers), answers[0][2][:200]

    for _ in range(20):
        batch()
    times = []
    cpu = []
    for _ in range(args.batches):
        c0 = time.process_time()
        t0 = time.perf_counter()
        batch()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    q = statistics.quantiles(times, n=4)
    wall = statistics.median(times) * 1e3
    print(
        f"{args.model} batch of {args.batch} ({args.methods}): median {wall:.2f} ms "
        f"(quartiles {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f} ms) over {args.batches} batches; "
        f"CPU median {statistics.median(cpu) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
