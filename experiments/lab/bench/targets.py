"""The performance targets of linrope: which points to measure, and the table of ratios they give.

A point's time is the median over several fresh processes (``combine_rounds``) of each process's median: a
process's time varies more than runs within it. The FLOP-rate target divides by the 2048 x 2048 sgemm rate that
``lab.profiling.machine_info`` measured in the same run (the bench process, before the points), so the
bound means the same on every CPU.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from ..profiling import Record
from .cases import causal_flops

__all__ = ["Target", "targets", "evaluate", "variant_rows", "VARIANT_POINTS", "combine_rounds", "LAYER_VARIANTS",
           "layer_variant_points", "layer_variant_rows"]

# The speed table of the attention variants (issue 13's new ones beside eq. 19): key of ``targets()``, label
VARIANT_POINTS = (("ours", "eq. 19 (RoPE on the features)"), ("ours_norope", "no RoPE"),
                  ("ours_learned", "eq. 19, learned frequencies and phases (LearnedRotary, differentiated)"),
                  ("ours_decay", "eq. 19 + multiscale decay (RetNet's gamma per head)"),
                  ("ours_learned_decay", "eq. 19, learned frequencies and phases + multiscale decay"),
                  ("ours_auto", "eq. 19, group_size='auto' (measured once per machine, cached)"),
                  ("ours_g1mib", "eq. 19, group_size=128 (1 MiB buffers: the default where L2 <= 1 MiB or few groups)"),
                  ("ours_torch", "eq. 19, kernel='torch' (the targets ran another kernel)"))


# The layer variants of the research (gates, selective rotations) against eq. 19 + decay, the layer each is
# meant to replace: key, label, LinearRotaryAttention options (``bench.py --layer-variants``)
LAYER_VARIANTS = (("decay", "eq. 19 + multiscale decay", dict(decay="multiscale")),
                  ("eq19", "eq. 19", {}),
                  ("learned_decay", "learned rotations + decay", dict(rope_learned=True, decay="multiscale")),
                  ("gated", "eq. 19 + gate", dict(gate=True)),
                  ("learned_gated", "learned rotations + gate", dict(rope_learned=True, gate=True)),
                  ("selective_decay", "selective rotations + decay",
                   dict(rope_learned=True, selective=True, decay="multiscale")),
                  ("selective_gated", "selective rotations + gate", dict(rope_learned=True, selective=True, gate=True)),
                  ("inputs_gated", "RoPE before phi + gate", dict(rope="inputs", gate=True)))


def layer_variant_points(n: int) -> list[tuple[str, str, dict]]:
    """The points of ``LAYER_VARIANTS`` at length n: (key, case, params), the layer forward+backward."""
    return [(key, "layer", dict(n=n, kind="linear", options=options)) for key, _, options in LAYER_VARIANTS]


def layer_variant_rows(rec: dict[str, Record]) -> list[dict]:
    """Per layer variant measured: seconds, peak MiB and time relative to eq. 19 + decay in the same run."""
    return _relative_rows(rec, "decay", [(k, label, dict(options=o)) for k, label, o in LAYER_VARIANTS], "vs_decay")


@dataclass
class Target:
    """``measured = f(records)``; met when ``measured <= bound`` (``op`` '<=') or ``>= bound`` ('>=')."""

    name: str
    op: str
    bound: float
    measured: float | None = None
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.bound if self.op == "<=" else self.measured >= self.bound


def targets(n: int = 16384, n_mem: int = 4096, with_peers: bool = True, kernel: str = "torch"
            ) -> list[tuple[str, str, dict]]:
    """The points the targets need: (key, case, params). ``kernel``: the one linrope's points (functions and layer)
    run with; another than "torch" adds eq. 19 with "torch" as a variant row."""
    pts = [
        ("ours", "linrope", dict(n=n, causal=True, rope="features")),
        ("ours_norope", "linrope", dict(n=n, causal=True, rope=None)),
        ("ours_2n", "linrope", dict(n=2 * n, causal=True, rope="features")),
        ("ours_mem", "linrope", dict(n=n_mem, causal=True, rope="features")),
        ("ours_bidir", "linrope", dict(n=n, causal=False, rope="features")),
        ("ours_learned", "linrope", dict(n=n, causal=True, rope="learned")),
        ("ours_decay", "linrope", dict(n=n, causal=True, rope="features", decay="multiscale")),
        ("ours_learned_decay", "linrope", dict(n=n, causal=True, rope="learned", decay="multiscale")),
        ("ours_auto", "linrope", dict(n=n, causal=True, rope="features", group_size="auto")),
        ("ours_g1mib", "linrope", dict(n=n, causal=True, rope="features", group_size=2**18 // (8 * 256))),
        ("sdpa", "sdpa", dict(n=n, causal=True)),
        ("layer_linear", "layer", dict(n=n, kind="linear")),
        ("layer_softmax", "layer", dict(n=n, kind="softmax")),
    ]
    if kernel != "torch":
        pts = [(key, case, dict(params, kernel=kernel) if case == "linrope" else
                dict(params, options={"kernel": kernel}) if key == "layer_linear" else params)
               for key, case, params in pts]
        pts.append(("ours_torch", "linrope", dict(n=n, causal=True, rope="features")))
    if with_peers:
        pts += [
            ("ft", "performer", dict(n=n, causal=True, path="ft")),
            ("performer_noncuda_mem", "performer", dict(n=n_mem, causal=True, path="default")),
            ("performer_bidir", "performer", dict(n=n, causal=False)),
        ]
    return pts


def evaluate(rec: dict[str, Record], n: int = 16384, n_mem: int = 4096, sgemm_gflops: float | None = None
             ) -> list[Target]:
    """Turn the records of ``targets()`` into the table of ratios. ``sgemm_gflops``: the machine's 2048 x 2048
    float32 sgemm rate measured in the same run (``MachineInfo.sgemm_gflops``); without it the FLOP-rate target
    is n/a."""
    def measured(key, attr):
        r = rec.get(key)
        return getattr(r, attr) if r is not None and r.status == "ok" else None

    def sec(key):
        return measured(key, "seconds")

    def mib(key):
        return measured(key, "peak_mib")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    out = []
    out.append(Target(f"speed-up over FAVOR+ features + fast-transformers causal kernel, N={n}", ">=", 2.5,
                      ratio(sec("ft"), sec("ours")), "fast-transformers time / ours"))
    out.append(Target(f"speed-up over SDPA causal, N={n}", ">=", 5.0, ratio(sec("sdpa"), sec("ours")),
                      "SDPA time / ours"))
    out.append(Target(f"memory growth {2 * n}/{n}", "<=", 2.05, ratio(mib("ours_2n"), mib("ours")),
                      "peak(2N) / peak(N)"))
    out.append(Target(f"leaner than performer's noncuda causal, N={n_mem}", ">=", 20.0,
                      ratio(mib("performer_noncuda_mem"), mib("ours_mem")), "performer peak / ours"))
    out.append(Target(f"RoPE overhead, N={n}", "<=", 1.10, ratio(sec("ours"), sec("ours_norope")),
                      "with rotary / without"))
    rate = sgemm_gflops * 1e9 if sgemm_gflops else None
    flops = causal_flops(n)
    out.append(Target(f"useful FLOP rate / square-matmul rate, N={n}", ">=", 0.40,
                      None if rate is None or sec("ours") is None else flops / sec("ours") / rate,
                      f"{flops / 1e9:.1f} GFLOP; 2048² sgemm "
                      f"{'not measured' if rate is None else f'{rate / 1e9:.0f} GFLOP/s'} in this run"))
    out.append(Target(f"layer time vs SoftmaxAttention, N={n}", "<=", 1 / 3,
                      ratio(sec("layer_linear"), sec("layer_softmax")), "LinearRotaryAttention / SoftmaxAttention"))
    out.append(Target(f"layer peak memory vs SoftmaxAttention, N={n}", "<=", 1.5,
                      ratio(mib("layer_linear"), mib("layer_softmax")), "LinearRotaryAttention / SoftmaxAttention"))
    out.append(Target(f"bidirectional time vs performer FastAttention, N={n}", "<=", 1.0,
                      ratio(sec("ours_bidir"), sec("performer_bidir")), "ours / performer"))
    out.append(Target(f"bidirectional memory vs performer FastAttention, N={n}", "<=", 1.0,
                      ratio(mib("ours_bidir"), mib("performer_bidir")), "ours / performer"))
    return out


def variant_rows(rec: dict[str, Record]) -> list[dict]:
    """Per variant of ``VARIANT_POINTS`` measured: seconds, peak MiB and time relative to eq. 19 in the same run."""
    return _relative_rows(rec, "ours", [(k, label, {}) for k, label in VARIANT_POINTS], "vs_eq19")


def _relative_rows(rec: dict[str, Record], base_key: str, entries, ratio: str) -> list[dict]:
    """A row per (key, label, extra fields) entry measured: seconds, peak MiB and, as ``ratio``, its time over
    ``rec[base_key]``'s (None where either failed)."""
    base = rec.get(base_key)
    base_s = base.seconds if base is not None and base.status == "ok" else None
    rows = []
    for key, label, extra in entries:
        r = rec.get(key)
        if r is None:
            continue
        ok = r.status == "ok"
        rows.append(dict(variant=label, **extra, seconds=r.seconds if ok else None,
                         peak_mib=r.peak_mib if ok else None,
                         **{ratio: r.seconds / base_s if ok and base_s else None}, status=r.status))
    return rows


def combine_rounds(first: Record, later: Record) -> Record:
    """``first`` (time and memory) with another process's measurement added: ``times`` gathers every run and
    ``rounds`` each process's median; ``seconds`` becomes the median of those, and ``peak_mib`` the median of the
    processes' peaks when they measured memory (one process's peak RSS can be off: a single reading of 315 MiB
    against 81 in every other was seen). A failed round fails the point."""
    if first.status != "ok":
        return first
    if later.status != "ok":
        return replace(first, status=f"round failed: {later.status}")
    rounds = (first.rounds or [first.seconds]) + [later.seconds]
    peaks = list(first.peaks or ([] if first.peak_mib is None else [first.peak_mib]))
    if later.peak_mib is not None:
        peaks.append(later.peak_mib)
    return replace(first, times=list(first.times) + list(later.times), rounds=rounds,
                   seconds=statistics.median(rounds), peaks=peaks,
                   peak_mib=statistics.median(peaks) if peaks else first.peak_mib)
