"""Figures of the experiments, drawn from the rows the runs wrote (so any figure can be rebuilt offline).

Rows are dicts as in ``results.csv``: ``variant``, ``length``, ``seed``, ``step``, ``split`` and the metric.
Across seeds a line is the mean and the shaded band spans the minimum to the maximum (``finite_stats``, which
the tables of ``lab.sweeps`` use too).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

__all__ = ["pyplot", "color", "read_rows", "write_rows", "plot_curves", "plot_long_context", "plot_accuracy_vs_length",
           "plot_extrapolation", "finite_stats", "lower_is_better", "best_first", "diverged", "log_axes"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed), imported on first use: the lab's
    only way to it, so that importing a lab module never needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results CSV written by ``lab.sweeps`` with numbers parsed (empty cells become None), so
    that a figure can be redrawn offline, e.g. ``plot_curves(read_rows("results.csv"), "curves.png")``."""
    def parse(text: str):
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write dict rows as a CSV whose columns are every key, in first-seen order (``read_rows`` reads it back)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def finite_stats(values: list[float]) -> dict:
    """``mean``, ``std`` (sample; 0 for one value), ``min`` and ``max`` of the finite values (all NaN if none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": sum(finite) / len(finite), "std": std, "min": min(finite), "max": max(finite)}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller ``metric`` is the better result (bits per byte, loss) or a larger one (accuracy)."""
    return metric in ("bpb", "loss")


def best_first(summary: list[dict], metric: str) -> list[dict]:
    """Summary rows (``lab.sweeps.summarize``) by length, and within a length best ``metric`` first (non-finite
    last)."""
    sign = 1 if lower_is_better(metric) else -1

    def key(r):
        value = r[metric] if r[metric] is not None else math.nan
        return r["length"], not math.isfinite(value), sign * value if math.isfinite(value) else 0.0
    return sorted(summary, key=key)


def diverged(row: dict) -> bool:
    """Whether a summary row's flags say its runs learned nothing ('unigram') or ended non-finite ('nan')."""
    return bool({"nan", "unigram"} & set(str(row.get("flags", "")).split()))


def color(i: int):
    """The i-th color of the lab's figures (tab10, cycling)."""
    return pyplot().get_cmap("tab10")(i % 10)


def _mean_band(ax, xs, groups: list[list[float]], color, label: str | None, fmt: str = "-", band: bool = True,
               **line):
    """The mean of each group of values against ``xs`` (``line``: more matplotlib line properties), and the band
    min..max shaded (unless ``band`` is False)."""
    stats = [finite_stats(g) for g in groups]
    ax.plot(xs, [s["mean"] for s in stats], fmt, color=color, label=label, **line)
    if band:
        ax.fill_between(xs, [s["min"] for s in stats], [s["max"] for s in stats], color=color, alpha=0.2)


