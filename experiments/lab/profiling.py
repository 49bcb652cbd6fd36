"""Time and peak-memory measurement of a callable, returned as records (no printing).

* ``median_time(fn)``: median wall time after warm-up (CUDA: synchronised, timed with events).
* ``measure(fn)``: a ``Record`` with the median time and the peak memory of the timed runs. CPU: the peak
  resident set size (``VmHWM``) minus the resident size just before the timed work; CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before.
* ``run_point(case, **params)``: the same in fresh subprocesses (so one point's allocations cannot inflate the
  next point's peak), in two passes on CPU: time with the default allocator, then peak memory (one run, no
  warm-up) with ``MALLOC_MMAP_THRESHOLD_=131072``, so that freed tensors go back to the OS and the RSS peak
  tracks live tensors. That setting makes every allocation over 128 KiB fresh page faults, which would distort
  the time, hence the two passes. A timeout or crash becomes a record whose ``status`` says so.
* ``run_series(case, lengths, ...)``: points over growing N that stop cleanly at a time or memory budget.
* ``machine()``: the CPU, torch version and thread count, for the headers of tables and figures.
* ``machine_info()``: the same and more, measured: the CPU model, its vector extensions (from /proc/cpuinfo),
  the thread count, and this process's float32 rates of a 2048 x 2048 sgemm and of a small batched matmul
  (2048 x (64x256 @ 256x64), the shape class of the engine's chunk products), median of a few runs after a
  warm-up, and the write speed of memory touched for the first time against memory already touched (a call's
  outputs and gradients are new tensors: on VMs the kernel's page faults on first touch can make writing them
  several times slower than the arithmetic that fills them). The benchmarks print it beside their tables
  (``MachineInfo.markdown()``) and store it in their JSON.

``case`` names a factory ``"module:function"``; the factory is called with the params and returns a
zero-argument callable doing the work (e.g. forward+backward of one attention call on prebuilt inputs).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Record", "median_time", "measure", "run_point", "run_series", "rss_bytes", "cpu_name", "machine",
           "vector_extensions", "MachineInfo", "machine_info", "lab_env", "time_and_peak"]

MIB = 2**20


@dataclass
class Record:
    """One measured point. ``seconds`` is the median of ``times`` (of one process), or the median of ``rounds``
    (each process's median) when the point was timed in several processes; ``peak_mib`` the peak memory
    increase."""

    case: str
    params: dict
    status: str = "ok"  # "ok", "skipped: ...", "failed: ...", "timeout"
    seconds: float | None = None
    times: list = field(default_factory=list)
    peak_mib: float | None = None
    device: str = "cpu"
    rounds: list = field(default_factory=list)
    peaks: list = field(default_factory=list)  # each process's peak when measured in several (``peak_mib``: median)

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, device: str = "cpu"
                ) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and all the times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), times


def rss_bytes(field: str = "VmRSS") -> int:
    """Current resident set size of this process (Linux), in bytes; ``field='VmHWM'``: its peak so far."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(fn: Callable[[], object], *, case: str = "", params: dict | None = None, warmup: int = 1,
            repeats: int = 3, device: str = "cpu") -> Record:
    """Time ``fn`` and record the peak memory increase over its runs (see the module docstring)."""
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    seconds, times = median_time(fn, warmup=warmup, repeats=repeats, device=device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so a
        # point started by a process that had grown (the bench after its sgemm) read that parent's peak (310 MiB
        # for a point whose own peak is 81)
        peak = rss_bytes("VmHWM") - base
    return Record(case, params or {}, "ok", seconds, times, max(peak, 0) / MIB, device)


def _load(case: str) -> Callable:
    module, _, name = case.partition(":")
    if not name:
        raise ValueError(f"case: expected 'module:function', got {case!r}")
    return getattr(importlib.import_module(module), name)


def time_and_peak(seconds: float | None, peak_mib: float | None) -> str:
    """'  0.123 s    456 MiB' (right-aligned columns, blank where not measured), for the lines of a profile."""
    t = "" if seconds is None else f"{seconds:.3f} s"
    m = "" if peak_mib is None else f"{peak_mib:.0f} MiB"
    return f"{t:>10} {m:>10}"


def lab_env() -> dict:
    """This process's environment with the folder holding ``lab`` (experiments/) first on PYTHONPATH, so that
    ``python -m lab.profiling`` and cases named ``lab....:case_*`` import in a fresh process from any directory."""
    here = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=here + (os.pathsep + path if path else ""))


