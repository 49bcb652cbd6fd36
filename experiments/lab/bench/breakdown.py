"""Where the time of causal eq. 19 goes: matrix products, other tensor ops, and the rest (issue 14).

``python experiments/bench.py --breakdown``: one forward+backward of the bench's ``ours`` point (B=1, H=8, d=64,
r=256, the default group size) under ``torch.profiler`` (with FLOP counting), each ATen op's self time put in one
of three kinds:

* ``products``: bmm, baddbmm, mm, addmm and the like (the FLOPs);
* ``other ops``: every other op that touches tensor memory (exp, max, complex multiply, sums, copies, divides);
* ``rest``: the profiled step's wall time not inside either: Python between ops, autograd, dispatch, and the
  ops that only make views (view, slice, unbind, diagonal, ...), which are bookkeeping.

The profiler slows every op call a little, so the shares are applied to the median unprofiled time of the same
step. The products' own rate (their counted FLOPs over their time) and the FLOP-rate target's value if everything
but the products took no time bound what any reorganisation of the Python around the same products can reach.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..profiling import median_time
from .cases import case_linrope, causal_flops

__all__ = ["Breakdown", "time_breakdown", "PRODUCTS", "VIEWS"]

PRODUCTS = frozenset({"aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mm", "aten::addmm", "aten::addmm_",
                      "aten::addbmm", "aten::matmul", "aten::linear", "aten::dot", "aten::mv", "aten::_mkldnn_matmul"})
VIEWS = frozenset({"aten::view", "aten::slice", "aten::as_strided", "aten::unbind", "aten::select", "aten::unsqueeze",
                   "aten::squeeze", "aten::diagonal", "aten::expand", "aten::reshape", "aten::_reshape_alias",
                   "aten::view_as_complex", "aten::view_as_real", "aten::t", "aten::transpose", "aten::permute",
                   "aten::alias", "aten::detach", "aten::empty", "aten::empty_strided", "aten::lift_fresh",
                   "aten::resize_", "aten::_unsafe_view", "aten::split", "aten::chunk", "aten::unflatten",
                   "aten::flatten", "aten::result_type", "aten::to", "aten::_to_copy_view", "aten::expand_as",
                   "aten::view_as", "aten::detach_", "aten::set_", "aten::_nested_tensor_from_mask_left_aligned"})


@dataclass
class Breakdown:
    n: int
    seconds: float  # median unprofiled forward+backward
    products: float  # shares of the profiled step's wall time, summing to 1
    other_ops: float
    rest: float
    product_gflop: float  # FLOPs of the products (profiler's count; in-place ones from their shapes), recomputation
    # included
    products_gflops: float  # their rate: product_gflop / (products share x seconds)
    useful_gflop: float  # the FLOP model of the target (recomputation not counted)
    sgemm_gflops: float | None = None

    @property
    def flop_rate(self) -> float | None:
        """The FLOP-rate target's measure: useful FLOPs per second over the sgemm rate."""
        return None if not self.sgemm_gflops else self.useful_gflop / self.seconds / self.sgemm_gflops

    @property
    def ceiling(self) -> float | None:
        """The same if everything but the products took no time."""
        if not self.sgemm_gflops:
            return None
        return self.useful_gflop / (self.products * self.seconds) / self.sgemm_gflops

    def markdown(self) -> str:
        s = self.seconds
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        return (f"| causal eq. 19, N={self.n}, forward+backward ({s:.3f} s) | share | s |\n|---|---:|---:|\n"
                f"| matrix products ({self.product_gflop:.1f} GFLOP counted, {self.products_gflops:.0f} GFLOP/s) "
                f"| {self.products:.2f} | {self.products * s:.3f} |\n"
                f"| other tensor ops (exp, max, rotations, sums, copies, divides) | {self.other_ops:.2f} | "
                f"{self.other_ops * s:.3f} |\n"
                f"| the rest (Python, autograd, dispatch, views) | {self.rest:.2f} | {self.rest * s:.3f} |\n\n"
                f"Useful FLOPs {self.useful_gflop:.1f} GFLOP; FLOP-rate measure {fmt(self.flop_rate)} of sgemm"
                f"{'' if not self.sgemm_gflops else f' ({self.sgemm_gflops:.0f} GFLOP/s)'}; "
                f"{fmt(self.ceiling)} if everything but the products took no time.")


def _product_flops(key: str, shapes) -> float:
    """2 m k n (times the batch) of one call, from its input shapes, for the in-place products the profiler
    does not count (``baddbmm_``, ``addmm_``: self, then the two factors)."""
    if key in ("aten::baddbmm_", "aten::addmm_") and len(shapes) >= 3 and len(shapes[1]) == len(shapes[2]) >= 2:
        a, b = shapes[1], shapes[2]
        batch = a[0] if len(a) == 3 else 1
        return 2.0 * batch * a[-2] * a[-1] * b[-1]
    return 0.0


def time_breakdown(n: int = 16384, *, repeats: int = 5, sgemm_gflops: float | None = None, **case) -> Breakdown:
    """Profile one forward+backward of ``case_linrope(n, **case)`` (after a warm-up) and split its time; the
    unprofiled median of ``repeats`` runs is taken around it."""
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats: expected >= 1, got {n} and {repeats}")
    step = case_linrope(n, **case)
    before, _ = median_time(step, warmup=1, repeats=repeats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True,
                                record_shapes=True) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
    seconds = statistics.median([before, median_time(step, warmup=0, repeats=repeats)[0]])
    products = other = flops = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key in PRODUCTS:
            products += ev.self_cpu_time_total
            flops += ev.flops or ev.count * _product_flops(ev.key, ev.input_shapes)
        elif ev.key.startswith("aten::") and ev.key not in VIEWS:
            other += ev.self_cpu_time_total
    total = max(wall * 1e6, products + other)
    p, o = products / total, other / total
    useful = causal_flops(n, heads=case.get("h", 8), d=case.get("d", 64), r=case.get("r", 256), dv=case.get("d", 64),
                          batch=case.get("b", 1), rotary=case.get("rope", "features") is not None)
    return Breakdown(n=n, seconds=seconds, products=p, other_ops=o, rest=1.0 - p - o, product_gflop=flops / 1e9,
                     products_gflops=flops / 1e9 / (p * seconds) if p > 0 else 0.0, useful_gflop=useful / 1e9,
                     sgemm_gflops=sgemm_gflops)
