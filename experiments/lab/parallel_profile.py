"""Peak memory per rank and time against N with sequence parallelism (``experiments/memory.py
--sequence-parallel``): one eq. 19 causal ``favor_attention`` call, forward or forward+backward, on one sequence
split across P gloo ranks, at the shape of the single-process memory profile's "eq.19 causal" series (B=1, H=8, d=64, r=256,
float32).

Each point runs through ``lab.profiling.run_point`` with this module as the runner: a fresh launcher
process per pass (time with the default allocator, then peak memory with ``MALLOC_MMAP_THRESHOLD_=131072``), which
for P > 1 starts P rank processes that join a gloo group (``file://`` rendezvous), build their slice of q, k, v
(``sequence_slice``: contiguous, in rank order) and measure themselves with ``profiling.measure`` (peak RSS
increase over the work, median time after a warm-up). The point's record is the worst rank's: the largest peak
and the largest median time (a step waits for its slowest rank). P = 1 is the plain call (``group=None``) in the
launcher itself. Every rank runs one thread.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

from . import profiling
from .plots import log_axes, pyplot, write_rows
from .train import sequence_slice

__all__ = ["CASE", "RUNNER", "SHAPE", "MODES", "case_sequence_parallel", "sequence_parallel_profile", "ratios",
           "summary_lines", "write_sequence_parallel_profile", "read_sequence_parallel_profile"]

CASE = "lab.parallel_profile:case_sequence_parallel"
RUNNER = "lab.parallel_profile"
SHAPE = dict(b=1, h=8, d=64, r=256, causal=True)  # the "eq.19 causal" series of experiments/memory.py


def case_sequence_parallel(n, ranks=1, rank=0, b=1, h=8, d=64, r=256, causal=True, backward=True, device="cpu",
                           **_):
    """Rank ``rank`` of ``ranks``: eq. 19 ``favor_attention`` (RoPE on the features) on its slice of a length-n
    sequence, in the default process group when ranks > 1; a callable doing forward (+ backward with a fixed
    random upstream gradient)."""
    from linrope.features import FavorPlus
    from linrope.functional import favor_attention
    from linrope.rotary import RotaryEmbedding

    sl = sequence_slice(n, ranks, rank)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(b, h, sl.stop - sl.start, d, generator=g).to(device).requires_grad_() for _ in range(3))
    W = FavorPlus(d, r, seed=0).projection.to(device)
    rotary = RotaryEmbedding(r)
    group = torch.distributed.group.WORLD if ranks > 1 else None
    grad = torch.randn(b, h, sl.stop - sl.start, d, generator=g).to(device)

    def step():
        out = favor_attention(q, k, v, W, causal=causal, rotary=rotary, group=group)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None
        return out

    return step if backward else torch.no_grad()(step)


def _die_with_parent() -> None:  # a rank left behind by a killed launcher would wait in gloo until its timeout
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank(job: dict) -> None:
    """One rank: join the group, build its slice, measure, print its record."""
    import torch.distributed as dist

    torch.set_num_threads(job.get("threads") or 1)
    dist.init_process_group("gloo", init_method=f"file://{job['init']}", rank=job["rank"],
                            world_size=job["params"]["ranks"], timeout=datetime.timedelta(seconds=300))
    params = dict(job["params"], rank=job["rank"])
    fn = profiling._load(job["case"])(**params)
    rec = profiling.measure(fn, case=job["case"], params=job["params"], warmup=job["warmup"],
                            repeats=job["repeats"], device=job["device"])
    dist.barrier()
    print(json.dumps(rec.to_dict()), flush=True)
    dist.destroy_process_group()


def _launch(job: dict) -> None:
    """One point: P = 1 in this process; otherwise P rank processes, and the worst rank's record."""
    ranks = job["params"].get("ranks", 1)
    if ranks == 1:
        profiling._child(job)
        return
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", RUNNER,
                                   json.dumps(dict(job, rank=i, init=os.path.join(tmp, "init")))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=_die_with_parent)
                 for i in range(ranks)]
        outs = [p.communicate() for p in procs]
    recs = []
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"rank {i} failed: {tail}")
        recs.append(profiling.Record(**json.loads(lines[-1])))
    slowest = max(recs, key=lambda r: r.seconds)
    rec = profiling.Record(job["case"], job["params"], "ok", slowest.seconds, slowest.times,
                           max(r.peak_mib for r in recs), job["device"])
    print(json.dumps(rec.to_dict()), flush=True)