def _subprocess(job: dict, env: dict, timeout: float, runner: str = "lab.profiling") -> Record:
    try:
        proc = subprocess.run([sys.executable, "-m", runner, json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Record(job["case"], job["params"], f"timeout after {timeout:.0f} s", device=job["device"])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Record(job["case"], job["params"], f"failed: {tail[:200]}", device=job["device"])
    return Record(**json.loads(lines[-1]))


def run_point(case: str, params: dict, *, warmup: int = 1, repeats: int = 3, device: str = "cpu",
              timeout: float = 600.0, threads: int | None = None, memory: bool = True, env: dict | None = None,
              runner: str = "lab.profiling") -> Record:
    """Measure ``case(**params)`` in fresh Python processes; see the module docstring. ``memory=False`` skips
    the CPU memory pass (``peak_mib`` is then the timing process's, inflated by the default allocator). ``env``
    (default: this process's) and ``runner`` (the module run with ``-m``, holding this file's ``_child``) let
    ``lab.bench.compare`` time another version of the library."""
    job = dict(case=case, params=params, warmup=warmup, repeats=repeats, device=device, threads=threads)
    env = lab_env() if env is None else env
    timed = _subprocess(job, env, timeout, runner)
    if device.startswith("cuda") or timed.status != "ok" or not memory:
        return timed
    job.update(warmup=0, repeats=1)
    mem = _subprocess(job, dict(env, MALLOC_MMAP_THRESHOLD_="131072"), timeout, runner)
    if mem.status != "ok":
        return Record(case, params, f"memory pass {mem.status}", timed.seconds, timed.times, None, device)
    timed.peak_mib = mem.peak_mib
    return timed


def run_series(case: str, lengths, params: dict, *, time_budget: float = 60.0, memory_budget_mib: float = 16384,
               on_record: Callable[[Record], None] | None = None, point: Callable[[dict], Record] | None = None,
               **kwargs) -> list[Record]:
    """Points for growing N (``params['n']``). After a point slower than ``time_budget`` seconds, or when the
    next point's memory (projected from the last growth ratio) would exceed ``memory_budget_mib``, the larger
    lengths are recorded as skipped instead of run. ``point(params)`` measures one point (default: ``run_point``
    in fresh processes, given ``kwargs``)."""
    records, stop = [], None
    for n in sorted(lengths):
        p = dict(params, n=n)
        if stop is None and len(records) >= 2 and records[-1].peak_mib and records[-2].peak_mib:
            (n1, m1), (n2, m2) = [(x.params["n"], max(x.peak_mib, 1.0)) for x in records[-2:]]
            projected = m2 * (m2 / m1) ** (math.log(n / n2) / math.log(n2 / n1))  # same growth law
            if projected > memory_budget_mib:
                stop = f"skipped: projected {projected:.0f} MiB > budget {memory_budget_mib:.0f} MiB"
        if stop:
            rec = Record(case, p, stop, device=kwargs.get("device", "cpu"))
        else:
            rec = point(p) if point is not None else run_point(case, p, **kwargs)
        records.append(rec)
        if on_record:
            on_record(rec)
        if stop is None:
            if rec.status != "ok":
                stop = f"skipped: a shorter length ended with {rec.status.split(':')[0]}"
            elif rec.seconds is not None and rec.seconds > time_budget:
                stop = f"skipped: N={n} took {rec.seconds:.1f} s > budget {time_budget:g} s"
    return records


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_name(count: bool = True) -> str:
    """The CPU model from /proc/cpuinfo, with the number of logical CPUs (``"... x2"``) unless ``count=False``,
    or the platform's guess."""
    names = [ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")]
    if names:
        return f"{names[0]} x{len(names)}" if count else names[0]
    return platform.processor() or platform.machine() or "unknown CPU"


# The /proc/cpuinfo flags that matter to float32/bfloat16 matmuls and elementwise kernels, in the order printed:
# x86 (AVX up to AMX) and Arm ("Features": NEON, SVE, bf16/i8mm).
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512dq", "avx512cd", "avx512bw",
                "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                "amx_fp16", "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")


def vector_extensions(lines: list[str] | None = None) -> list[str]:
    """The vector extensions of ``VECTOR_FLAGS`` that the first CPU of /proc/cpuinfo (or ``lines``) lists."""
    for ln in _cpuinfo() if lines is None else lines:
        key = ln.split(":", 1)[0].strip()
        if key in ("flags", "Features") and ":" in ln:
            have = set(ln.split(":", 1)[1].split())
            return [f for f in VECTOR_FLAGS if f in have]
    return []


def machine() -> str:
    """'CPU, torch version, threads': where a measurement ran."""
    return f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


@dataclass
class MachineInfo:
    """Where a benchmark ran, with the machine's measured float32 matmul rates (GFLOP/s, this process's
    threads). ``bmm`` is (batch, m, k, n): ``batch`` products of m x k by k x n."""

    cpu: str
    logical_cpus: int
    extensions: list
    torch_capability: str  # the vector width ATen's kernels dispatch to here ("AVX512", "AVX2", "DEFAULT", ...)
    threads: int
    torch: str
    sgemm_n: int
    sgemm_gflops: float
    bmm: tuple
    bmm_gflops: float
    repeats: int
    touch_mib: int = 32  # the first-touch probe: writing a new tensor of this size against an already written one
    fresh_gbs: float | None = None  # GB/s writing freshly allocated memory (page faults included)
    warm_gbs: float | None = None  # GB/s writing the same amount into memory already faulted in

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        """The machine block printed beside the benchmark tables: a two-column markdown table."""
        b, m, k, n = self.bmm
        rows = [("CPU", f"{self.cpu} ({self.logical_cpus} logical CPUs)"),
                ("vector extensions", f"{' '.join(self.extensions) or 'none found'} (torch kernels: "
                                      f"{self.torch_capability})"),
                ("threads", f"{self.threads} (torch {self.torch})"),
                (f"sgemm {self.sgemm_n}x{self.sgemm_n} float32", f"{self.sgemm_gflops:.3g} GFLOP/s"),
                (f"bmm {b} x ({m}x{k} @ {k}x{n}) float32", f"{self.bmm_gflops:.3g} GFLOP/s")]
        if self.fresh_gbs and self.warm_gbs:
            rows.append((f"writing {self.touch_mib} MiB: new memory / memory already touched",
                         f"{self.fresh_gbs:.3g} / {self.warm_gbs:.3g} GB/s ({self.warm_gbs / self.fresh_gbs:.1f}x)"))
        return "\n".join([f"| machine | measured in this process, median of {self.repeats} runs after a warm-up |",
                          "|---|---|", *(f"| {a} | {v} |" for a, v in rows)])


def machine_info(*, sgemm_n: int = 2048, bmm: tuple = (2048, 64, 256, 64), repeats: int = 5, seed: int = 0,
                 touch_mib: int = 32) -> MachineInfo:
    """The CPU, its vector extensions, the thread count and the measured float32 rates of an ``sgemm_n``-square
    matmul and of a batched matmul of shape ``bmm`` = (batch, m, k, n), each the median of ``repeats`` runs
    after a warm-up (into preallocated outputs, so allocation is not timed); and the speed of writing
    ``touch_mib`` MiB into a new tensor against one already written (glibc hands blocks of 32 MiB and more
    straight back to the OS when freed, so each new one is faulted in afresh, as a call's outputs are). About
    1-2 s at the defaults."""
    if sgemm_n < 1 or min(bmm) < 1 or repeats < 1 or touch_mib < 1:
        raise ValueError(f"machine_info: sizes and repeats must be >= 1, got sgemm_n={sgemm_n}, bmm={bmm}, "
                         f"repeats={repeats}, touch_mib={touch_mib}")
    env = dict(os.environ)
    try:
        return _machine_info(sgemm_n, bmm, repeats, seed, touch_mib)
    finally:  # torch may set variables on the way (TORCHINDUCTOR_CACHE_DIR was seen), which the fresh processes of
        # the points would inherit: with it, a point's measured pass imported more and read 310 MiB instead of 81
        os.environ.clear()
        os.environ.update(env)


def _touch_rates(mib: int, repeats: int) -> tuple[float, float]:
    """GB/s writing ``mib`` MiB into a newly allocated tensor (page faults included) and into an old one."""
    n = mib * 2**18  # float32 elements
    old = torch.empty(n).fill_(0.0)
    fresh_s, _ = median_time(lambda: torch.empty(n).fill_(1.0), warmup=1, repeats=repeats)
    warm_s, _ = median_time(lambda: old.fill_(1.0), warmup=1, repeats=repeats)
    return 4 * n / max(fresh_s, 1e-9) / 1e9, 4 * n / max(warm_s, 1e-9) / 1e9


def _machine_info(sgemm_n: int, bmm: tuple, repeats: int, seed: int, touch_mib: int) -> MachineInfo:
    g = torch.Generator().manual_seed(seed)
    a, b_ = (torch.randn(sgemm_n, sgemm_n, generator=g) for _ in range(2))
    out = torch.empty(sgemm_n, sgemm_n)
    sgemm_s, _ = median_time(lambda: torch.mm(a, b_, out=out), warmup=1, repeats=repeats)
    nb, m, k, n = bmm
    x, y = torch.randn(nb, m, k, generator=g), torch.randn(nb, k, n, generator=g)
    xy = torch.empty(nb, m, n)
    bmm_s, _ = median_time(lambda: torch.bmm(x, y, out=xy), warmup=1, repeats=repeats)
    fresh_gbs, warm_gbs = _touch_rates(touch_mib, repeats)
    lines = _cpuinfo()
    logical = sum(ln.startswith("processor") for ln in lines) or os.cpu_count() or 1
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return MachineInfo(cpu=cpu_name(count=False), logical_cpus=logical, extensions=vector_extensions(lines),
                       torch_capability=capability, threads=torch.get_num_threads(), torch=torch.__version__,
                       sgemm_n=sgemm_n, sgemm_gflops=2 * sgemm_n**3 / max(sgemm_s, 1e-9) / 1e9, bmm=tuple(bmm),
                       bmm_gflops=2 * nb * m * k * n / max(bmm_s, 1e-9) / 1e9, repeats=repeats,
                       touch_mib=touch_mib, fresh_gbs=fresh_gbs, warm_gbs=warm_gbs)


def _child(job: dict) -> None:
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    fn = _load(job["case"])(**job["params"])
    rec = measure(fn, case=job["case"], params=job["params"], warmup=job["warmup"], repeats=job["repeats"],
                  device=job["device"])
    print(json.dumps(rec.to_dict()), flush=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
