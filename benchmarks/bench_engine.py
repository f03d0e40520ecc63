"""Engine benchmark: camserve against pytorch-grad-cam, captum and torchcam (issue 2).

Every cost is a ratio to one plain forward at batch 1 under ``torch.inference_mode``.
All workloads run interleaved in one process: each round runs every workload once
in a shuffled order with a plain forward between any two, and each workload's time
is divided by the faster of the two forwards around it. Reported numbers are
medians of those per-round ratios, so the machine's slowdown episodes (2-10x on
shared machines) hit both sides of a ratio alike.

Run from the repository root in the bench environment (see benchmarks/README.md):

    PYTHONPATH=$PWD benchmarks/.venv/bin/python benchmarks/bench_engine.py --json bench.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# pytorch-grad-cam's AblationCAM draws a progress bar; tqdm reads this when torch imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_crosscheck import cross_check
from engine_workloads import (
    PEERS,
    Setup,
    Workload,
    build_model,
    build_workloads,
    make_setup,
    peer_status,
    plain_forward,
)

GOALS = {  # workload -> (limit, what is compared)
    "cs.top5x7": (1.3, "ratio to the plain forward"),
    "cs.ablation.top5": (3.0, "ratio to the plain forward"),
    "cs.top5x7.b8": (1.0, "per-image cost at batch 8 / cost at batch 1"),
    "cs.ablation.b8": (1.0, "per-image cost at batch 8 / cost at batch 1"),
}
BATCH1_OF = {"cs.top5x7.b8": "cs.top5x7", "cs.ablation.b8": "cs.ablation.top5"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    keep = fn()
    _sync(device)
    elapsed = time.perf_counter() - t0
    del keep
    return elapsed


def run_rounds(workloads: list[Workload], base: Callable[[], Any], rounds: int,
               device: torch.device, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; returns per-workload times and paired ratios."""
    for _ in range(2):
        base()
    for w in workloads:
        if w.warmup:
            w.fn()
        w.timings.clear()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {w.name: [] for w in workloads}
    ratios: dict[str, list[float]] = {w.name: [] for w in workloads}
    bases: list[float] = []
    for r in range(rounds):
        order = [w for w in workloads
                 if w.max_runs is None or len(times[w.name]) < w.max_runs]
        rng.shuffle(order)
        before = _timed(base, device)
        bases.append(before)
        for w in order:
            tw = _timed(w.fn, device) / w.images
            after = _timed(base, device)
            bases.append(after)
            times[w.name].append(tw)
            # The forward just before and just after: a spike on one of them is dropped.
            ratios[w.name].append(tw / min(before, after))
            before = after
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    out: dict[str, dict[str, Any]] = {
        "fwd": {"group": "baseline", "what": "plain forward, inference_mode, batch 1",
                "median_s": statistics.median(bases), "ratio": 1.0, "n": len(bases),
                "ratio_min": 1.0, "ratio_max": 1.0}
    }
    for w in workloads:
        rs = ratios[w.name]
        entry: dict[str, Any] = {
            "group": w.group, "what": w.what, "images": w.images,
            "median_s": statistics.median(times[w.name]), "ratio": statistics.median(rs),
            "ratio_min": min(rs), "ratio_max": max(rs), "n": len(rs),
        }
        if w.timings:
            keys = sorted({k for t in w.timings for k in t})
            entry["stages_s"] = {k: statistics.median(t.get(k, 0.0) for t in w.timings)
                                 for k in keys}
        out[w.name] = entry
    for b8, b1 in BATCH1_OF.items():
        if b8 in out and b1 in out:
            out[b8]["per_image_vs_batch1"] = out[b8]["ratio"] / out[b1]["ratio"]
    return out


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_extra_mib(fn: Callable[[], Any]) -> tuple[float, float, str]:
    """Resident memory before ``fn`` and the peak above it while ``fn`` runs (MiB).

    ``ru_maxrss`` is inherited across fork and exec on Linux, so a probe started by
    a large process reads its parent's peak. The process's own high-water mark
    (``VmHWM``), reset through ``/proc/self/clear_refs``, has no such problem.
    """
    rss = _proc_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    if rss is not None and reset:
        fn()
        hwm = _proc_status_kib("VmHWM") or rss
        return rss / 1024, (hwm - rss) / 1024, "VmHWM (reset) - VmRSS"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return before / 1024, (after - before) / 1024, "ru_maxrss growth (lower bound)"


