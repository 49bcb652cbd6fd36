"""Benchmark cases and the performance targets, measured as ratios within one run.

Each ``case_*`` factory builds inputs for one configuration and returns a zero-argument callable (forward, or
forward+backward with a random upstream gradient); ``linrope.profiling.run_point`` times it in a fresh process.
Peers (performer-pytorch, pytorch-fast-transformers) are used only if installed; nothing here is imported by
the library itself.

Run: ``python -m linrope.bench`` or ``python experiments/bench.py`` (same thing, with options).
"""

from __future__ import annotations

import math
import platform
import statistics
from dataclasses import dataclass, replace

import torch

from .attention import LinearRotaryAttention, SoftmaxAttention
from .features import FavorPlus
from .functional import favor_attention
from .profiling import Record, run_point
from .rotary import RotaryEmbedding

__all__ = ["CASES", "causal_flops", "Target", "targets", "evaluate", "combine_rounds", "peers_available",
           "PROFILE_SERIES", "memory_profile", "plot_profile", "write_profile", "read_profile", "merge_profile"]


# ---------------------------------------------------------------------------------------------- cases
def _qkv(n, b, h, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device).requires_grad_() for _ in range(3)]


def _run(make_out, inputs, backward, device):
    """A callable running ``make_out()`` (and its backward with a fixed random gradient)."""
    grad = None

    def step():
        nonlocal grad
        out = make_out()
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            for t in inputs:
                t.grad = None
        return out

    if not backward:
        return lambda: torch.no_grad()(make_out)()
    return step


def case_linrope(n, b=1, h=8, d=64, r=256, causal=True, rope="features", backward=True, device="cpu", **_):
    """``favor_attention``: eq. 19 (rope='features'), RoPE before the features ('inputs') or none (None)."""
    q, k, v = _qkv(n, b, h, d, device)
    W = FavorPlus(d, r, seed=0).projection.to(device)
    feat = RotaryEmbedding(r) if rope == "features" else None
    inp = RotaryEmbedding(d) if rope == "inputs" else None

    def out():
        qq, kk = (inp.rotate(q), inp.rotate(k)) if inp is not None else (q, k)
        return favor_attention(qq, kk, v, W, causal=causal, rotary=feat)
    return _run(out, (q, k, v), backward, device)


def case_sdpa(n, b=1, h=8, d=64, causal=True, backward=True, device="cpu", **_):
    """torch's ``scaled_dot_product_attention`` on the same q, k, v (flash backend on CPU)."""
    q, k, v = _qkv(n, b, h, d, device)
    return _run(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                (q, k, v), backward, device)


def case_naive_softmax(n, b=1, h=8, d=64, causal=True, backward=True, device="cpu", **_):
    """Softmax attention with the N x N matrix materialised (the textbook reference)."""
    q, k, v = _qkv(n, b, h, d, device)

    def out():
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
        return s.softmax(-1) @ v
    return _run(out, (q, k, v), backward, device)


def case_layer(n, kind="linear", dim=512, heads=8, dim_head=64, r=256, causal=True, backward=True, device="cpu", **_):
    """The layers users import: ``LinearRotaryAttention`` (eq. 19) or ``SoftmaxAttention`` (SDPA + RoPE)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = LinearRotaryAttention(dim, heads=heads, dim_head=dim_head, nb_features=r, causal=causal)
    else:
        layer = SoftmaxAttention(dim, heads=heads, dim_head=dim_head, causal=causal)
    layer = layer.to(device)
    x = torch.randn(1, n, dim, device=device, requires_grad=True)
    params = [x, *layer.parameters()]
    return _run(lambda: layer(x), params, backward, device)


def _performer(d, r, causal, device):
    from performer_pytorch.performer_pytorch import FastAttention
    torch.manual_seed(0)
    return FastAttention(dim_heads=d, nb_features=r, causal=causal).to(device)


def case_performer(n, b=1, h=8, d=64, r=256, causal=True, path="default", backward=True, device="cpu", **_):
    """performer-pytorch ``FastAttention``: path 'default' is what it picks itself (on CPU the O(N r dv) fallback
    ``causal_linear_attention_noncuda``); 'ft' forces fast-transformers' ``CausalDotProduct`` (native CPU kernel)
    with its cumsum denominator. No RoPE (performer rotates q, k outside FastAttention)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning when its CUDA kernel is missing
        fa = _performer(d, r, causal, device)
    if causal and path == "ft":
        from performer_pytorch.performer_pytorch import causal_linear_attention
        fa.causal_linear_fn = causal_linear_attention
    q, k, v = _qkv(n, b, h, d, device)
    return _run(lambda: fa(q, k, v), (q, k, v), backward, device)