MODES = ("fwd", "fwd+bwd")


def sequence_parallel_profile(lengths, ranks=(1, 2), modes=("fwd+bwd",), *, time_budget: float = 60.0,
                              memory_budget_mib: float = 10240.0, repeats: int = 3, timeout: float = 600.0,
                              on_record=None, **shape) -> list:
    """Peak memory per rank (the largest of the P ranks') and time (the slowest rank's median) against N for
    each P in ``ranks`` and each mode ('fwd', 'fwd+bwd'); each series stops at the budgets
    (``profiling.run_series``: after a point slower than ``time_budget`` s, or before one projected above
    ``memory_budget_mib`` per rank). ``shape`` overrides ``SHAPE`` (b, h, d, r, causal). Records carry
    ``params['ranks']`` and ``params['mode']``."""
    for p in ranks:
        if not isinstance(p, int) or p < 1:
            raise ValueError(f"sequence_parallel: expected ranks per sequence >= 1, got {p!r}")
        if min(lengths) < p:
            raise ValueError(f"lengths: expected at least {p} positions (one per rank), got {min(lengths)}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes: expected some of {MODES}, got {bad}")
    out = []
    for mode in modes:
        for p in ranks:
            params = dict(SHAPE, **shape, ranks=p, mode=mode, backward=mode == "fwd+bwd", device="cpu")
            out += profiling.run_series(CASE, lengths, params, time_budget=time_budget,
                                        memory_budget_mib=memory_budget_mib, on_record=on_record, repeats=repeats,
                                        timeout=timeout, threads=1, runner=RUNNER, device="cpu")
    return out


def _mode(r) -> str:
    return r.params.get("mode", "fwd+bwd" if r.params.get("backward", True) else "fwd")


def ratios(records) -> list[dict]:
    """Per N and mode measured at P = 1: each P's per-rank peak memory and time over P = 1's."""
    base = {(r.params["n"], _mode(r)): r for r in records if r.params["ranks"] == 1 and r.status == "ok"}
    rows = []
    for r in records:
        b = base.get((r.params["n"], _mode(r)))
        if r.params["ranks"] > 1 and r.status == "ok" and b is not None:
            rows.append({"mode": _mode(r), "n": r.params["n"], "ranks": r.params["ranks"],
                         "memory_ratio": r.peak_mib / b.peak_mib if b.peak_mib else math.nan,
                         "time_ratio": r.seconds / b.seconds if b.seconds else math.nan})
    return rows


def summary_lines(records) -> list[str]:
    """A line per point (mode, P, N, seconds, peak MiB per rank, status), then a line per ratio of ``ratios``."""
    lines = []
    for r in records:
        lines.append(f"{r.params['mode']:<8} P={r.params['ranks']:<3} N={r.params['n']:<7} "
                     f"{profiling.time_and_peak(r.seconds, r.peak_mib)}  {r.status}")
    for row in ratios(records):
        lines.append(f"{row['mode']:<8} N={row['n']:<7} P={row['ranks']}/P=1: memory per rank "
                     f"x{row['memory_ratio']:.3f}, time x{row['time_ratio']:.3f}")
    return lines


