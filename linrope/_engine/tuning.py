"""Group sizes for the engine: a fixed default, and a measured one (``group_size="auto"``).

The group size G is how many positions' features sit in the workspace at once, in buffers of (B*H, G, r): too
small and the per-group Python and dispatch costs dominate (each group is some 50 small operations forward and
100 backward), too large and the buffers fall out of cache. The best size depends on the CPU *and* the shape (the
measurements behind these rules are in BENCHMARKS.md, "Group sizes"):

* ``default_group_size``: when ``group_size`` is None, 1 MiB buffers (``DEFAULT_ELEMENTS``), or, when that would
  take more than ``MANY_GROUPS`` groups, buffers of the CPU's L2 per core where it is larger (at most 4 MiB).
  Deterministic for a given machine and shape.
* On a GPU every group costs some 150 kernel launches and no cache is to be kept, so groups are as large as a
  memory budget allows: buffers of 64 MiB (``GPU_ELEMENTS``).
* ``auto_group_size``: ``group_size="auto"`` measures a few budgets on a probe of the call's shape class and keeps
  the fastest (``lookup`` / ``tune``), in memory and in a JSON file per machine (``$LINROPE_CACHE_DIR``, else
  ``~/.cache/linrope``), so that a process pays the measurement once per shape class and later processes not at
  all. Outputs differ between group sizes by float rounding only.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

DEFAULT_ELEMENTS = 2**18  # float32 elements per (B*H, G, r) work buffer when group_size is None: 1 MiB
MANY_GROUPS = 8  # beyond this many groups at 1 MiB, the per-group costs outweigh the cache (measured: see above)
MAX_ELEMENTS = 2**20  # 4 MiB: the largest default buffer
GPU_ELEMENTS = 2**24  # on a GPU: 64 MiB buffers (launch overhead, not cache, sets the size there; see below)
BUDGETS = tuple(2**e for e in range(17, 22))  # candidate buffer sizes for "auto": 512 KiB .. 8 MiB of float32
_MEMORY: dict[str, int] = {}


def group_size_for(elements: int, BH: int, r: int, chunk_size: int) -> int:
    """Whole chunks holding about ``elements`` float32 of (BH, G, r), at least one chunk."""
    return max(1, elements // (BH * r * chunk_size)) * chunk_size


@functools.lru_cache(maxsize=None)
def l2_bytes() -> int | None:
    """The L2 cache of cpu0 from sysfs (Linux), else None; read once per process."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return None
    return None


