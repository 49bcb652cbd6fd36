"""Numerical accuracy of eq. 19 against an exact float64 reference, as q and k grow (``experiments/accuracy.py``).

For each sigma (the standard deviation of the entries of q and k), causal and bidirectional, without RoPE and with
RoPE on the features (RoFormer eq. 19), and optionally with a key padding mask with holes, every *method* computes
FAVOR+ attention in float32 from the same inputs and projection, and each output row m is compared with the exact
row of eq. 19 evaluated in float64 (``reference_eq19``, the library's reference)::

    error_m = |out_m - ref_m| / |ref_m|        (2-norms over the value dim; |out_m - ref_m| if ref_m = 0)

Reported per (method, configuration): the fraction of rows with error > ``THRESHOLD`` (1e-3) and the worst row
error (non-finite outputs count as error inf).

Methods:
  * ``linrope``: ``linrope.favor_attention`` at its default chunk and group sizes;
  * ``linrope-c16g64``: the same with chunk_size=16, group_size=64 (many group boundaries);
  * ``linrope-tf32``, ``linrope-bf16``: ``favor_attention(precision="tf32" / "bfloat16")`` on the CUDA GPU (its
    attention products on tensor cores, everything else float32), the outputs compared on the CPU; skipped
    without a GPU of compute capability >= 8.0;
  * ``linrope-naive``: the library's quadratic reference ``linrope.reference.favor_attention_naive``, which is
    also the reference here (0 by construction: a check that the table's reference is the library's);
  * ``performer-pytorch``: performer-pytorch's ``softmax_kernel`` (same projection) followed by its
    ``linear_attention`` (bidirectional) or ``causal_linear_attention_noncuda`` (causal). Its attention functions
    use one feature vector for the numerator and the normalizer, so eq. 19 (rotated numerator, unrotated
    normalizer) cannot be expressed with them: it is run without RoPE only, against the no-RoPE reference. A key
    padding mask is applied by zeroing the masked keys' features (its ``FastAttention`` has no mask argument).
    Its kernel adds eps=1e-4 to every feature after subtracting the maximum (a bias, part of what is measured),
    and its causal function adds eps=1e-6 to the running key sums;
  * ``performer-pytorch-eps0``: the same with ``softmax_kernel(..., eps=0)`` (not its default), which separates
    that bias from the rest of its arithmetic (its one global maximum over all keys and features).
    Both run only when ``import performer_pytorch`` works.

Inputs (seeded by ``seed``): the projection W = ``gaussian_orthogonal_matrix(r, d)`` from
``Generator().manual_seed(seed)``, rounded to float32; z_q, z_k, v ~ N(0, 1) of shape (B, H, N, d) from
``Generator().manual_seed(seed + 1)``, q = sigma z_q, k = sigma z_k (the same directions at every sigma); the
mask from ``Generator().manual_seed(seed + 2)``. The reference evaluates exactly these float32 values in float64.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from linrope.functional import favor_attention
from linrope.reference import favor_attention_naive
from linrope.rotary import RotaryEmbedding

from . import plots
from .checks import check_int
from .profiling import cpu_name, machine

__all__ = ["THRESHOLD", "DEFAULT_SIGMAS", "METHODS", "PAIRINGS", "reference_eq19", "row_errors", "error_stats",
           "make_inputs", "make_mask", "performer_status", "run_accuracy", "cpu_name"]

THRESHOLD = 1e-3
DEFAULT_SIGMAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
METHODS = ("linrope", "linrope-c16g64", "linrope-tf32", "linrope-bf16", "linrope-naive", "performer-pytorch",
           "performer-pytorch-eps0")
LOWERED = {"linrope-tf32": "tf32", "linrope-bf16": "bfloat16"}  # method: precision (CUDA tensor cores)
PERFORMER = ("performer-pytorch", "performer-pytorch-eps0")
PAIRINGS = ("interleaved", "half")
ROPE_BASE = 10000.0
INF_SHOWN = 1e2  # where the figure draws a non-finite worst error


# ---------------------------------------------------------------------------------------------- reference
def _rotary(pairing: str | None, r: int) -> RotaryEmbedding | None:
    """RoPE on the r features with ``pairing`` ('interleaved' or 'half'), or None for no RoPE."""
    if pairing is not None and pairing not in PAIRINGS:
        raise ValueError(f"pairing: expected one of {PAIRINGS}, got {pairing!r}")
    return None if pairing is None else RotaryEmbedding(r, base=ROPE_BASE, interleaved=pairing == "interleaved")


def reference_eq19(q: Tensor, k: Tensor, v: Tensor, W: Tensor, *, causal: bool, pairing: str | None = None,
                   key_padding_mask: Tensor | None = None) -> Tensor:
    """RoFormer eq. 19 on exact FAVOR+ features in float64 (no eps, no clamp): the library's reference
    ``linrope.reference.favor_attention_naive`` (query features lose their row maximum, key features theirs as a
    log-scale, rotations applied as relative angles: exact at any sigma), for the pairing or None.

        out_m = sum_n (R_m phi(q_m)).(R_n phi(k_n)) v_n / sum_n phi(q_m).phi(k_n),   n visible from m

    Rows that see no key are 0. q, k (B, H, N, d), v (B, H, N, dv), W (r, d); returns (B, H, N, dv) float64."""
    return favor_attention_naive(q.double(), k.double(), v.double(), W.double(), causal=causal,
                                 rotary=_rotary(pairing, W.shape[0]), key_padding_mask=key_padding_mask)


# ---------------------------------------------------------------------------------------------- metric
def row_errors(out: Tensor, ref: Tensor) -> Tensor:
    """Per-row error |out_m - ref_m| / |ref_m| (2-norms over the last dim; the absolute |out_m - ref_m| where
    ref_m = 0), flattened over all leading dims; a row of ``out`` with a NaN or inf has error inf."""
    out, ref = out.double().reshape(-1, out.shape[-1]), ref.double().reshape(-1, ref.shape[-1])
    diff = (out - ref).norm(dim=-1)
    scale = ref.norm(dim=-1)
    err = torch.where(scale > 0, diff / torch.where(scale > 0, scale, torch.ones_like(scale)), diff)
    return err.masked_fill(~torch.isfinite(out).all(-1), math.inf)


def error_stats(err: Tensor, threshold: float = THRESHOLD) -> dict:
    """rows, rows_off (error > threshold), frac_off, worst, median and 99th percentile of the row errors."""
    finite = err[torch.isfinite(err)]
    return {"rows": err.numel(), "rows_off": int((err > threshold).sum()),
            "frac_off": float((err > threshold).double().mean()), "worst": float(err.max()),
            "median": float(finite.median()) if finite.numel() else math.inf,
            "p99": float(torch.quantile(finite, 0.99)) if finite.numel() else math.inf,
            "nonfinite_rows": int((~torch.isfinite(err)).sum())}


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(b: int, h: int, n: int, d: int, r: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(z_q, z_k, v, W): standard normal (b, h, n, d) float32 tensors and the float32 orthogonal projection."""
    from linrope.features import gaussian_orthogonal_matrix
    W = gaussian_orthogonal_matrix(r, d, generator=torch.Generator().manual_seed(seed)).float()
    g = torch.Generator().manual_seed(seed + 1)
    zq, zk, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    return zq, zk, v, W