def log_axes(ax, xlabel: str, ylabel: str, ylog: bool = True) -> None:
    """The axes of a quantity against a length: x log base 2, y log (unless ``ylog`` is False), labels, grid."""
    ax.set_xscale("log", base=2)
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, path: str | Path, axes=(), title: str = "") -> None:
    """Grid and legend on ``axes``, the figure's title, then write ``path`` and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def _curve(rows: list[dict], n: int, variant: str, split: str, key: str, scale: float = 1.0
           ) -> tuple[dict[int, list[float]], set]:
    """``key`` times ``scale`` of one variant at length ``n`` in ``split``: {step: [one value per seed]}, and the
    seeds seen."""
    curve: dict[int, list[float]] = defaultdict(list)
    seeds = set()
    for r in rows:
        if r["length"] == n and r["variant"] == variant and r["split"] == split and r.get(key) is not None:
            curve[int(r["step"])].append(float(r[key]) * scale)
            seeds.add(r["seed"])
    return curve, seeds


def plot_curves(rows: list[dict], path: str | Path, *, metric: str = "bpb", title: str = "",
                reference: float | None = None, reference_label: str = "") -> None:
    """One column per sequence length: validation ``metric`` (top) and training loss in the same units (bottom,
    bits per byte for ``metric='bpb'``, nats otherwise) against step, one line per variant (mean over seeds, band
    min..max). ``reference`` draws a dotted horizontal line (e.g. the unigram entropy)."""
    plt = pyplot()
    lengths = sorted({r["length"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(2, len(lengths), figsize=(max(7.0, 5.5 * len(lengths)), 7.5), squeeze=False,
                             sharex="col")
    for col, n in enumerate(lengths):
        for row_i, (split, key) in enumerate((("val", metric), ("train", "loss"))):
            ax = axes[row_i][col]
            for i, variant in enumerate(variants):
                scale = 1 / math.log(2) if split == "train" and metric == "bpb" else 1.0
                curve, seeds = _curve(rows, n, variant, split, key, scale)
                if not curve:
                    continue
                steps = sorted(curve)
                label = f"{variant} ({len(seeds)} seed{'s' * (len(seeds) != 1)})"
                _mean_band(ax, steps, [curve[s] for s in steps], color(i), label, band=len(seeds) > 1)
            if reference is not None and split == "val":
                ax.axhline(reference, color="gray", linestyle=":", label=reference_label)
            unit = ("bits per byte" if metric == "bpb" else "loss (nats)") if split == "train" else metric
            ax.set_title(f"N = {n}: {split} {unit}")
            ax.set_ylabel(f"{split} {unit}")
            ax.grid(alpha=0.3)
            if metric == "bpb":  # the first evaluation (8 bits, untrained) would squash every curve
                finite = [float(r[key]) / (math.log(2) if split == "train" else 1) for r in rows
                          if r["length"] == n and r["split"] == split and r["step"] > 0 and r.get(key) is not None
                          and math.isfinite(float(r[key]))]
                if finite:
                    top = min(max(finite), 6.5)
                    if reference is not None and split == "val":
                        top = max(top, reference)
                    ax.set_ylim(min(finite) - 0.1, top + 0.1)
        axes[-1][col].set_xlabel("step")
        axes[0][col].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_long_context(rows: list[dict], summary: list[dict], path: str | Path, *, metric: str = "bpb",
                      title: str = "", reference: float | None = None, reference_label: str = "",
                      highlight: str | None = None, labels: dict | None = None) -> None:
    """One row of two panels per sequence length. Left: validation ``metric`` against step (``rows`` as in
    ``results.csv``), one line per variant (mean over seeds, band min..max), the y-axis fitted to the variants
    that train after the first evaluation; a variant whose summary flags say it diverged (``diverged``) is drawn
    dashed and clipped to the axis and named so in the legend. Right: each variant's final ``metric``
    (``summary`` rows as in ``summary.csv``), best first, bars min..max over seeds. ``highlight`` (a variant)
    stands out: a thick line with markers, a framed bar. ``labels`` maps variants to a few words shown beside
    their names. ``reference`` is a dotted line (e.g. the unigram entropy), named in the legend when off scale."""
    plt = pyplot()
    labels = labels or {}
    lengths = sorted({r["length"] for r in summary})
    palette = {v: color(i) for i, v in enumerate(dict.fromkeys(r["variant"] for r in summary))}
    fig, axes = plt.subplots(len(lengths), 2, figsize=(13, 5 * len(lengths)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1]})
    for (ax, bars), n in zip(axes, lengths):
        final = [r for r in best_first(summary, metric) if r["length"] == n]
        failed = {r["variant"] for r in final if diverged(r)}
        trained = [float(r[metric]) for r in rows if r["length"] == n and r["split"] == "val" and r["step"] > 0
                   and r["variant"] not in failed and r.get(metric) is not None and math.isfinite(float(r[metric]))]
        lo, hi = (min(trained), max(trained)) if trained else (0.0, 1.0)
        pad = 0.04 * (hi - lo) + 1e-3
        lo, hi = lo - pad, hi + pad
        for r in final:
            variant = r["variant"]
            name = f"{variant} ({labels[variant]})" if labels.get(variant) else variant
            curve, seeds = _curve(rows, n, variant, "val", metric)
            steps = sorted(curve)
            if variant in failed:
                means = [finite_stats(curve[s])["mean"] for s in steps]
                ax.plot(steps, [min(m, hi) if math.isfinite(m) else hi for m in means], "--", color=palette[variant],
                        label=f"{name}: diverged ({r[metric]:.2f} {metric}, clipped)")
            elif steps:
                mark = dict(lw=3.2, marker="o", zorder=5) if variant == highlight else dict(lw=1.5)
                suffix = ": recommended" if variant == highlight else ""
                _mean_band(ax, steps, [curve[s] for s in steps], palette[variant], name + suffix,
                           band=len(seeds) > 1, **mark)
        if reference is not None:
            if lo <= reference <= hi:
                ax.axhline(reference, color="gray", linestyle=":", label=reference_label)
            else:
                ax.plot([], [], ":", color="gray", label=f"{reference_label} {reference:.2f} (off scale)")
        ax.set_ylim(lo, hi)
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"N = {n}: validation {metric} during training")
        ax.grid(alpha=0.3)
        # right: final values, best first from the top
        done = [r for r in final if r["variant"] not in failed and math.isfinite(float(r[metric]))]
        values = [float(r[metric]) for r in done] or [0.0, 1.0]
        span = max(values) - min(values) + 1e-3
        left, right = min(values) - 0.3 * span, max(values) + 0.35 * span
        for y, r in enumerate(final):
            variant, value = r["variant"], float(r[metric])
            if variant in failed or not math.isfinite(value):
                bars.barh(y, right - left, left=left, color=palette[variant], alpha=0.35, hatch="//")
                bars.text(left + 0.02 * (right - left), y, f"diverged: {value:.2f} {metric}, off scale", va="center",
                          fontsize=9, bbox=dict(facecolor="white", edgecolor="none", pad=1))
                continue
            frame = dict(edgecolor="black", linewidth=2.5) if variant == highlight else {}
            spread = [[value - float(r["min"])], [float(r["max"]) - value]] if r["seeds"] > 1 else None
            bars.barh(y, value - left, left=left, color=palette[variant], xerr=spread, **frame)
            bars.text(value + 0.02 * (right - left), y, f"{value:.3f}", va="center", fontsize=9,
                      fontweight="bold" if variant == highlight else "normal")
        bars.set_yticks(range(len(final)))
        bars.set_yticklabels([f"{r['variant']}\n{labels.get(r['variant'], '')}".strip() for r in final], fontsize=8)
        for tick, r in zip(bars.get_yticklabels(), final):
            if r["variant"] == highlight:
                tick.set_fontweight("bold")
        bars.invert_yaxis()
        bars.set_xlim(left, right)
        bars.set_xlabel(f"final validation {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
        bars.set_title(f"N = {n}: after training, best first")
        bars.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    legend = {}  # one legend for the figure, below the panels: every line's label once
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=9,
               frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy_vs_length(rows: list[dict], path: str | Path, *, title: str = "",
                            chance: float | None = None) -> None:
    """Final accuracy (``rows``: one per variant, length, seed with ``accuracy``) against sequence length, one
    line per variant (mean over seeds, band min..max)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        by_len: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if r["variant"] == variant:
                by_len[int(r["length"])].append(float(r["accuracy"]))
        lengths = sorted(by_len)
        _mean_band(ax, lengths, [by_len[n] for n in lengths], color(i), variant, "o-")
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    _save(fig, path, (ax,))


