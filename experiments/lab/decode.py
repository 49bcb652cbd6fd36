"""Decoding cost against context length: per-token latency and the memory a layer keeps while it generates.

For each context length L one attention layer (B = 1, causal) is brought to position L, then fed single tokens:

* ``linear``: ``LinearRotaryAttention`` (eq. 19). A prompt of L random inputs runs through the layer in pieces
  (forward, no grad), carrying the state; the ``AttentionState`` it returns (numerator r x dv, key sum r and a
  log reference per head) is all that decoding keeps, whatever L.
* ``linear-cpp``: the same layer with ``kernel="cpp"``: its decoding steps run the compiled C++ step.
* ``softmax``: ``SoftmaxAttention`` with its ``KVCache``. The cache holds the layer's own projections (rotated
  keys, values) of L random inputs; attention over the prompt itself is not computed (O(L^2): hours at 1M), since
  the cost of a decoding step depends only on the cache's length, not on its values. The layer's step appends by
  concatenation (as Hugging Face's ``DynamicCache`` does), which copies the cache: pure, so a state can be reused
  or branched, but O(L) memory traffic per token.
* ``softmax-prealloc``: the same layer's step as a preallocated cache would run it: projections, RoPE at
  position L, then SDPA of the one query over the L cached keys, with no copy: the floor of softmax decoding.

Per point: the median time of one single-token forward (after warm-up), the bytes of the decoding state (exact:
the tensors' sizes) and the seconds spent bringing the layer to position L. Figures are reported against the
shortest context of the same kind and, at each L, linear against softmax, both measured in this run.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from linrope.attention import KVCache, LinearRotaryAttention, SoftmaxAttention
from linrope.functional import AttentionState

from . import plots
from .checks import check_int, is_int
from .profiling import machine

__all__ = ["DEFAULT_LENGTHS", "KINDS", "state_bytes", "build_layer", "decode_point", "decode_profile", "point_line",
           "decode_table", "plot_decode", "write_decode"]

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536, 262144, 1048576)
KINDS = ("linear", "linear-cpp", "softmax", "softmax-prealloc")
PIECE = 65536  # prompt positions per forward while building the state: bounds the prompt's activations


def state_bytes(state) -> int:
    """Bytes held by a decoding state (``AttentionState`` or ``KVCache``)."""
    if isinstance(state, AttentionState):
        tensors = (state.numerator, state.key_sum, state.log_ref)
    elif isinstance(state, KVCache):
        tensors = (state.k, state.v) + (() if state.mask is None else (state.mask,))
    else:
        raise TypeError(f"state: expected an AttentionState or a KVCache, got {type(state).__name__}")
    return sum(t.numel() * t.element_size() for t in tensors)


def build_layer(kind: str, dim: int, heads: int, dim_head: int, nb_features: int, seed: int = 0):
    """The causal layer of ``kind`` ('linear' or 'softmax'), in eval mode, with seeded weights."""
    torch.manual_seed(seed)
    if kind in ("linear", "linear-cpp"):
        layer = LinearRotaryAttention(dim, heads=heads, dim_head=dim_head, nb_features=nb_features, causal=True,
                                      seed=seed, kernel="cpp" if kind == "linear-cpp" else "torch")
    elif kind in ("softmax", "softmax-prealloc"):
        layer = SoftmaxAttention(dim, heads=heads, dim_head=dim_head, causal=True)
    else:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return layer.eval()


@torch.no_grad()
def _state_at(layer, kind: str, length: int, generator: torch.Generator):
    """The layer's decoding state after ``length`` random inputs (see the module docstring)."""
    dim = layer.dim
    if kind == "linear":
        state = None
        for a in range(0, length, PIECE):
            x = torch.randn(1, min(PIECE, length - a), dim, generator=generator)
            _, state = layer(x, state=state, return_state=True)
        return state
    ks, vs = [], []
    for a in range(0, length, PIECE):
        x = torch.randn(1, min(PIECE, length - a), dim, generator=generator)
        _, k, v = layer.split(x, None, False)
        if layer.rotary is not None:
            k = layer.rotary.rotate(k, a)
        ks.append(k)
        vs.append(v)
    return KVCache(torch.cat(ks, 2), torch.cat(vs, 2), None, length)


