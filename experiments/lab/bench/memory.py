"""The memory and speed profile against sequence length (``experiments/memory.py``): peak memory and time of
each series in ``PROFILE_SERIES``, forward and forward+backward, each point in a fresh process; written as
``memory.csv``, ``memory.json`` and a log-log ``memory.png``, and merged when a series is re-measured.
"""

from __future__ import annotations

import json
import os

from ..plots import log_axes, pyplot, write_rows
from ..profiling import Record, machine, run_series, time_and_peak
from .cases import CASES

__all__ = ["PROFILE_SERIES", "pick_series", "memory_profile", "plot_profile", "write_profile", "profile_line",
           "read_profile", "merge_profile"]


PROFILE_SERIES = {
    # name: (case, params, needs peers)
    "sdpa causal": ("sdpa", dict(causal=True), False),
    "sdpa bidirectional": ("sdpa", dict(causal=False), False),
    "softmax N x N causal": ("naive_softmax", dict(causal=True), False),
    "eq.19 causal": ("linrope", dict(causal=True, rope="features"), False),
    "eq.19 bidirectional": ("linrope", dict(causal=False, rope="features"), False),
    "RoPE before features causal": ("linrope", dict(causal=True, rope="inputs"), False),
    "no RoPE causal": ("linrope", dict(causal=True, rope=None), False),
    "performer causal (its CPU path)": ("performer", dict(causal=True, path="default"), True),
    "performer + fast-transformers causal": ("performer", dict(causal=True, path="ft"), True),
    "performer bidirectional": ("performer", dict(causal=False), True),
}


def pick_series(series, known: dict) -> list[str]:
    """The series names asked for (None: all of ``known``), checked against ``known``."""
    names = list(known) if series is None else list(series)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"series: unknown {unknown}; expected some of {list(known)}")
    return names


def memory_profile(lengths, series=None, modes=("fwd", "fwd+bwd"), with_peers=False, device="cpu",
                   time_budget=60.0, memory_budget_mib=16384.0, repeats=3, on_record=None) -> list[Record]:
    """Peak memory and time against N for each series and mode; a series stops at the budgets (see
    ``lab.profiling.run_series``). Records carry ``params['series']`` and ``params['mode']``."""
    names = pick_series(series, PROFILE_SERIES)
    out = []
    for name in names:
        case, params, needs_peers = PROFILE_SERIES[name]
        if needs_peers and not with_peers:
            continue
        for mode in modes:
            p = dict(params, backward=(mode == "fwd+bwd"), device=device, series=name, mode=mode)
            out += run_series(CASES[case], lengths, p, time_budget=time_budget, memory_budget_mib=memory_budget_mib,
                              device=device, repeats=repeats, timeout=max(600.0, 8 * time_budget),
                              on_record=on_record)
    return out


def plot_profile(records: list[Record], path: str, title: str = "") -> None:
    """Log-log peak memory and time against N, one panel per (quantity, mode)."""
    plt = pyplot()
    modes = sorted({r.params["mode"] for r in records}, key=lambda m: m != "fwd")
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
    names = list(dict.fromkeys(r.params["series"] for r in records))
    for j, mode in enumerate(modes):
        for i, (attr, label) in enumerate((("peak_mib", "peak memory increase (MiB)"), ("seconds", "time (s)"))):
            ax = axes[i][j]
            for name in names:
                pts = [(r.params["n"], getattr(r, attr)) for r in records
                       if r.params["series"] == name and r.params["mode"] == mode and r.status == "ok"]
                if pts:
                    style = "-" if name.startswith(("eq.19", "RoPE", "no RoPE")) else "--"
                    ax.plot(*zip(*pts), style, marker="o", label=name)
            log_axes(ax, "sequence length N", label)
            ax.set_title(f"{label.split(' (')[0]}, {mode}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile(records: list[Record], out: str, meta: dict | None = None) -> list[dict]:
    """Write ``memory.csv``, ``memory.json`` and ``memory.png`` under ``out``; returns the CSV rows."""
    os.makedirs(out, exist_ok=True)
    rows = [dict(series=r.params["series"], mode=r.params["mode"], n=r.params["n"], seconds=r.seconds,
                 peak_mib=r.peak_mib, status=r.status) for r in records]
    write_rows(os.path.join(out, "memory.csv"), rows)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump({"machine": machine(), **(meta or {}), "records": [r.to_dict() for r in records]}, f, indent=1)
    plot_profile(records, os.path.join(out, "memory.png"), f"{machine()}; B=1 H=8 d=64 r=256 float32")
    return rows


def profile_line(row: dict) -> str:
    """One line for a row of ``write_profile``: series, mode, N, seconds, peak MiB and status."""
    return (f"{row['series']:<38} {row['mode']:<8} N={row['n']:<7} {time_and_peak(row['seconds'], row['peak_mib'])}  "
            f"{row['status']}")


def read_profile(out: str) -> list[Record]:
    """The records of an earlier ``write_profile`` (none if there is no ``memory.json``)."""
    path = os.path.join(out, "memory.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [Record(**r) for r in json.load(f)["records"]]


def merge_profile(old: list[Record], new: list[Record]) -> list[Record]:
    """``old`` with every (series, mode) that ``new`` measured replaced by the new records, in series order."""
    done = {(r.params["series"], r.params["mode"]) for r in new}
    merged = [r for r in old if (r.params["series"], r.params["mode"]) not in done] + new
    order = list(PROFILE_SERIES)
    return sorted(merged, key=lambda r: (order.index(r.params["series"]) if r.params["series"] in order else 99,
                                         r.params["mode"] != "fwd", r.params["n"]))