def _plot(records, path: str, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    modes = [m for m in MODES if any(_mode(r) == m for r in records)]
    style = {"fwd+bwd": "-", "fwd": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every = sorted({r.params["ranks"] for r in records})
    for mode in modes:
        for p in every:
            pts = sorted((r.params["n"], r.peak_mib, r.seconds) for r in records
                         if r.params["ranks"] == p and _mode(r) == mode and r.status == "ok")
            if pts:
                n, mib, sec = zip(*pts)
                label = f"{mode}, " + ("P = 1 (one process)" if p == 1 else f"P = {p} (gloo, {p} processes)")
                kw = dict(marker="o", ls=style[mode], color=colors[every.index(p) % len(colors)], label=label)
                axes[0].plot(n, mib, **kw)
                axes[1].plot(n, sec, **kw)
    rows = ratios(records)
    for mode in modes:
        for p in sorted({row["ranks"] for row in rows}):
            mine = [row for row in rows if row["ranks"] == p and row["mode"] == mode]
            if mine:
                n = [row["n"] for row in mine]
                axes[2].plot(n, [row["memory_ratio"] for row in mine], marker="o", ls=style[mode], color=colors[2],
                             label=f"peak memory per rank, {mode}, P = {p} / P = 1")
                axes[2].plot(n, [row["time_ratio"] for row in mine], marker="s", ls=style[mode], color=colors[3],
                             label=f"time, {mode}, P = {p} / P = 1")
    for p in sorted({row["ranks"] for row in rows}):
        axes[2].axhline(1 / p, color="gray", lw=0.8, ls=":")
    top = max([1.2] + [1.1 * v for row in rows for v in (row["memory_ratio"], row["time_ratio"]) if v == v])
    for ax, ylabel, log in ((axes[0], "peak RSS increase per rank (MiB)", True), (axes[1], "time (s)", True),
                            (axes[2], "ratio to P = 1", False)):
        log_axes(ax, "sequence length N (whole sequence)", ylabel, ylog=log)
        ax.legend(fontsize=7)
    axes[2].set_ylim(0, top)
    axes[0].set_title("peak memory per rank (largest of the P ranks)")
    axes[1].set_title("time (slowest rank's median)")
    axes[2].set_title("over P = 1 (dotted: 1/P)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sequence_parallel_profile(records, out: str, meta: dict | None = None) -> list[dict]:
    """Write ``memory_sp.csv`` (one row per point), ``ratios.csv`` (P > 1 over P = 1 at each N and mode),
    ``memory_sp.json`` (machine, ``meta``, records) and ``memory_sp.png`` under ``out``; returns the point rows."""
    os.makedirs(out, exist_ok=True)
    rows = [dict(mode=_mode(r), ranks=r.params["ranks"], n=r.params["n"], seconds=r.seconds, peak_mib=r.peak_mib,
                 status=r.status) for r in records]
    write_rows(os.path.join(out, "memory_sp.csv"), rows)
    write_rows(os.path.join(out, "ratios.csv"), ratios(records))
    shape = {k: records[0].params[k] for k in SHAPE} if records else dict(SHAPE)
    where = profiling.machine().rsplit(",", 1)[0]  # the threads are the ranks'
    with open(os.path.join(out, "memory_sp.json"), "w") as f:
        json.dump({"machine": where, "threads_per_rank": 1, "shape": shape, **(meta or {}),
                   "records": [r.to_dict() for r in records]}, f, indent=1)
    _plot(records, os.path.join(out, "memory_sp.png"),
          f"{where}; eq. 19 causal favor_attention, B={shape['b']} H={shape['h']} d={shape['d']} r={shape['r']} "
          f"float32, 1 thread per rank")
    return rows


def read_sequence_parallel_profile(out: str) -> list:
    """The records of an earlier ``write_sequence_parallel_profile`` (to redraw the figure)."""
    with open(os.path.join(out, "memory_sp.json")) as f:
        return [profiling.Record(**r) for r in json.load(f)["records"]]


if __name__ == "__main__":
    _job = json.loads(sys.argv[1])
    if "rank" in _job:
        _rank(_job)
    else:
        _launch(_job)