def plot_by_distance(rows: list[dict], path: str | Path, *, chance: float | None = None, title: str = "") -> None:
    """Accuracy against query-key distance, one panel per length (``rows``: variant, length, seed, start, end,
    accuracy); lines are means over seeds at each bucket's middle, bands min..max."""
    plt = pyplot()
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            by: dict[float, list[float]] = defaultdict(list)
            for r in rows:
                if r["variant"] == variant and int(r["length"]) == n and math.isfinite(float(r["accuracy"])):
                    by[(int(r["start"]) + int(r["end"])) / 2].append(float(r["accuracy"]))
            xs = sorted(by)
            if xs:
                _mean_band(ax, xs, [by[x] for x in xs], color(i), variant, "o-")
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle=":", label="chance")
        ax.set_xlabel("distance from the query to its pair")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"N = {n}")
    _save(fig, path, axes[0], title)


def plot_extrapolation(rows: list[dict], bucket_rows: list[dict], path: str | Path, *, title: str = "") -> None:
    """Left: validation bpb against evaluation length (``rows``: variant, train_length, eval_length, seed, bpb).
    Middle: bpb by position bucket at the longest evaluation length (``bucket_rows``: variant, eval_length, seed,
    start, end, bpb). Right, when bucket rows carry ``attn_rms``: the attention outputs' RMS by position bucket at
    that length (dilution). Lines are means over seeds, bands min..max."""
    plt = pyplot()
    rms = bool(bucket_rows) and all("attn_rms" in r for r in bucket_rows)
    fig, axes = plt.subplots(1, 3 if rms else 2, figsize=(18 if rms else 12, 4.5))
    left, right = axes[0], axes[1]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    longest = max(int(r["eval_length"]) for r in bucket_rows) if bucket_rows else None
    for i, variant in enumerate(variants):
        for train_len in sorted({r["train_length"] for r in rows if r["variant"] == variant}):
            by_len: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if r["variant"] == variant and r["train_length"] == train_len:
                    by_len[int(r["eval_length"])].append(float(r["bpb"]))
            lengths = sorted(by_len)
            _mean_band(left, lengths, [by_len[n] for n in lengths], color(i), f"{variant} (trained at {train_len})",
                       "o-")
        for ax, column in ((right, "bpb"), (axes[2], "attn_rms")) if rms else ((right, "bpb"),):
            buckets: dict[int, list[float]] = defaultdict(list)
            for r in bucket_rows:
                if r["variant"] == variant and int(r["eval_length"]) == longest:
                    buckets[int(r["end"])].append(float(r[column]))
            if buckets:
                ends = sorted(buckets)
                _mean_band(ax, ends, [buckets[e] for e in ends], color(i), variant, "o-")
    for i, n in enumerate(sorted({int(r["train_length"]) for r in rows})):
        for ax in axes[1:]:
            ax.axvline(n, color="gray", linestyle=":", label="training length" if i == 0 else None)
    left.set_xscale("log", base=2)
    left.set_xlabel("evaluation length")
    left.set_ylabel("validation bits per byte")
    left.set_title("length extrapolation")
    right.set_xlabel("position (end of bucket)")
    right.set_ylabel("bits per byte")
    right.set_title(f"loss by position at length {longest}")
    if rms:
        axes[2].set_xlabel("position (end of bucket)")
        axes[2].set_ylabel("RMS of the attention output (mean over layers)")
        axes[2].set_title(f"attention output by position at length {longest}")
    _save(fig, path, axes, title)
