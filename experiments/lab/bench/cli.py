"""The command line of the performance targets: ``python experiments/bench.py``.

Measures the machine first (``lab.profiling.machine_info``: CPU model, vector extensions, threads, and the
sgemm and small-bmm rates measured in this process), then every point of ``targets()`` in fresh processes,
round-robin over ``--rounds`` rounds (so slow drifts of the machine hit every point alike), and prints the machine
block, the table of ratios and the points as markdown. ``--json`` stores the machine block too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json

from tqdm import tqdm

from ..profiling import machine, machine_info, run_point
from .cases import CASES, peers_available
from .targets import combine_rounds, evaluate, layer_variant_points, layer_variant_rows, targets, variant_rows

__all__ = ["main"]


def main(argv=None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog, description="linrope performance targets, as ratios measured in one run")
    p.add_argument("--n", type=int, default=16384, help="sequence length of the speed targets")
    p.add_argument("--n-mem", type=int, default=4096, help="sequence length of the performer memory target")
    p.add_argument("--no-peers", action="store_true", help="skip performer-pytorch / fast-transformers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3,
                   help="fresh processes per point, interleaved across points; a point's time is the median of "
                        "its processes' medians (a process's time varies more than runs within it)")
    p.add_argument("--kernel", choices=("torch", "cpp"), default="torch",
                   help="the kernel of linrope's points (functions and layer); cpp adds eq. 19 with torch as a row")
    p.add_argument("--json", help="write the records and targets here")
    p.add_argument("--compare", metavar="REV", help="instead: time this checkout against git revision REV on the "
                                                     "points of lab.bench.compare, interleaved")
    p.add_argument("--fusion", action="store_true",
                   help="instead: time the engine's elementwise passes on one group, eager against torch.compile")
    p.add_argument("--breakdown", action="store_true",
                   help="instead: split the time of causal eq. 19 at --n into matrix products, other tensor ops "
                        "and the rest (torch.profiler)")
    p.add_argument("--layer-variants", action="store_true",
                   help="instead: the layer (dim 512, 8 heads, r = 256, forward+backward) with each research "
                        "variant (decay, gate, learned and selective rotations) at --n, time against eq. 19 + decay")
    p.add_argument("--gpu", action="store_true",
                   help="instead: the CUDA profile (time and memory against N, eq. 19 against SDPA, a group-size "
                        "sweep and the host synchronisations of one call), written under --out")
    p.add_argument("--lengths", type=int, nargs="+", default=[2**e for e in range(10, 21)],
                   help="--gpu: sequence lengths")
    p.add_argument("--time-budget", type=float, default=2.0, help="--gpu: end a series after a point this slow (s)")
    p.add_argument("--out", default="experiments/results/bench/gpu", help="--gpu: results folder")
    args = p.parse_args(argv)
    if args.gpu:
        return _gpu(p, args)
    if args.compare:
        return _compare(p, args)
    if args.fusion:
        return _fusion(args)
    if args.breakdown:
        return _breakdown(p, args)
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")
    if args.layer_variants:
        return _layer_variants(args)
    peers = peers_available()
    with_peers = not args.no_peers and all(peers.values())
    if not args.no_peers and not with_peers:
        print(f"peers missing ({', '.join(k for k, v in peers.items() if not v)}): their targets are skipped")
    info = machine_info()  # in this process, before the points (whose subprocesses use the same thread count)
    points = targets(args.n, args.n_mem, with_peers, args.kernel)
    records = _measure(points, args.rounds, args.repeats)
    table = evaluate(records, args.n, args.n_mem, sgemm_gflops=info.sgemm_gflops)
    print(f"\n{machine()}, {datetime.date.today()}, kernel={args.kernel!r}, float32, B=1 H=8 d=64 r=256, "
          f"forward+backward, "
          f"median over {args.rounds} fresh processes per point of the median of {args.repeats} runs after a "
          f"warm-up")
    print("\n" + info.markdown())
    print("\n| target | measured | bound | met | how |\n|---|---:|---:|:---:|---|")
    for t in table:
        m = "n/a" if t.measured is None else f"{t.measured:.2f}"
        ok = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        print(f"| {t.name} | {m} | {t.op} {t.bound:.2f} | {ok} | {t.detail} |")
    variants = variant_rows(records)
    print(f"\n| attention (causal, N={args.n}) | median s | time vs eq. 19 | peak MiB |\n|---|---:|---:|---:|")
    for v in variants:
        fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
        print(f"| {v['variant']} | {fmt(v['seconds'], '.3f')} | {fmt(v['vs_eq19'], '.2f')} | "
              f"{fmt(v['peak_mib'], '.0f')} |")
    print("\n| point | case | params | median s | peak MiB | status |\n|---|---|---|---:|---:|---|")
    for key, case, params in points:
        r = records[key]
        s = "" if r.seconds is None else f"{r.seconds:.3f}"
        m = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        print(f"| {key} | {case} | {params} | {s} | {m} | {r.status} |")
    if args.json:
        _write_json(args.json, info, records={k: v.to_dict() for k, v in records.items()},
                    targets=[dict(t.__dict__, met=t.met) for t in table], variants=variants)


def _measure(points, rounds: int, repeats: int) -> dict:
    """Records of ``points`` ((key, case, params)), each the median of ``rounds`` fresh processes, run round-robin
    so that slow drifts of the machine hit every point alike; a failed or timed-out point is not run again."""
    records = {}
    with tqdm(total=len(points) * rounds, desc="points", unit="pt") as bar:
        for k in range(rounds):
            for key, case, params in points:
                if k == 0 or records[key].status == "ok":
                    rec = run_point(CASES[case], params, repeats=repeats, timeout=900, memory=True)
                    records[key] = rec if k == 0 else combine_rounds(records[key], rec)
                bar.update()
    return records


def _layer_variants(args) -> None:
    info = machine_info()
    records = _measure(layer_variant_points(args.n), args.rounds, args.repeats)
    rows = layer_variant_rows(records)
    print(f"\n{machine()}, {datetime.date.today()}, LinearRotaryAttention(512, heads=8, dim_head=64, "
          f"nb_features=256, causal=True), B=1, N={args.n}, float32, forward+backward, median over {args.rounds} "
          f"fresh processes per point of the median of {args.repeats} runs after a warm-up")
    print("\n" + info.markdown())
    print(f"\n| layer variant (N={args.n}) | options | median s | time vs eq. 19 + decay | peak MiB |\n"
          "|---|---|---:|---:|---:|")
    fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    for v in rows:
        print(f"| {v['variant']} | `{v['options']}` | {fmt(v['seconds'], '.3f')} | {fmt(v['vs_decay'], '.2f')} | "
              f"{fmt(v['peak_mib'], '.0f')} |")
    if args.json:
        _write_json(args.json, info, n=args.n, records={k: v.to_dict() for k, v in records.items()}, rows=rows)


def _write_json(path: str, info, **payload) -> None:
    """``payload`` with the machine block and the date, as JSON at ``path``."""
    with open(path, "w") as f:
        json.dump({"machine": machine(), "machine_info": info.to_dict(), "date": str(datetime.date.today()),
                   **payload}, f, indent=1)


def _compare(p, args) -> None:
    from .compare import compare
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")
    info = machine_info()  # in this process, before the points
    with tqdm(total=0, desc="points", unit="pt") as bar:
        try:
            rows = compare(args.compare, rounds=args.rounds, repeats=args.repeats, on_record=lambda *a: bar.update())
        except ValueError as e:
            p.error(str(e))
    print(f"\n{machine()}, {datetime.date.today()}; {args.compare} (then) against this checkout (now); median over "
          f"{args.rounds} fresh processes per point and version, interleaved, of the median of {args.repeats} runs")
    print("\n" + info.markdown())
    print("\n| point | then s | now s | now / then | then MiB | now MiB |\n|---|---:|---:|---:|---:|---:|")
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    secs = lambda r, v: r[f"{v}_status"] if r[f"{v}_s"] is None else format(r[f"{v}_s"], ".3f")  # noqa: E731
    for r in rows:
        print(f"| {r['point']} | {secs(r, 'then')} | {secs(r, 'now')} | "
              f"{fmt(r.get('now_over_then'), '.2f')} | {fmt(r['then_mib'], '.0f')} | {fmt(r['now_mib'], '.0f')} |")
    if args.json:
        _write_json(args.json, info, compare=args.compare, rows=rows)


def _probe_report(args, info, heading: str, body: str, key: str, payload: dict) -> None:
    """Print a probe's result under the machine block; with ``--json``, store both (``key``: the payload's name)."""
    print(f"\n{machine()}, {datetime.date.today()}; {heading}")
    print("\n" + info.markdown())
    print("\n" + body)
    if args.json:
        _write_json(args.json, info, **{key: payload})


def _fusion(args) -> None:
    from .fusion import fusion_probe
    info = machine_info()
    result = fusion_probe()
    _probe_report(args, info, "medians of 7 interleaved rounds of 50 calls", result.markdown(), "fusion",
                  dict(result.__dict__, elementwise_ratio=result.elementwise_ratio))


def _breakdown(p, args) -> None:
    from dataclasses import asdict

    from .breakdown import time_breakdown
    if args.n < 1 or args.repeats < 1:
        p.error(f"--n and --repeats must be >= 1, got {args.n} and {args.repeats}")
    info = machine_info()
    result = time_breakdown(args.n, repeats=max(args.repeats, 5), sgemm_gflops=info.sgemm_gflops)
    _probe_report(args, info, "the bench's 'ours' point in this process", result.markdown(), "breakdown",
                  dict(asdict(result), flop_rate=result.flop_rate, ceiling=result.ceiling))


def _gpu(p, args) -> None:
    import torch

    from .gpu import GPU_SERIES, gpu_info, gpu_profile, group_sweep, host_syncs, write_gpu_profile
    if not torch.cuda.is_available():
        p.error("--gpu: needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False)")
    if min(args.lengths) < 1 or args.repeats < 1:
        p.error(f"--lengths and --repeats must be >= 1, got {args.lengths} and {args.repeats}")
    triton = importlib.util.find_spec("triton") is not None  # kernel="triton" needs the package
    series = [s for s in GPU_SERIES if "triton" not in s or triton]
    if len(series) < len(GPU_SERIES):
        print("triton does not import here: the triton series is skipped")
    info = gpu_info()
    print(info.markdown())
    def done(r, bar):  # a line per point as it ends: a run cut short still shows what it measured
        bar.update()
        bar.write(f"{r.params['series']:<30} N={r.params['n']:<8} "
                  f"{'' if r.seconds is None else f'{r.seconds:.4f} s':>10} "
                  f"{'' if r.peak_mib is None else f'{r.peak_mib:.0f} MiB':>10}  {r.status}")

    with tqdm(desc="points", unit="pt") as bar:
        records = gpu_profile(args.lengths, series, time_budget=args.time_budget, repeats=args.repeats,
                              on_record=lambda r: done(r, bar))
    n_sweep = 65536
    kernels = ("torch", "triton") if triton else ("torch",)
    sweep = group_sweep(n_sweep, [512, 2048, 8192, 32768, None], repeats=args.repeats, kernels=kernels)
    syncs = host_syncs()
    write_gpu_profile(records, args.out, dict(gpu=info, date=str(datetime.date.today()), sweep_n=n_sweep,
                                              sweep=[r.to_dict() for r in sweep], host_syncs=syncs,
                                              cpu=machine()))
    print(f"\n{info.name}, {datetime.date.today()}; causal, B=1 H=8 d=64 (eq. 19: r=256, float32), forward+backward, "
          f"median of {args.repeats} runs after a warm-up (CUDA events); peak = max allocated above the inputs")
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    by = {(r.params["series"], r.params["n"]): r for r in records}
    print("\n| N | " + " | ".join(f"{s} s | MiB" for s in series) + " |")
    print("|---:|" + "---:|---:|" * len(series))
    for n in sorted(args.lengths):
        cells = []
        for s in series:
            r = by[(s, n)]
            cells += [fmt(r.seconds, ".4f") if r.status == "ok" else r.status.split(":")[0],
                      fmt(r.peak_mib, ".0f")]
        print(f"| {n} | " + " | ".join(cells) + " |")
    base = "eq.19 causal"
    print("\n| N | " + " | ".join(f"{s} / {base}" for s in series if s != base) + " |  (time ratios)")
    print("|---:|" + "---:|" * (len(series) - 1))
    for n in sorted(args.lengths):
        b = by[(base, n)]
        cells = [fmt(by[(s, n)].seconds / b.seconds, ".2f") if b.status == by[(s, n)].status == "ok" else ""
                 for s in series if s != base]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\n| group size (eq. 19, N={n_sweep}) | s | peak MiB |\n|---|---:|---:|")
    for r in sweep:
        print(f"| {r.params['series']} | {fmt(r.seconds, '.4f')} | {fmt(r.peak_mib, '.0f')} |")
    print(f"\nhost synchronisations of one eq. 19 call at N=16384: {syncs}")
    print(f"results: {args.out}/gpu.csv, gpu.json, gpu.png")