def case_matmul(n=2048, device="cpu", **_):
    """A square float32 matmul: the machine's reference FLOP rate."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda: a @ b


CASES = {
    "linrope": "linrope.bench:case_linrope",
    "sdpa": "linrope.bench:case_sdpa",
    "naive_softmax": "linrope.bench:case_naive_softmax",
    "layer": "linrope.bench:case_layer",
    "performer": "linrope.bench:case_performer",
    "matmul": "linrope.bench:case_matmul",
}


def peers_available() -> dict:
    """Which peer libraries import here."""
    found = {}
    for name, module in (("performer-pytorch", "performer_pytorch"),
                         ("fast-transformers", "fast_transformers.causal_product")):
        try:
            __import__(module)
            found[name] = True
        except Exception:  # an import of a compiled extension can fail in many ways
            found[name] = False
    return found


# ---------------------------------------------------------------------------------------------- FLOPs
def causal_flops(n: int, heads: int = 8, d: int = 64, r: int = 256, dv: int = 64, chunk: int = 64,
                 batch: int = 1, rotary: bool = True) -> float:
    """Useful FLOPs of causal ``favor_attention``, forward + backward, recomputation not counted.

    Per position and head (C = chunk; a matmul of m x k by k x n counts 2 m k n):

        forward   features q, k          2 * 2 d r
                  intra scores Q K^T     2 C r          (the whole C x C block)
                  intra A V              2 C dv
                  inter Q S, update K^T V  2 * 2 r dv
                  exp 2r, normalizer 3r, rotation of q and k 2 * 3r (with RoPE)
        backward  features q, k          2 * 2 d r
                  dA, A^T dG             2 * 2 C dv
                  dA K, dA^T Q           2 * 2 C r
                  G S^T, Q^T G, V dS^T, K dS   4 * 2 r dv
                  normalizer ~6r, rotations 2 * 3r (with RoPE)
    """
    fwd = 4 * d * r + 2 * chunk * r + 2 * chunk * dv + 4 * r * dv + 5 * r + (6 * r if rotary else 0)
    bwd = 4 * d * r + 4 * chunk * dv + 4 * chunk * r + 8 * r * dv + 6 * r + (6 * r if rotary else 0)
    return float(n * heads * batch * (fwd + bwd))


# ---------------------------------------------------------------------------------------------- targets
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


def targets(n: int = 16384, n_mem: int = 4096, with_peers: bool = True) -> list[tuple[str, str, dict]]:
    """The points the targets need: (key, case, params)."""
    pts = [
        ("ours", "linrope", dict(n=n, causal=True, rope="features")),
        ("ours_norope", "linrope", dict(n=n, causal=True, rope=None)),
        ("ours_2n", "linrope", dict(n=2 * n, causal=True, rope="features")),
        ("ours_mem", "linrope", dict(n=n_mem, causal=True, rope="features")),
        ("ours_bidir", "linrope", dict(n=n, causal=False, rope="features")),
        ("sdpa", "sdpa", dict(n=n, causal=True)),
        ("layer_linear", "layer", dict(n=n, kind="linear")),
        ("layer_softmax", "layer", dict(n=n, kind="softmax")),
        ("matmul", "matmul", dict(n=2048)),
    ]
    if with_peers:
        pts += [
            ("ft", "performer", dict(n=n, causal=True, path="ft")),
            ("performer_noncuda_mem", "performer", dict(n=n_mem, causal=True, path="default")),
            ("performer_bidir", "performer", dict(n=n, causal=False)),
        ]
    return pts


def evaluate(rec: dict[str, Record], n: int = 16384, n_mem: int = 4096) -> list[Target]:
    """Turn the records of ``targets()`` into the table of ratios."""
    def sec(key):
        r = rec.get(key)
        return r.seconds if r is not None and r.status == "ok" else None

    def mib(key):
        r = rec.get(key)
        return r.peak_mib if r is not None and r.status == "ok" else None

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    out = []
    out.append(Target(f"speed-up over FAVOR+ features + fast-transformers causal kernel, N={n}", ">=", 2.0,
                      ratio(sec("ft"), sec("ours")), "fast-transformers time / ours"))
    out.append(Target(f"speed-up over SDPA causal, N={n}", ">=", 5.0, ratio(sec("sdpa"), sec("ours")),
                      "SDPA time / ours"))
    out.append(Target(f"memory growth {2 * n}/{n}", "<=", 2.05, ratio(mib("ours_2n"), mib("ours")),
                      "peak(2N) / peak(N)"))
    out.append(Target(f"leaner than performer's noncuda causal, N={n_mem}", ">=", 20.0,
                      ratio(mib("performer_noncuda_mem"), mib("ours_mem")), "performer peak / ours"))
    out.append(Target(f"RoPE overhead, N={n}", "<=", 1.15, ratio(sec("ours"), sec("ours_norope")),
                      "with rotary / without"))
    rate = None if sec("matmul") is None else 2 * 2048**3 / sec("matmul")
    flops = causal_flops(n)
    out.append(Target(f"useful FLOP rate / square-matmul rate, N={n}", ">=", 0.30,
                      None if rate is None or sec("ours") is None else flops / sec("ours") / rate,
                      f"{flops / 1e9:.1f} GFLOP; matmul {0 if rate is None else rate / 1e9:.0f} GFLOP/s"))
    out.append(Target(f"layer time vs SoftmaxAttention, N={n}", "<=", 1 / 3,
                      ratio(sec("layer_linear"), sec("layer_softmax")), "LinearRotaryAttention / SoftmaxAttention"))
    out.append(Target(f"layer peak memory vs SoftmaxAttention, N={n}", "<=", 1.5,
                      ratio(mib("layer_linear"), mib("layer_softmax")), "LinearRotaryAttention / SoftmaxAttention"))
    out.append(Target(f"bidirectional time vs performer FastAttention, N={n}", "<=", 1.0,
                      ratio(sec("ours_bidir"), sec("performer_bidir")), "ours / performer"))
    out.append(Target(f"bidirectional memory vs performer FastAttention, N={n}", "<=", 1.0,
                      ratio(mib("ours_bidir"), mib("performer_bidir")), "ours / performer"))
    return out


# ---------------------------------------------------------------------------------------------- memory profile
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


def memory_profile(lengths, series=None, modes=("fwd", "fwd+bwd"), with_peers=False, device="cpu",
                   time_budget=60.0, memory_budget_mib=16384.0, repeats=3, on_record=None) -> list[Record]:
    """Peak memory and time against N for each series and mode; a series stops at the budgets (see
    ``linrope.profiling.run_series``). Records carry ``params['series']`` and ``params['mode']``."""
    names = list(PROFILE_SERIES) if series is None else list(series)
    unknown = [n for n in names if n not in PROFILE_SERIES]
    if unknown:
        raise ValueError(f"series: unknown {unknown}; expected some of {list(PROFILE_SERIES)}")
    from .profiling import run_series
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(label)
            ax.set_title(f"{label.split(' (')[0]}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile(records: list[Record], out: str, meta: dict | None = None) -> list[dict]:
    """Write ``memory.csv``, ``memory.json`` and ``memory.png`` under ``out``; returns the CSV rows."""
    import json
    import os

    from .plots import write_rows

    os.makedirs(out, exist_ok=True)
    rows = [dict(series=r.params["series"], mode=r.params["mode"], n=r.params["n"], seconds=r.seconds,
                 peak_mib=r.peak_mib, status=r.status) for r in records]
    write_rows(os.path.join(out, "memory.csv"), rows)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump({"machine": machine(), **(meta or {}), "records": [r.to_dict() for r in records]}, f, indent=1)
    plot_profile(records, os.path.join(out, "memory.png"), f"{machine()}; B=1 H=8 d=64 r=256 float32")
    return rows


def read_profile(out: str) -> list[Record]:
    """The records of an earlier ``write_profile`` (none if there is no ``memory.json``)."""
    import json
    import os

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


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def combine_rounds(first: Record, later: Record) -> Record:
    """``first`` (time and memory) with the timings of another process added: ``times`` gathers every run and
    ``rounds`` each process's median; ``seconds`` becomes the median of those. A failed round fails the point."""
    if first.status != "ok":
        return first
    if later.status != "ok":
        return replace(first, status=f"round failed: {later.status}")
    rounds = (first.rounds or [first.seconds]) + [later.seconds]
    return replace(first, times=list(first.times) + list(later.times), rounds=rounds,
                   seconds=statistics.median(rounds))