@torch.no_grad()
def decode_point(kind: str, length: int, *, dim: int = 512, heads: int = 8, dim_head: int = 64,
                 nb_features: int = 256, tokens: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """One point: bring a fresh layer to position ``length``, then time ``tokens`` single-token steps."""
    layer = build_layer(kind, dim, heads, dim_head, nb_features, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    state = _state_at(layer, "linear" if kind.startswith("linear") else "softmax", length, gen)
    build_s = time.perf_counter() - t0
    held = state_bytes(state)  # softmax-prealloc: counted before the free slot is added
    step = None
    if kind == "softmax-prealloc":
        step, state = _prealloc_step(layer, state), None  # the step holds the cache (and one free slot)
    times = []
    for i in range(warmup + tokens):
        x = torch.randn(1, 1, dim, generator=gen)
        t0 = time.perf_counter()
        out, new_state = step(x) if step else layer(x, state=state, return_state=True)
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(out).all(), f"{kind} at {length}: non-finite output"
        if kind.startswith("linear"):
            state = new_state  # constant size: keep decoding from it
        # softmax: keep the cache at ``length`` (appending would grow it by one row per step, 1e-6 of it)
    return dict(kind=kind, length=length, token_ms=1e3 * statistics.median(times[warmup:]), state_bytes=held,
                build_s=build_s, tokens=tokens, dim=dim, heads=heads, dim_head=dim_head, nb_features=nb_features)


def _prealloc_step(layer: SoftmaxAttention, cache: KVCache):
    """One decoding step of ``layer`` as a preallocated cache runs it: the new key and value are written into the
    free slot after the cache (the same slot at every timed step, so the context stays at its length), and the
    one query attends the cached keys and its own, with no copy of the cache."""
    L = cache.offset
    k_buf = torch.cat((cache.k, cache.k[:, :, :1]), 2)  # capacity L + 1 (built once, before timing)
    v_buf = torch.cat((cache.v, cache.v[:, :, :1]), 2)

    def step(x):
        q, k, v = layer.split(x, None, False)
        q, k = layer.rotary.rotate(q, L), layer.rotary.rotate(k, L)
        k_buf[:, :, L:] = k
        v_buf[:, :, L:] = v
        out = F.scaled_dot_product_attention(q, k_buf, v_buf)  # the last query sees every key: no mask
        return layer.merge(out), None
    return step


def decode_profile(lengths=DEFAULT_LENGTHS, kinds=KINDS, *, max_cache_gib: float = 6.0,
                   on_point=None, **kwargs) -> list[dict]:
    """Points for every kind and length; a softmax cache larger than ``max_cache_gib`` is skipped (recorded).
    ``on_point(row)`` sees each row as it ends (``point_line`` prints one); ``kwargs`` go to ``decode_point``."""
    if not lengths or any(not is_int(n) or n < 1 for n in lengths):
        raise ValueError(f"lengths: expected positive integers, got {list(lengths)}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds: expected names from {KINDS}, got {list(kinds)}")
    if "tokens" in kwargs:
        check_int("tokens", kwargs["tokens"])
    rows = []
    for length in sorted(lengths):
        for kind in kinds:
            cache = 2 * length * kwargs.get("heads", 8) * kwargs.get("dim_head", 64) * 4 / 2**30
            if not kind.startswith("linear") and cache > max_cache_gib:
                row = dict(kind=kind, length=length, status=f"skipped: KV cache {cache:.1f} GiB > {max_cache_gib} GiB")
            else:
                row = dict(decode_point(kind, length, **kwargs), status="ok")
            rows.append(row)
            if on_point:
                on_point(row)
    base = {k: next((r for r in rows if r["kind"] == k and r["status"] == "ok"), None) for k in kinds}
    for r in rows:
        if r["status"] != "ok":
            continue
        b = base[r["kind"]]
        r["token_vs_shortest"] = r["token_ms"] / b["token_ms"]
        if not r["kind"].startswith("linear"):
            continue
        for other_kind, key in (("softmax", "softmax"), ("softmax-prealloc", "prealloc")):
            other = next((o for o in rows if o["length"] == r["length"] and o["kind"] == other_kind
                          and o["status"] == "ok"), None)
            if other is not None:
                r[f"token_vs_{key}"] = r["token_ms"] / other["token_ms"]
                r[f"state_vs_{key}"] = r["state_bytes"] / other["state_bytes"]
    return rows


def point_line(row: dict) -> str:
    """One line for one point of ``decode_profile`` (its progress as the points end)."""
    head = f"{row['kind']:<8} L={row['length']:<8}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return (f"{head} {row['token_ms']:8.3f} ms/token  state {row['state_bytes'] / 2**20:10.2f} MiB  "
            f"(reached in {row['build_s']:.1f} s)")


def decode_table(rows: list[dict]) -> str:
    """The markdown table of ``decode_profile``'s rows, a line per context length ('—' where a point is missing)."""
    def cell(got: dict, kind: str, key: str, fmt: str, unit: str = "") -> str:
        return format(got[kind][key], fmt) + unit if key in got.get(kind, {}) else "—"

    lines = ["| context | linear ms/token (torch / cpp) | softmax ms/token (concat / prealloc) | linear / softmax "
             "time (concat / prealloc) | linear cpp / softmax prealloc | linear state | softmax cache |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r["length"] for r in rows}):
        got = {r["kind"]: dict(r, state_mib=r["state_bytes"] / 2**20) for r in rows
               if r["length"] == n and r["status"] == "ok"}
        lines.append(f"| {n} | {cell(got, 'linear', 'token_ms', '.3f')} / {cell(got, 'linear-cpp', 'token_ms', '.3f')} | "
                     f"{cell(got, 'softmax', 'token_ms', '.3f')} / {cell(got, 'softmax-prealloc', 'token_ms', '.3f')} | "
                     f"{cell(got, 'linear', 'token_vs_softmax', '.3f')} / "
                     f"{cell(got, 'linear', 'token_vs_prealloc', '.3f')} | "
                     f"{cell(got, 'linear-cpp', 'token_vs_prealloc', '.3f')} | "
                     f"{cell(got, 'linear', 'state_mib', '.2f', ' MiB')} | "
                     f"{cell(got, 'softmax', 'state_mib', '.1f', ' MiB')} |")
    return "\n".join(lines)


def plot_decode(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Two log-log panels against context length: per-token latency and decoding-state memory."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, kind in enumerate(sorted({r["kind"] for r in rows})):
        ok = [r for r in rows if r["kind"] == kind and r["status"] == "ok"]
        xs = [r["length"] for r in ok]
        label = {"linear": "LinearRotaryAttention (eq. 19 state)",
                 "linear-cpp": "LinearRotaryAttention, kernel=\"cpp\"",
                 "softmax": "SoftmaxAttention (KVCache, concatenated)",
                 "softmax-prealloc": "softmax, preallocated cache (SDPA only)"}[kind]
        axes[0].plot(xs, [r["token_ms"] for r in ok], "o-", color=plots.color(i), label=label)
        axes[1].plot(xs, [r["state_bytes"] / 2**20 for r in ok], "o-", color=plots.color(i), label=label)
    for ax, ylabel in zip(axes, ("ms per generated token", "decoding state (MiB)")):
        plots.log_axes(ax, "context length (tokens)", ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_decode(rows: list[dict], out: str | Path, args: dict) -> Path:
    """decode.csv, decode.json (rows, machine, arguments) and decode.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots.write_rows(out / "decode.csv", rows)
    info = machine()
    (out / "decode.json").write_text(json.dumps(dict(machine=info, args=args, rows=rows), indent=1))
    plot_decode(rows, out / "decode.png", title=f"one causal layer (dim {args.get('dim')}, {args.get('heads')} heads, "
                                               f"r = {args.get('nb_features')}), B = 1; {info}")
    return out