def make_mask(b: int, n: int, holes: float, seed: int) -> Tensor:
    """(b, n) bool key padding mask (True = keep): each key dropped with probability ``holes``; also the first
    min(4, n - 1) keys of batch element 0 (causal rows that see no key) and the last n/8 keys of the last batch
    element (right padding)."""
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.rand(b, n, generator=g) >= holes
    mask[0, :min(4, n - 1)] = False
    mask[-1, n - n // 8:] = False
    return mask


# ---------------------------------------------------------------------------------------------- methods
def performer_status() -> tuple[bool, str]:
    """(usable, version or the reason it is not)."""
    try:
        pp = importlib.import_module("performer_pytorch.performer_pytorch")
        for name in ("softmax_kernel", "linear_attention", "causal_linear_attention_noncuda"):
            getattr(pp, name)
    except Exception as e:  # ImportError, or a missing dependency of its own, or a renamed function
        return False, f"performer-pytorch not usable here ({type(e).__name__}: {e})"
    try:
        from importlib.metadata import version
        return True, version("performer-pytorch")
    except Exception:
        return True, "unknown version"


def _run_performer(q, k, v, W, *, causal, mask, eps=None):
    """performer-pytorch's FAVOR+: ``softmax_kernel`` (its eps unless ``eps`` is given), then ``linear_attention``
    or ``causal_linear_attention_noncuda``; masked keys get zero features."""
    pp = importlib.import_module("performer_pytorch.performer_pytorch")
    kw = {} if eps is None else {"eps": eps}
    qf = pp.softmax_kernel(q, projection_matrix=W, is_query=True, **kw)
    kf = pp.softmax_kernel(k, projection_matrix=W, is_query=False, **kw)
    if mask is not None:
        kf = kf * mask[:, None, :, None].to(kf.dtype)
    if causal:
        return pp.causal_linear_attention_noncuda(qf, kf, v)
    return pp.linear_attention(qf, kf, v)


def _method_fn(method: str, r: int):
    """A callable (q, k, v, W, causal, pairing, mask) -> out for ``method``."""
    if method == "linrope":
        return lambda q, k, v, W, causal, pairing, mask: favor_attention(
            q, k, v, W, causal=causal, rotary=_rotary(pairing, r), key_padding_mask=mask)
    if method == "linrope-c16g64":
        return lambda q, k, v, W, causal, pairing, mask: favor_attention(
            q, k, v, W, causal=causal, rotary=_rotary(pairing, r), key_padding_mask=mask, chunk_size=16,
            group_size=64)
    if method in LOWERED:
        def lowered(q, k, v, W, causal, pairing, mask):
            mask = None if mask is None else mask.cuda()
            out = favor_attention(q.cuda(), k.cuda(), v.cuda(), W.cuda(), causal=causal, rotary=_rotary(pairing, r),
                                  key_padding_mask=mask, precision=LOWERED[method])
            return out.cpu()
        return lowered
    if method == "linrope-naive":
        return lambda q, k, v, W, causal, pairing, mask: reference_eq19(
            q, k, v, W, causal=causal, pairing=pairing, key_padding_mask=mask)
    if method == "performer-pytorch":
        return lambda q, k, v, W, causal, pairing, mask: _run_performer(q, k, v, W, causal=causal, mask=mask)
    if method == "performer-pytorch-eps0":
        return lambda q, k, v, W, causal, pairing, mask: _run_performer(q, k, v, W, causal=causal, mask=mask,
                                                                        eps=0.0)
    raise ValueError(f"methods: unknown {method!r}; expected names from {METHODS}")


def library_info() -> str:
    """Which linrope is measured: its version, and the git commit of its checkout with whether the package has
    uncommitted changes (read-only git queries; 'not a git checkout' elsewhere)."""
    import subprocess

    import linrope
    pkg = Path(linrope.__file__).resolve().parent  # the library's folder (in a checkout or an installed wheel)
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "."))
        where = f"git {commit}" + (", with uncommitted changes to linrope/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        where = "not a git checkout"
    return f"linrope {linrope.__version__} ({where})"


# ---------------------------------------------------------------------------------------------- run
def _config_name(causal: bool, pairing: str | None, masked: bool) -> str:
    return ("causal" if causal else "bidir") + ("" if pairing is None else f"+rope-{pairing}") + \
        ("+mask" if masked else "")


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return "n/a" if row["status"].startswith("skipped") else "error"
    pct = 100 * row["frac_off"]
    off = "0" if row["rows_off"] == 0 else f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"
    return f"{off} ({row['worst']:.2g})"


def _tables(rows: list[dict], header: list[str]) -> str:
    """One markdown table per method: sigma down, configurations across, cells 'percent of rows off (worst)'."""
    lines = header[:]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    sigmas = sorted({r["sigma"] for r in rows})
    for method in dict.fromkeys(r["method"] for r in rows):
        lines += ["", f"## {method}: rows off by > {THRESHOLD:g} (worst row error)", "",
                  "| sigma | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
        for sigma in sigmas:
            cells = []
            for c in configs:
                found = [r for r in rows if r["method"] == method and r["sigma"] == sigma and r["config"] == c]
                cells.append(_cell(found[0]) if found else "")
            lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
        dtypes = sorted({r["out_dtype"] for r in rows if r["method"] == method and r["status"] == "ok"})
        notes = sorted({r["status"] for r in rows if r["method"] == method and r["status"] != "ok"})
        lines += [f"- output dtype (inputs float32): {', '.join(dtypes)}"] if dtypes else []
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    plt = plots.pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    panels = [c for c in (True, False) if any(r["causal"] == c for r in ok)] or [True]
    fig, axes = plt.subplots(2, len(panels), figsize=(6.5 * len(panels), 9), squeeze=False, sharex=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = {None: "-", "interleaved": "--", "half": ":"}
    for col, causal in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for i, method in enumerate(methods):
            for pairing in styles:
                for masked in (False, True):
                    line = sorted((r for r in ok if r["method"] == method and r["causal"] == causal
                                   and r["rope"] == (pairing or "none") and r["masked"] == masked),
                                  key=lambda r: r["sigma"])
                    if not line:
                        continue
                    label = f"{method}, " + ("no RoPE" if pairing is None else f"RoPE {pairing}") + \
                        (", mask" if masked else "")
                    kw = dict(color=plots.color(i), linestyle=styles[pairing], marker="s" if masked else "o",
                              markersize=4, label=label)
                    xs = [r["sigma"] for r in line]
                    top.plot(xs, [min(max(r["worst"], 1e-16), INF_SHOWN) for r in line], **kw)
                    bottom.plot(xs, [100 * r["frac_off"] for r in line], **kw)
        top.axhline(THRESHOLD, color="gray", linestyle=":", linewidth=1)
        if any(not math.isfinite(r["worst"]) for r in ok if r["causal"] == causal):
            top.text(0.01, 0.97, f"at {INF_SHOWN:g}: non-finite output", transform=top.transAxes, fontsize=7,
                     va="top")
        top.set_yscale("log")
        top.set_ylabel("worst row error (relative, log)")
        top.set_title(("causal" if causal else "bidirectional") + ": worst row error")
        bottom.set_yscale("symlog", linthresh=0.1)
        bottom.set_ylim(0, 160)
        bottom.set_ylabel(f"% of rows off by > {THRESHOLD:g} (symlog)")
        bottom.set_xlabel("sigma (std of the entries of q and k)")
        bottom.set_title(("causal" if causal else "bidirectional") + f": rows off by > {THRESHOLD:g}")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # every line once, whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_number(x):
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)


def run_accuracy(*, sigmas=DEFAULT_SIGMAS, n: int = 512, d: int = 64, r: int = 256, batch: int = 2, heads: int = 4,
                 seed: int = 0, methods=None, pairings=("interleaved",), mask_holes: float = 0.0,
                 out="experiments/results/accuracy", note: str = "", quiet: bool = False) -> list[dict]:
    """Measure every method on every (sigma, causal, RoPE pairing or none, mask or not) configuration; writes
    ``accuracy.csv`` (one row per measurement), ``summary.json``, ``summary.md`` and ``accuracy.png`` to ``out``
    and returns the rows. ``mask_holes`` > 0 adds masked configurations (``make_mask``) beside the unmasked ones;
    ``pairings`` () runs without RoPE only; ``note`` goes into the header. Raises ValueError on a bad argument."""
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise ValueError(f"sigmas: expected positive numbers, got {sigmas}")
    for name, value, low in (("n", n, 1), ("d", d, 1), ("r", r, 2), ("batch", batch, 1), ("heads", heads, 1),
                             ("seed", seed, 0)):
        check_int(name, value, low, f"an integer >= {low}")
    if r % 2:
        raise ValueError(f"r: RoPE on the features needs an even number of features, got {r}")
    methods = tuple(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: unknown {unknown}; expected names from {METHODS}")
    pairings = tuple(pairings)
    if any(p not in PAIRINGS for p in pairings):
        raise ValueError(f"pairing: expected names from {PAIRINGS}, got {pairings}")
    if not (0.0 <= mask_holes < 1.0):
        raise ValueError(f"mask_holes: expected a fraction in [0, 1), got {mask_holes!r}")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    naive_module = favor_attention_naive.__module__  # linrope.reference
    skipped: dict[str, str] = {}
    performer_version = None
    if any(m in PERFORMER for m in methods):
        usable, info = performer_status()
        if usable:
            performer_version = info
        else:
            skipped.update({m: f"skipped: {info}" for m in methods if m in PERFORMER})
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)):
        skipped.update({m: f"skipped: precision={LOWERED[m]!r} needs a CUDA GPU of compute capability >= 8.0"
                        for m in methods if m in LOWERED})
    for m, why in skipped.items():
        say(f"{m}: {why}")
    fns = {m: _method_fn(m, r) for m in methods if m not in skipped}

    zq, zk, v, W = make_inputs(batch, heads, n, d, r, seed)
    masks = [None] + ([make_mask(batch, n, mask_holes, seed)] if mask_holes > 0 else [])
    rope_options = [None, *pairings]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for sigma in sigmas:
        q, k = zq * sigma, zk * sigma
        for causal in (True, False):
            for pairing in rope_options:
                for mask in masks:
                    ref = reference_eq19(q, k, v, W, causal=causal, pairing=pairing, key_padding_mask=mask)
                    tags = {"sigma": sigma, "causal": causal, "rope": pairing or "none", "masked": mask is not None,
                            "config": _config_name(causal, pairing, mask is not None)}
                    for method in methods:
                        row = {"method": method, **tags}
                        if method in skipped:
                            rows.append({**row, "status": skipped[method]})
                            continue
                        if method in PERFORMER and pairing is not None:
                            rows.append({**row, "status": "skipped: eq. 19 needs a rotated numerator and an "
                                                          "unrotated normalizer, performer-pytorch's attention "
                                                          "uses one feature vector for both; run without RoPE"})
                            continue
                        try:
                            with torch.no_grad():
                                o = fns[method](q, k, v, W, causal, pairing, mask)
                        except Exception as e:  # recorded and shown, the other methods still run
                            rows.append({**row, "status": f"error: {type(e).__name__}: {e}"})
                            say(f"{method} {tags['config']} sigma {sigma:g}: {type(e).__name__}: {e}")
                            continue
                        rows.append({**row, "status": "ok", "out_dtype": str(o.dtype).replace("torch.", ""),
                                     **error_stats(row_errors(o, ref))})
        say(f"sigma {sigma:g} done ({time.perf_counter() - t0:.1f} s)")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    host = machine()
    library = library_info()
    masking = f"; mask: {mask_holes:g} of keys dropped at random + holes (make_mask)" if mask_holes > 0 else ""
    header = [f"# eq. 19 accuracy against an exact float64 reference ({host})", "",
              f"{library}{'; ' + note if note else ''}; B={batch}, H={heads}, N={n}, d={d}, r={r} "
              f"({batch * heads * n} rows per cell); seed {seed} (W: seed, q/k/v: seed+1, mask: seed+2); q, k "
              f"entries N(0, sigma^2), v N(0, 1); float32 inputs; rope base {ROPE_BASE:g}{masking}",
              f"cell: % of rows with |out - ref| / |ref| > {THRESHOLD:g} (worst row error; inf: a non-finite "
              f"output); linrope-naive from {naive_module}; performer-pytorch {performer_version or 'not run'}"]
    plots.write_rows(out / "accuracy.csv", rows)
    table = _tables(rows, header)
    (out / "summary.md").write_text(table)
    summary = {"threshold": THRESHOLD, "machine": host, "torch": torch.__version__, "linrope": library,
               "note": note,
               "config": {"sigmas": sigmas, "n": n, "d": d, "r": r, "batch": batch, "heads": heads, "seed": seed,
                          "seeds": {"projection": seed, "qkv": seed + 1, "mask": seed + 2},
                          "methods": methods, "pairings": pairings, "mask_holes": mask_holes,
                          "rope_base": ROPE_BASE},
               "naive_module": naive_module, "performer_pytorch": performer_version, "skipped": skipped,
               "seconds": round(time.perf_counter() - t0, 2), "methods": {}}
    for method in methods:
        mine = [x for x in rows if x["method"] == method and x["status"] == "ok"]
        clean = {}  # per configuration: the largest sigma up to which (from the smallest) no row is off
        for c in dict.fromkeys(x["config"] for x in mine):
            good = None
            for x in sorted((x for x in mine if x["config"] == c), key=lambda x: x["sigma"]):
                if x["rows_off"]:
                    break
                good = x["sigma"]
            clean[c] = good
        summary["methods"][method] = {
            "measured": len(mine), "not_measured": sorted({x["status"] for x in rows
                                                           if x["method"] == method and x["status"] != "ok"}),
            "max_sigma_without_rows_off": clean,
            "worst": _json_number(max((x["worst"] for x in mine), default=math.nan)),
            "cells": {f"{x['config']} sigma={x['sigma']:g}": {"rows_off": x["rows_off"], "frac_off": x["frac_off"],
                                                               "worst": _json_number(x["worst"])} for x in mine}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(rows, out / "accuracy.png", f"eq. 19 (FAVOR+, d={d}, r={r}, N={n}) in float32 vs exact float64; "
                                      f"{host}")
    say(table)
    say(f"wrote {out / 'accuracy.csv'}, {out / 'summary.json'}, {out / 'summary.md'}, {out / 'accuracy.png'}")
    return rows