def probe_memory(args: argparse.Namespace) -> None:
    """Child process: peak memory of one workload above model + one plain forward."""
    model_name, wname = args.probe.split(":", 1)
    device = torch.device(args.device)
    s = _setup(model_name, args, device)
    wl = {w.name: w for w in _workloads(s, args)}
    base = plain_forward(s)
    base()
    fn = base if wname == "fwd" else wl[wname].fn
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        print(json.dumps({"before_mib": before / 2**20, "extra_mib": (peak - before) / 2**20,
                          "kind": "cuda max_memory_allocated - memory_allocated"}))
    else:
        before_mib, extra, kind = _peak_extra_mib(fn)
        print(json.dumps({"before_mib": before_mib, "extra_mib": extra, "kind": kind}))


def measure_memory(model_name: str, names: list[str], args: argparse.Namespace
                   ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        cmd = [sys.executable, __file__, "--probe", f"{model_name}:{name}", "--device", args.device,
               "--threads", str(args.threads), "--size", str(args.size), "--peers",
               ",".join(args.peers)]
        if args.slow_peers:
            cmd.append("--slow-peers")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {model_name} {name}: +{out[name]['extra_mib']:.0f} MiB",
              file=sys.stderr, flush=True)
    return out


def _setup(model_name: str, args: argparse.Namespace, device: torch.device) -> Setup:
    return make_setup(model_name, build_model(model_name, device), "layer4", args.size, device)


def _peers(args: argparse.Namespace) -> dict[str, str | None]:
    return peer_status(args.peers)


def _workloads(s: Setup, args: argparse.Namespace) -> list[Workload]:
    # pytorch-grad-cam's AblationCAM takes minutes per image on ResNet-50.
    slow_abl = args.slow_peers or s.name != "resnet50"
    return build_workloads(s, _peers(args), slow_abl, args.ablation_runs)


def profile(s: Setup, w: Workload, device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    w.fn()
    with tprofile(activities=acts, record_shapes=True) as prof:
        for _ in range(3):
            w.fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table: str = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows)
    return table