def default_group_size(N: int, BH: int, r: int, chunk_size: int, device: torch.device) -> int:
    """The group size when ``group_size`` is None: 1 MiB buffers of (BH, G, r) float32, or, on a CPU whose L2 per
    core is larger and when 1 MiB would take more than ``MANY_GROUPS`` groups of the N positions, L2-sized ones
    (at most 4 MiB); on a GPU, ``GPU_ELEMENTS``-sized ones (each group costs some 150 kernel launches)."""
    if device.type != "cpu":
        return group_size_for(GPU_ELEMENTS, BH, r, chunk_size)
    G = group_size_for(DEFAULT_ELEMENTS, BH, r, chunk_size)
    l2 = l2_bytes()
    if l2 is None or -(-N // G) <= MANY_GROUPS:
        return G
    return group_size_for(min(max(l2 // 4, DEFAULT_ELEMENTS), MAX_ELEMENTS), BH, r, chunk_size)


@functools.lru_cache(maxsize=None)
def _processor(device: torch.device) -> str:
    """The CPU model (/proc/cpuinfo) or the GPU's name: read once per process, not on every call."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        return name


def machine(device: torch.device) -> str:
    """What a tuned size is valid for: the processor (CPU model or GPU name), the thread count, torch's version."""
    return f"{_processor(device)}|{torch.get_num_threads()} threads|torch {torch.__version__}"


def cache_file() -> Path:
    return Path(os.environ.get("LINROPE_CACHE_DIR") or Path.home() / ".cache" / "linrope") / "group_sizes.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, key: str, value: int) -> None:
    """Add one entry to the JSON cache (re-read first: other processes may have added theirs); an unwritable cache
    only warns, the size stays in this process's memory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load(path)
        data[key] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"linrope: could not write the group-size cache {path} ({e}); set LINROPE_CACHE_DIR to a "
                      "writable folder to keep tuned sizes across processes", stacklevel=3)


def lookup(key: str, candidates: list[int]) -> int | None:
    """The size kept for ``key``, in memory or in the cache file (if still one of ``candidates``), or None."""
    if key not in _MEMORY:
        hit = candidates[0] if len(candidates) == 1 else _load(cache_file()).get(key)
        if not (isinstance(hit, int) and hit in candidates):
            return None
        _MEMORY[key] = hit
    return _MEMORY[key]


def tune(key: str, candidates: list[int], measure: Callable[[int], None], rounds: int = 2) -> int:
    """The fastest of ``candidates`` (group sizes) for ``key``, measured and kept: ``measure(G)`` runs one probe
    call; each candidate is warmed up once, then timed ``rounds`` times, the rounds interleaved across candidates
    (a shared machine drifts), and the smallest median wins. Kept in memory and in the cache file."""
    times: dict[int, list[float]] = {G: [] for G in candidates}
    for G in candidates:
        measure(G)
    for _ in range(rounds):
        for G in candidates:
            t = time.perf_counter()
            measure(G)
            times[G].append(time.perf_counter() - t)
    best = min(candidates, key=lambda G: statistics.median(times[G]))
    _save(cache_file(), key, best)
    _MEMORY[key] = best
    return best


def auto_group_size(kind: str, q, ks, v, r: int, causal: bool, rotation: str, chunk_size: int, dt: torch.dtype,
                    cross: bool) -> int:
    """``group_size="auto"``: the fastest group size for this call's shape class on this machine, measured once on
    random inputs of the same B, H, d, r, dv, feature kind ('favor' / 'features'), rotation ('none', 'interleaved',
    'half', 'learned'), dtype and direction, forward and backward, at a probe length (the call's length rounded up
    to a power of two, at most 4096 and at least 8 chunks), then cached. The size does not depend on whether this
    call needs gradients, so a checkpointed layer's recomputation uses the size of its first pass. The probe runs
    the engine on fresh tensors (random rotation tables: only their cost matters); nothing of the caller's is
    touched, the global random state included."""
    from .chunked import Call, EngineConfig, Inputs, empty_state, run  # here: chunked's users import this module

    B, H, N, dv = v.shape
    d = q.shape[-1]
    L = min(max(1 << (N - 1).bit_length(), 8 * chunk_size), 4096)
    candidates = sorted({min(group_size_for(e, B * H, r, chunk_size), -(-L // chunk_size) * chunk_size)
                         for e in BUDGETS})
    key = "|".join(map(str, (machine(v.device), v.device.type, dt, kind, rotation, "causal" if causal else
                             "cross" if cross else "bidirectional", f"B={B}", f"H={H}", f"d={d}", f"r={r}",
                             f"dv={dv}", f"C={chunk_size}", f"L={L}", "logscale" if ks is not None else "")))
    hit = lookup(key, candidates)
    if hit is not None:
        return hit
    # inference_mode(False): a caller in inference mode still gets a probe autograd can run through
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator(device=v.device).manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=gen, device=v.device, dtype=dt)  # noqa: E731
        x = dict(q=rand(B, H, L, d), k=rand(B, H, L, d), v=rand(B, H, L, dv))
        if kind == "features":
            x["q"], x["k"] = rand(B, H, L, r).exp(), rand(B, H, L, r).exp()
        for t in x.values():
            t.requires_grad_()
        if kind == "favor":
            x["projection"] = rand(r, d) * d ** -0.5
        if ks is not None:
            x["k_logscale"] = rand(B, H, L)
        if rotation == "learned":
            x.update(theta=rand(H, r // 2).requires_grad_(), phase=rand(H, r // 2).requires_grad_(),
                     angle_positions=torch.arange(L, device=v.device, dtype=torch.float64))
        elif rotation != "none":
            angle = rand(L, r // 2)
            x.update(cos=angle.cos(), sin=angle.sin())
            if cross:
                x.update(key_cos=x["cos"], key_sin=x["sin"])
        S0, z0, M0 = empty_state(B, H, r, dv, dt, v.device)

        def measure(G: int) -> None:
            cfg = EngineConfig(causal=causal, chunk_size=chunk_size, group_size=G, dtype=dt)
            call = Call(cfg, kind, interleaved=rotation != "half", first_position=0 if rotation == "learned" else None)
            out = run(call, Inputs(S0=S0, z0=z0, M0=M0, **x))[0]
            out.sum().backward()
            if v.device.type == "cuda":
                torch.cuda.synchronize(v.device)

        return tune(key, candidates, measure)