def main(argv=None) -> None:
    import argparse
    import datetime
    import json

    from tqdm import tqdm

    p = argparse.ArgumentParser(description="linrope performance targets, as ratios measured in one run")
    p.add_argument("--n", type=int, default=16384, help="sequence length of the speed targets")
    p.add_argument("--n-mem", type=int, default=4096, help="sequence length of the performer memory target")
    p.add_argument("--no-peers", action="store_true", help="skip performer-pytorch / fast-transformers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3,
                   help="fresh processes per point, interleaved across points; a point's time is the median of "
                        "its processes' medians (a process's time varies more than runs within it)")
    p.add_argument("--json", help="write the records and targets here")
    args = p.parse_args(argv)
    peers = peers_available()
    with_peers = not args.no_peers and all(peers.values())
    if not args.no_peers and not with_peers:
        print(f"peers missing ({', '.join(k for k, v in peers.items() if not v)}): their targets are skipped")
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")
    points = targets(args.n, args.n_mem, with_peers)
    records = {}
    with tqdm(total=len(points) * args.rounds, desc="points", unit="pt") as bar:
        for k in range(args.rounds):  # round-robin, so slow drifts of the machine hit every point alike
            for key, case, params in points:
                if k == 0 or records[key].status == "ok":  # a failed or timed-out point is not run again
                    rec = run_point(CASES[case], params, repeats=args.repeats, timeout=900, memory=k == 0)
                    records[key] = rec if k == 0 else combine_rounds(records[key], rec)
                bar.update()
    table = evaluate(records, args.n, args.n_mem)
    print(f"\n{machine()}, {datetime.date.today()}, float32, B=1 H=8 d=64 r=256, forward+backward, "
          f"median over {args.rounds} fresh processes per point of the median of {args.repeats} runs after a "
          f"warm-up")
    print(f"\n| target | measured | bound | met | how |\n|---|---:|---:|:---:|---|")
    for t in table:
        m = "n/a" if t.measured is None else f"{t.measured:.2f}"
        ok = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        print(f"| {t.name} | {m} | {t.op} {t.bound:.2f} | {ok} | {t.detail} |")
    print("\n| point | case | params | median s | peak MiB | status |\n|---|---|---|---:|---:|---|")
    for key, case, params in points:
        r = records[key]
        s = "" if r.seconds is None else f"{r.seconds:.3f}"
        m = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        print(f"| {key} | {case} | {params} | {s} | {m} | {r.status} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "date": str(datetime.date.today()),
                       "records": {k: v.to_dict() for k, v in records.items()},
                       "targets": [dict(t.__dict__, met=t.met) for t in table]}, f, indent=1)


if __name__ == "__main__":
    main()