def _fmt_ratio(v: float) -> str:
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def report(results: dict[str, Any], peers: dict[str, str | None]) -> str:
    lines = []
    for model, res in results.items():
        t = res["timing"]
        if not t:
            lines.append(f"\n### {model}\n")
        else:
            base_ms = t["fwd"]["median_s"] * 1e3
            lines.append(f"\n### {model}: plain forward {base_ms:.1f} ms "
                         f"(median of {t['fwd']['n']})\n")
            lines.append("| workload | group | what | ratio (median) | min-max | ms / image | n |")
            lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: |")
            for name, e in t.items():
                lines.append(f"| {name} | {e['group']} | {e['what']} | {_fmt_ratio(e['ratio'])} "
                             f"| {e['ratio_min']:.2f}-{e['ratio_max']:.2f} | "
                             f"{e['median_s'] * 1e3:.1f} | {e['n']} |")
            lines.append("\nGoals:")
        for name, (limit, what) in GOALS.items():
            if name not in t:
                continue
            v = t[name].get("per_image_vs_batch1", t[name]["ratio"])
            verdict = "met" if v <= limit else "MISSED"
            lines.append(f"- {name}: {v:.2f} ({what}), goal <= {limit}: {verdict}")
        stages = {n: e["stages_s"] for n, e in t.items() if "stages_s" in e}
        if stages:
            lines.append("\ncamserve stage timings (median ms, from Explanation.timings):")
            for n, st in stages.items():
                parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in st.items())
                lines.append(f"- {n}: {parts}")
        if res.get("memory"):
            lines.append("\nPeak memory above model + one plain forward (one process per row):")
            for n, m in res["memory"].items():
                if "extra_mib" in m:
                    lines.append(f"- {n}: +{m['extra_mib']:.0f} MiB ({m['kind']})")
                else:
                    lines.append(f"- {n}: probe failed: {m['error']}")
        if res.get("crosscheck") is not None:
            lines.append("\nCross-check against peers (same model, input, top-5 targets; layer "
                         "resolution):\n")
            lines.append("| method | peer | max abs diff, normalised | max rel diff, raw |")
            lines.append("| --- | --- | ---: | ---: |")
            for c in res["crosscheck"]:
                raw = "n/a" if c["raw_max_rel"] is None else f"{c['raw_max_rel']:.1e}"
                lines.append(f"| {c['method']} | {c['peer']} | {c['norm_max_abs']:.1e} | {raw} |")
    skipped = {p: r for p, r in peers.items() if r is not None}
    for p, r in skipped.items():
        lines.append(f"\n{p}: {r}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--models", default="resnet50,resnet18",
                   help="comma-separated: resnet50, resnet18 (torchvision), tiny (built in)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--quick", action="store_true", help="1 round, no memory probes: a smoke test")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers to run if installed, or 'none'")
    p.add_argument("--slow-peers", action="store_true",
                   help="also run pytorch-grad-cam's AblationCAM on ResNet-50 (minutes per run)")
    p.add_argument("--ablation-runs", type=int, default=2,
                   help="timed runs of pytorch-grad-cam's AblationCAM (default 2)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak-memory probes, a process per workload (default: on unless --quick)")
    p.add_argument("--no-crosscheck", action="store_true", help="skip the numerical cross-check")
    p.add_argument("--profile", default=None, metavar="WORKLOAD",
                   help="print a torch.profiler table of this workload and exit")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.peers = [] if args.peers == "none" else [x for x in args.peers.split(",") if x]
    unknown = [x for x in args.peers if x not in PEERS]
    if unknown:
        p.error(f"unknown peers {unknown}; valid peers: {', '.join(PEERS)}")
    if args.quick:
        args.rounds = 1
        args.ablation_runs = 1
    if args.memory is None:
        args.memory = not args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        probe_memory(args)
        return 0
    device = torch.device(args.device)
    peers = _peers(args)
    results: dict[str, Any] = {}
    load_before = os.getloadavg()
    for model_name in [m for m in args.models.split(",") if m]:
        s = _setup(model_name, args, device)
        workloads = _workloads(s, args)
        if args.profile:
            wl = {w.name: w for w in workloads}
            print(profile(s, wl[args.profile], device, 30))
            return 0
        print(f"[{model_name}] {len(workloads)} workloads x {args.rounds} rounds",
              file=sys.stderr, flush=True)
        res: dict[str, Any] = {"timing": {}}
        if args.rounds > 0:
            res["timing"] = run_rounds(workloads, plain_forward(s), args.rounds, device)
        if not args.no_crosscheck:
            slow = any(w.name == "pgc.ablation.top1" for w in workloads)
            res["crosscheck"] = [c.__dict__ for c in cross_check(s, peers, with_ablation=slow)]
        if args.memory:
            names = ["fwd"] + [w.name for w in workloads
                               if not (w.name == "pgc.ablation.top1" and model_name == "resnet50")]
            if args.quick:
                names = ["fwd", "cs.top5x7"]
            res["memory"] = measure_memory(model_name, names, args)
        results[model_name] = res
        del s, workloads
    text = report(results, peers)
    print(text)
    print(f"\nthreads {args.threads}, device {args.device}, torch {torch.__version__}; "
          f"load average (1, 5, 15 min) before {load_before}, after {os.getloadavg()}: "
          "other processes on the same cores inflate multi-threaded timings")
    if args.json:
        meta = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "device": args.device, "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor()}",
            "peers": peers,
            "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
