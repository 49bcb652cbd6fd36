"""The CUDA profile (``experiments/bench.py --gpu``): forward+backward time and peak memory of causal attention
against N on one GPU, eq. 19 against torch's SDPA (float32: its memory-efficient kernel; bfloat16: FlashAttention),
up to the largest N that fits or the time budget; the engine's group size swept at one N; and the host
synchronisations of one eq. 19 call counted.

Everything runs in this one process: CUDA events time the GPU itself (no fork per point as on the CPU, where a
process's allocator state distorts the next point), and ``torch.cuda.max_memory_allocated`` gives each point's
peak above what was allocated before it. A point that runs out of memory ends its series.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch

from ..plots import log_axes, pyplot, write_rows
from ..profiling import Record, measure, run_series
from .cases import case_linrope, case_sdpa
from .memory import pick_series

__all__ = ["GPU_SERIES", "GpuInfo", "gpu_info", "gpu_profile", "group_sweep", "host_syncs", "sync_sites", "write_gpu_profile"]

GPU_SERIES = {
    # name: (factory, params); B=1 H=8 d=64 (r=256 for eq. 19), causal, forward+backward
    "eq.19 causal": (case_linrope, dict(rope="features")),
    "eq.19 causal, triton": (case_linrope, dict(rope="features", kernel="triton")),
    "no RoPE causal": (case_linrope, dict(rope=None)),
    "SDPA causal float32": (case_sdpa, dict(dtype="float32")),
    "SDPA causal bfloat16 (flash)": (case_sdpa, dict(dtype="bfloat16")),
}


@dataclass
class GpuInfo:
    """The GPU a profile ran on, with its matrix rates measured in this process (TFLOP/s, 8192^3 products)."""

    name: str
    memory_gib: float
    torch: str
    cuda: str
    fp32_tflops: float
    bf16_tflops: float

    def markdown(self) -> str:
        return (f"GPU: {self.name}, {self.memory_gib:.0f} GiB; torch {self.torch}, CUDA {self.cuda}; measured "
                f"8192^3 matmul: float32 {self.fp32_tflops:.0f} TFLOP/s (TF32 off), bfloat16 "
                f"{self.bf16_tflops:.0f} TFLOP/s")


def gpu_info(device: str = "cuda") -> GpuInfo:
    props = torch.cuda.get_device_properties(device)

    def rate(dt) -> float:
        a = torch.randn(8192, 8192, device=device, dtype=dt)
        return 2 * 8192**3 / measure(lambda: a @ a, repeats=5, device=device).seconds / 1e12

    return GpuInfo(props.name, props.total_memory / 2**30, torch.__version__, str(torch.version.cuda),
                   rate(torch.float32), rate(torch.bfloat16))


def _point(factory, params: dict, n: int, device: str, repeats: int) -> Record:
    """One forward+backward point, in this process; out of memory becomes a record saying so."""
    p = dict(params, n=n)
    params = {k: v for k, v in params.items() if k != "n"}
    try:
        fn = factory(n, backward=True, device=device, **params)
        rec = measure(fn, case=factory.__name__, params=p, repeats=repeats, device=device)
    except torch.cuda.OutOfMemoryError:
        rec = Record(factory.__name__, p, "out of memory", device=device)
    fn = None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rec


def gpu_profile(lengths, series=None, device: str = "cuda", time_budget: float = 2.0, repeats: int = 3,
                on_record=None) -> list[Record]:
    """Time and peak memory of each series of ``GPU_SERIES`` for growing N; a series stops after a point slower
    than ``time_budget`` seconds or out of memory. Records carry ``params['series']``."""
    out = []
    for name in pick_series(series, GPU_SERIES):
        factory, params = GPU_SERIES[name]
        out += run_series(factory.__name__, lengths, dict(params, series=name), time_budget=time_budget,
                          memory_budget_mib=math.inf, device=device, on_record=on_record,
                          point=lambda p, f=factory: _point(f, p, p["n"], device, repeats))
    return out


def group_sweep(n: int, sizes, device: str = "cuda", repeats: int = 3, kernels=("torch",)) -> list[Record]:
    """eq. 19 causal forward+backward at N=n for each group size (None: the default) and kernel."""
    recs = []
    for kernel in kernels:
        for g in sizes:
            rec = _point(case_linrope, dict(rope="features", group_size=g, kernel=kernel), n, device, repeats)
            rec.params["series"] = f"kernel={kernel} group_size={g}"
            recs.append(rec)
    return recs


def host_syncs(n: int = 16384, device: str = "cuda") -> dict:
    """Synchronising CUDA calls made by one eq. 19 causal forward and by forward+backward (``torch.cuda``'s sync
    debug mode, counted as warnings, with where they happened), after a warm-up of each; "first" is the process's
    first call watched (torch makes one more there, in torch.cuda itself)."""
    fn = case_linrope(n, rope="features", backward=False, device=device)
    step = case_linrope(n, rope="features", backward=True, device=device)
    step()
    fn()
    counts = {"first": sync_sites(fn)}
    for what, f in (("forward", fn), ("forward+backward", step)):
        where = sync_sites(f)
        counts[what] = len(where)
        counts[what + " at"] = where
    return counts


def sync_sites(fn) -> list[str]:
    """The Python lines (file:line) at which ``fn()`` made synchronising CUDA calls, one entry per call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def _plot(records: list[Record], path: str, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name in dict.fromkeys(r.params["series"] for r in records):
        pts = [(r.params["n"], r.seconds, r.peak_mib) for r in records if r.params["series"] == name
               and r.status == "ok"]
        if pts:
            n, s, m = zip(*pts)
            style = "--" if name.startswith("SDPA") else "-"
            axes[0].plot(n, s, style, marker="o", label=name)
            axes[1].plot(n, m, style, marker="o", label=name)
    for ax, label in zip(axes, ("forward+backward time (s)", "peak memory increase (MiB)")):
        log_axes(ax, "sequence length N", label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_gpu_profile(records: list[Record], out: str, meta: dict) -> list[dict]:
    """``gpu.csv``, ``gpu.json`` (records and ``meta``: the GPU, the sweep, the sync counts) and ``gpu.png``
    under ``out``; returns the CSV rows."""
    os.makedirs(out, exist_ok=True)
    rows = [dict(series=r.params["series"], n=r.params["n"], seconds=r.seconds, peak_mib=r.peak_mib,
                 status=r.status) for r in records]
    write_rows(os.path.join(out, "gpu.csv"), rows)
    meta = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in meta.items()}
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump({**meta, "records": [r.to_dict() for r in records]}, f, indent=1)
    gpu = meta.get("gpu", {}).get("name", "GPU")
    _plot(records, os.path.join(out, "gpu.png"), f"{gpu}; causal, B=1 H=8 d=64 (r=256), forward+backward")
    return rows
