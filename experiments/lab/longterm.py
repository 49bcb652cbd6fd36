"""Long-term decay (RoFormer sec. 3.4.3, Fig. 2) in feature space, measured (issue 13 section 4).

Three views of one question: does RoPE applied to the FAVOR+ features (eq. 19, normalizer unrotated) keep the
long-term decay that RoPE has when it acts on q and k?

(a) The paper's bound
---------------------
With h_j = q_[2j:2j+1] conj(k_[2j:2j+1]) (complex, one per pair) and S_i = sum_{j=0}^{i-1} e^{i Delta theta_j}, Abel
summation gives |sum_j h_j e^{i Delta theta_j}| <= (max_j |h_{j+1} - h_j|) sum_{i=1}^{P} |S_i|, P pairs. The paper plots
the *relative upper bound* (1/P) sum_{i=1}^{P} |S_i| against Delta (its Fig. 2): a function of the frequencies
theta_j = base^(-2j/(2P)) alone, equal to (P + 1)/2 at Delta = 0 (S_i = i). ``relative_upper_bound``. For eq. 19 the
pairs are the r/2 pairs of random features: at r = d = 64 the frequencies, hence the bound, are *identical* to a
d = 64 head's; what differs is the factor in front, max_j |h_{j+1} - h_j|, which for features is not small (the
c_j of neighbouring feature pairs are unrelated random numbers), so the bound says little about eq. 19.

(b) The kernel, measured
------------------------
For q, k in R^d (entries N(0, 1), d = 64) and a FAVOR+ projection W (r, d) (``favor_plus``, a fresh orthogonal
projection per group of draws), write the feature pairs as z_i = phi_2i + i phi_2i+1 and c_i = z_q,i conj(z_k,i).
With the query at position Delta and the key at 0 (causal attention at distance Delta), eq. 19 weighs the key by

    K(Delta) = (R_Delta phi(q)) . phi(k) = Re sum_i c_i e^{i theta_i Delta},   D = phi(q) . phi(k) = K(0),

the unrotated normalizer. The ratio K(Delta)/D is free of every per-vector scale FAVOR+ drops, and can be
negative (and exceed 1 in size: Re c_i >= 0 but Im c_i is free). ``feature_kernel`` returns it per draw, beside

* ``rope-inputs (FAVOR+)``: phi(R_Delta q) . phi(k) / phi(q) . phi(k), RoPE on q before the map (the keys' and
  queries' log-scales kept, since max_j u_j changes with the rotation);
* ``rope-inputs (exact)``: exp((R_Delta q) . k / sqrt(d)) / exp(q . k / sqrt(d)), what FAVOR+ estimates and what
  softmax + RoPE weighs by before normalization.

Two kinds of content: ``independent`` q and k (nothing to decay towards: (R_Delta q) . k has the same law at
every Delta, so any "decay" is a loss of correlation with Delta = 0), and ``aligned`` k = q (h_j = |q_j|^2 >= 0, the
case the bound describes: a query that matches a key, whose score decays as the pairs dephase).
``kernel_summary`` gives the mean of |ratio|, the mean signed ratio and the median of |ratio| at each Delta.

(c) Trained models
------------------
Small causal byte LMs (``lab.models.ByteLM``, the ``quick`` preset's size: 3 layers, width 128, 4 heads of
32, r = 64) trained with ``lab.train.train`` on the stdlib corpus; on held-out windows (the validation
split's fixed windows) each layer's normalized weights a_mn (query m, key n <= m) are computed in float64 from the
layer's own q, k (captured with forward pre-hooks: ``capture_attention_inputs``, ``attention_weights``):

* linear, eq. 19: a_mn = (R_m phi(q_m)) . (R_n phi(k_n)) / sum_{n' <= m} phi(q_m) . phi(k_n') (signed; the rotated
  weights from ``linrope.reference.linear_attention_naive`` with one-hot values, exact at any scale);
* linear, RoPE on inputs or none: the same with phi(R q), phi(R k) (or no rotation), all weights >= 0;
* softmax: the softmax probabilities of q k^T / sqrt(d) (RoPE'd q, k; T5's bias added for softmax-t5).

``distance_profile`` sums, per distance Delta = m - n: |a|, a, |a| (m + 1) and a (m + 1), and counts. The plain
mean |a| falls with Delta even for uniform weights (a distance Delta only occurs in rows m >= Delta, whose uniform
weight 1/(m + 1) is smaller), so the figures and tables also give |a| (m + 1), the weight relative to uniform
(1 everywhere for uniform attention). Averages are over sequences, heads, rows and (in "all layers") layers.
Each model is also measured at initialization (the same seed, before the first step): the decay an untrained
layer has from its construction alone.

``row_sums`` gives the mean over rows of sum_n a_mn: 1 for softmax and for linear attention with an unrotated
numerator, the mean of K/D-weighted sums for eq. 19 (its output shrinks where the rotated numerator cancels).

``run`` does all three and writes under ``out``: bound.csv, kernel.csv (+ kernel_summary.csv), profiles.csv
(per variant, stage, layer, Delta), trained_summary.csv (binned), row_sums.csv, models.csv, summary.json,
stdout.txt and the figures bound.png, kernel.png, trained.png. Shapes: B batch, H heads, N sequence length, d head
dim, r features.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from linrope.attention import LinearRotaryAttention, SoftmaxAttention
from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.reference import linear_attention_naive

from .data import LMTask, load_corpus
from .mechanism import rope_frequencies, study_start
from .models import VARIANTS, ByteLM, ModelConfig, T5Attention, t5_buckets
from .plots import pyplot, write_rows
from .sweeps import PRESETS
from .train import TrainConfig, train

__all__ = ["relative_upper_bound", "bound_at_zero", "bound_rows", "kernel_deltas", "eq19_kernel", "feature_kernel",
           "kernel_summary", "capture_attention_inputs", "attention_weights", "distance_profile", "profile_means",
           "binned", "row_sums", "measure_model", "LongtermConfig", "QUICK", "run"]

F64 = torch.float64
REPORT_BINS = (("0", 0, 0), ("1", 1, 1), ("8-12", 8, 12), ("90-110", 90, 110), ("400-511", 400, 511))


# ================================================================================================ (a) the bound
def relative_upper_bound(theta: np.ndarray, deltas) -> np.ndarray:
    """(1/P) sum_{i=1}^{P} |S_i(Delta)|, S_i = sum_{j<i} e^{i Delta theta_j}, for each Delta of ``deltas``.

    theta: (P,) frequencies; deltas: (D,) distances (any real numbers). Returns (D,) float64.
    """
    theta = np.asarray(theta, dtype=np.float64)
    deltas = np.asarray(deltas, dtype=np.float64)
    S = np.cumsum(np.exp(1j * deltas[:, None] * theta[None, :]), axis=1)  # (D, P): S_1 .. S_P
    return np.abs(S).mean(axis=1)


def bound_at_zero(pairs: int) -> float:
    """The closed form at Delta = 0: S_i = i, so (1/P) sum_{i=1}^{P} i = (P + 1)/2."""
    return (pairs + 1) / 2


def bound_rows(d: int = 64, rs=(64, 256), base: float = 10000.0, max_delta: int = 1024) -> list[dict]:
    """Rows (design, pairs, delta, bound, bound_rel = bound / bound at 0) for RoPE on a d-head and on r features,
    Delta = 0..max_delta."""
    deltas = np.arange(max_delta + 1)
    rows = []
    for name, dim in [(f"RoPE on q, k (d={d})", d)] + [(f"eq. 19 on features (r={r})", r) for r in rs]:
        b = relative_upper_bound(rope_frequencies(dim, base), deltas)
        rows += [{"design": name, "pairs": dim // 2, "delta": int(t), "bound": float(v),
                  "bound_rel": float(v / b[0])} for t, v in zip(deltas, b)]
    return rows


# ============================================================================================= (b) the kernel
def kernel_deltas(max_delta: int = 1024, dense: int = 64, points: int = 80) -> np.ndarray:
    """Distances 0..dense, then ``points`` log-spaced up to ``max_delta``, always with 1, 10, 100, 250, 1000 (if
    <= max_delta): a sorted int array."""
    logs = np.geomspace(dense, max_delta, points).round().astype(int) if max_delta > dense else []
    extra = [t for t in (1, 10, 100, 250, 1000) if t <= max_delta]
    return np.unique(np.concatenate([np.arange(min(dense, max_delta) + 1), logs, extra, [max_delta]]).astype(int))


def _pairs(x: Tensor) -> Tensor:
    """(..., r) real -> (..., r/2) complex z_i = x_2i + i x_2i+1 (the interleaved pairs of ``RotaryEmbedding``)."""
    return torch.complex(x[..., 0::2], x[..., 1::2])


def eq19_kernel(qf: Tensor, kf: Tensor, deltas, base: float = 10000.0) -> Tensor:
    """K(Delta) = (R_Delta qf) . kf = Re sum_i c_i e^{i theta_i Delta}, c_i = z_q,i conj(z_k,i), theta_i = base^(-2i/r):
    the eq. 19 score of a key at position 0 for a query at position Delta (interleaved pairs, as ``RotaryEmbedding``).

    qf, kf: (..., r) features; deltas: (T,). Returns (..., T) in float64; K(0) = qf . kf, the unrotated normalizer.
    """
    r = qf.shape[-1]
    deltas = torch.as_tensor(np.asarray(deltas), dtype=F64)
    theta = torch.as_tensor(rope_frequencies(r, base))
    rot = torch.polar(torch.ones(len(deltas), r // 2, dtype=F64), deltas[:, None] * theta)  # (T, r/2)
    c = _pairs(qf.to(F64)) * _pairs(kf.to(F64)).conj()  # (..., r/2)
    return (c[..., None, :] * rot).real.sum(-1)


def feature_kernel(r: int, deltas, *, d: int = 64, draws: int = 1024, per_projection: int = 16,
                   content: str = "independent", base: float = 10000.0, seed: int = 0) -> dict[str, Tensor]:
    """Per-draw ratios against Delta for q, k ~ N(0, I_d) (``content='independent'``) or k = q (``'aligned'``).

    ``draws`` pairs (q, k), a fresh orthogonal FAVOR+ projection (r, d) every ``per_projection`` of them. Returns
    a dict of (draws, len(deltas)) float64 tensors:
      ``eq19``: K(Delta)/D = Re sum_i c_i e^{i theta_i Delta} / sum_i Re c_i (query at Delta, key at 0);
      ``inputs_favor``: phi(R_Delta q) . phi(k) / phi(q) . phi(k) (RoPE on q before FAVOR+, r features);
      ``inputs_exact``: exp(((R_Delta q) . k - q . k) / sqrt(d)) (the kernel FAVOR+ estimates; no features).
    The RoPE on q uses the d-head frequencies (base^(-2i/d)), eq. 19 the r-feature ones (base^(-2i/r)).
    """
    if content not in ("independent", "aligned"):
        raise ValueError(f"content: expected 'independent' or 'aligned', got {content!r}")
    if r % 2 or d % 2:
        raise ValueError(f"r, d: expected even numbers, got r={r}, d={d}")
    deltas = torch.as_tensor(np.asarray(deltas), dtype=F64)
    if deltas.dim() != 1 or not len(deltas) or deltas[0] != 0:
        raise ValueError("deltas: expected a 1-D list of distances starting with 0 (the ratios refer to it)")
    g = torch.Generator().manual_seed(seed)
    th_d = torch.as_tensor(rope_frequencies(d, base))
    ang_d = deltas[:, None] * th_d  # (T, d/2)
    out = {"eq19": [], "inputs_favor": [], "inputs_exact": []}
    done = 0
    while done < draws:
        n = min(per_projection, draws - done)
        W = gaussian_orthogonal_matrix(r, d, generator=g)  # float64
        q = torch.randn(n, d, generator=g, dtype=F64)
        k = q.clone() if content == "aligned" else torch.randn(n, d, generator=g, dtype=F64)
        # eq. 19: the ratio is free of the per-vector factors favor_plus drops (so k may drop them too)
        qf, _ = favor_plus(q, W, is_query=True)
        kf, _ = favor_plus(k, W, is_query=True)
        K = eq19_kernel(qf, kf, deltas, base)  # (n, T)
        out["eq19"].append(K / K[:, :1])
        # RoPE on q before the map: rotated queries at every Delta, with their log-scales
        cos, sin = ang_d.cos(), ang_d.sin()  # (T, d/2)
        q0, q1 = q[:, None, 0::2], q[:, None, 1::2]  # (n, 1, d/2)
        qr = torch.stack((q0 * cos - q1 * sin, q0 * sin + q1 * cos), -1).flatten(-2)  # (n, T, d)
        fq, lq = favor_plus(qr, W, is_query=False)  # (n, T, r), (n, T)
        fk, lk = favor_plus(k, W, is_query=False)  # (n, r), (n,)
        num = (fq * fk[:, None, :]).sum(-1) * torch.exp(lq - lq[:, :1])  # relative to the Delta = 0 row's scale
        out["inputs_favor"].append(num / num[:, :1])
        s = (qr * k[:, None, :]).sum(-1) / math.sqrt(d)  # (n, T)
        out["inputs_exact"].append(torch.exp(s - s[:, :1]))
        done += n
    return {key: torch.cat(v) for key, v in out.items()}


def kernel_summary(ratios: Tensor) -> dict[str, Tensor]:
    """Per Delta (columns of ``ratios`` (draws, T)): ``mean_abs``, ``mean``, ``median_abs``, ``std_abs`` ((T,)
    each)."""
    a = ratios.abs()
    return {"mean_abs": a.mean(0), "mean": ratios.mean(0), "median_abs": a.median(0).values,
            "std_abs": a.std(0)}


# ====================================================================================== (c) trained weights
def capture_attention_inputs(model: ByteLM, idx: Tensor) -> list[Tensor]:
    """The input of every block's attention (the normed residual stream), one (B, N, C) tensor per layer, from one
    forward pass of ``model`` on ``idx`` (B, N) under no_grad (forward pre-hooks, removed afterwards)."""
    seen: list[Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
             for b in model.blocks]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def attention_weights(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Causal normalized weights of one attention layer on its input x (B, N, C), in float64.

    Returns (a (B, H, N, N), v (B, H, N, dv)): sum_n a_mn v_n is the layer's per-head output before ``to_out``
    (``attn.merge`` of it is the layer's output). a_mn is 0 for n > m. Linear layers (``LinearRotaryAttention``):
    eq. 19 weights, signed with rope='features' (rotated numerator, unrotated normalizer unless the layer rotates
    it); softmax layers (``SoftmaxAttention``, ``T5Attention``): the softmax probabilities.
    """
    inner = attn.inner if isinstance(attn, T5Attention) else attn
    if not isinstance(inner, (LinearRotaryAttention, SoftmaxAttention)):
        raise TypeError(f"attn: expected a linrope attention layer, got {type(attn).__name__}")
    q, k, v = inner.split(x, None, False)
    q, k = inner.yarn_scale(q, k)
    q, k, v = q.to(F64), inner.share_kv(k).to(F64), inner.share_kv(v).to(F64)
    B, H, N, dh = q.shape
    pos = torch.arange(N, device=x.device)
    keep = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
    if inner.rotary is not None and inner.rope == "inputs":
        q, k = inner.rotary.rotate(q, pos), inner.rotary.rotate(k, pos)
    if isinstance(inner, SoftmaxAttention):
        s = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if isinstance(attn, T5Attention):
            rel = pos[None, :] - pos[:, None]
            s = s + attn.bias(t5_buckets(rel, attn.buckets, attn.max_distance)).permute(2, 0, 1).to(F64)
        return torch.softmax(s.masked_fill(~keep, -math.inf), -1), v
    qf, _ = inner.feature_map(q, is_query=True)
    kf, ks = inner.feature_map(k, is_query=False)
    # the library's float64 eq. 19 with one-hot values: row m of the output is row m of the weights
    onehot = torch.eye(N, dtype=F64, device=x.device).expand(B, H, N, N)
    a = linear_attention_naive(qf, kf, onehot, causal=True, k_logscale=ks,
                               rotary=inner.rotary if inner.rope == "features" else None)
    if getattr(inner, "rotate_normalizer", False):  # the rotated scores normalize themselves: divide by their own row sums
        total = a.sum(-1, keepdim=True)
        a = a / torch.where(total == 0, 1, total)
    return a, v


def distance_profile(a: Tensor) -> dict[str, Tensor]:
    """Sums over everything but the distance Delta = m - n >= 0 of causal weights a (..., N, N).

    Returns (N,) float64 tensors: ``abs`` sum |a|, ``signed`` sum a, ``rel_abs`` sum |a| (m + 1), ``rel`` sum
    a (m + 1), and ``count`` (the number of (batch, head, row) entries at each Delta: prod(...) (N - Delta)).
    """
    N = a.shape[-1]
    m = torch.arange(N)[:, None]
    delta = (m - torch.arange(N)[None, :]).expand(*a.shape)
    keep = delta >= 0
    idx, vals = delta[keep], a.to(F64)[keep]
    rows = (m.to(F64) + 1).expand(*a.shape)[keep]
    sums = {"abs": vals.abs(), "signed": vals, "rel_abs": vals.abs() * rows, "rel": vals * rows}
    out = {key: torch.bincount(idx, weights=w, minlength=N) for key, w in sums.items()}
    out["count"] = torch.bincount(idx, minlength=N).to(F64)
    return out


def profile_means(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Means per Delta from ``distance_profile`` sums: ``mean_abs``, ``mean``, ``rel_abs``, ``rel`` (N,)."""
    c = sums["count"].clamp_min(1)
    return {"mean_abs": sums["abs"] / c, "mean": sums["signed"] / c, "rel_abs": sums["rel_abs"] / c,
            "rel": sums["rel"] / c}


def binned(sums: dict[str, Tensor], lo: int, hi: int) -> dict[str, float]:
    """Means over all entries with lo <= Delta <= hi (weighted by counts) from ``distance_profile`` sums."""
    c = float(sums["count"][lo:hi + 1].sum())
    return {key: float(sums[s][lo:hi + 1].sum()) / c for key, s in
            (("mean_abs", "abs"), ("mean", "signed"), ("rel_abs", "rel_abs"), ("rel", "rel"))}


@torch.no_grad()
def measure_model(model: ByteLM, x: Tensor, *, batch: int = 1) -> list[dict[str, Tensor]]:
    """``distance_profile`` sums of every layer over the sequences x (W, N), ``batch`` at a time: one dict per
    layer (the sums add over sequences, heads and rows)."""
    was = model.training
    model.eval()
    total: list[dict[str, Tensor]] | None = None
    for i in range(0, x.shape[0], batch):
        xs = capture_attention_inputs(model, x[i:i + batch])
        profs = [distance_profile(attention_weights(b.attn, h)[0]) for b, h in zip(model.blocks, xs)]
        total = profs if total is None else [{k: t[k] + p[k] for k in t} for t, p in zip(total, profs)]
    model.train(was)
    return total


def row_sums(sums: dict[str, Tensor]) -> dict[str, float]:
    """The mean over rows of sum_n a_mn (``signed``) and of sum_n |a_mn| (``abs``) from ``distance_profile`` sums
    (every row has a Delta = 0 entry, so count[0] is the number of rows). 1 and 1 for softmax and any linear
    attention with an unrotated numerator; eq. 19's rotated numerator makes the signed sum K/D-weighted, below 1."""
    rows = float(sums["count"][0])
    return {"signed": float(sums["signed"].sum()) / rows, "abs": float(sums["abs"].sum()) / rows}


def _all_layers(layers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: sum(p[k] for p in layers) for k in layers[0]}


# ================================================================================================= the study
@dataclass
class LongtermConfig:
    """What ``run`` measures (the script's arguments)."""

    out: str = "experiments/results/longterm"
    d: int = 64
    rs: tuple = (64, 256)
    base: float = 10000.0
    max_delta: int = 1024
    draws: int = 2048
    variants: tuple = ("linear-rope", "linear-rope-inputs", "softmax-rope", "linear-nope")
    seeds: tuple = (0,)
    steps: int = 400
    length: int = 512
    eval_windows: int = 16
    skip_models: bool = False
    resume: bool = False
    progress: bool = False


QUICK = dict(draws=256, steps=40, eval_windows=2, variants=("linear-rope", "linear-rope-inputs", "softmax-rope"),
             length=256)


def _train_configs(cfg: LongtermConfig, variant: str, seed: int) -> tuple[ModelConfig, TrainConfig]:
    p = PRESETS["quick"]
    mc = ModelConfig(**{**p.model, "attention": variant, "feature_seed": seed})
    ev = max(cfg.steps // 4, 1)
    tc = TrainConfig(**{**p.train, "steps": cfg.steps, "seed": seed, "batch_size": p.tokens_per_step // cfg.length,
                        "warmup": min(p.train["warmup"], max(cfg.steps // 8, 1)), "eval_interval": ev,
                        "ckpt_interval": cfg.steps})
    return mc, tc


def _row_bins(sums, tags) -> list[dict]:
    return [{**tags, "bin": name, **{k: round(v, 6) for k, v in binned(sums, lo, hi).items()}}
            for name, lo, hi in REPORT_BINS if hi < len(sums["count"])]


def run(cfg: LongtermConfig, log=print) -> dict:
    """(a), (b), (c) of the module docstring: tables through ``log`` (and into stdout.txt), CSV / JSON / PNG under
    ``cfg.out``. Returns the summary dict (also summary.json)."""
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants: unknown {bad}; expected names from {sorted(VARIANTS)}")
    log, lines, out, cpu, t_start = study_start(cfg.out, log)
    summary: dict = {"cpu": cpu, "torch": torch.__version__, "config": asdict(cfg)}

    # (a) the bound
    brows = bound_rows(cfg.d, cfg.rs, cfg.base, cfg.max_delta)
    write_rows(out / "bound.csv", brows)
    at = [t for t in (0, 1, 10, 100, 250, 1000) if t <= cfg.max_delta]
    bsum = {}
    log("")
    log("(a) RoFormer's relative upper bound (1/P) sum_i |S_i(Delta)| (value, and relative to Delta = 0):")
    log("| design | P | " + " | ".join(f"Delta={t}" for t in at) + " |")
    log("|---|---|" + "---|" * len(at))
    for design in dict.fromkeys(r["design"] for r in brows):
        rs = {r["delta"]: r for r in brows if r["design"] == design}
        bsum[design] = {t: rs[t]["bound"] for t in at}
        log(f"| {design} | {rs[0]['pairs']} | " + " | ".join(f"{rs[t]['bound']:.2f} ({rs[t]['bound_rel']:.3f})"
                                                           for t in at) + " |")
    summary["bound"] = bsum

    # (b) the kernel
    t0 = time.perf_counter()
    deltas = kernel_deltas(cfg.max_delta)
    krows, ksum = [], []
    curves = {}
    for content in ("independent", "aligned"):
        for r in cfg.rs:
            ratios = feature_kernel(r, deltas, d=cfg.d, draws=cfg.draws, content=content, base=cfg.base, seed=r)
            for kind, rat in ratios.items():
                if kind == "inputs_exact" and r != cfg.rs[0]:
                    continue  # no features involved: the same for every r
                name = {"eq19": f"eq. 19 (r={r})", "inputs_favor": f"RoPE on q, then FAVOR+ (r={r})",
                        "inputs_exact": f"RoPE on q, exact exp (d={cfg.d})"}[kind]
                s = kernel_summary(rat)
                curves[(content, name)] = s
                krows += [{"content": content, "kernel": name, "delta": int(t),
                           **{key: float(val[j]) for key, val in s.items()}} for j, t in enumerate(deltas)]
                pick = {int(t): j for j, t in enumerate(deltas)}
                ksum.append({"content": content, "kernel": name, "draws": cfg.draws,
                             **{f"mean_abs@{t}": round(float(s["mean_abs"][pick[t]]), 4) for t in at},
                             **{f"mean@{t}": round(float(s["mean"][pick[t]]), 4) for t in at},
                             **{f"median_abs@{t}": round(float(s["median_abs"][pick[t]]), 4) for t in at}})
    write_rows(out / "kernel.csv", krows)
    write_rows(out / "kernel_summary.csv", ksum)
    summary["kernel"] = ksum
    summary["kernel_seconds"] = time.perf_counter() - t0
    log("")
    log(f"(b) measured kernel relative to Delta = 0, q, k ~ N(0, I_{cfg.d}), {cfg.draws} draws per row (a fresh "
        f"FAVOR+ projection every 16), base {cfg.base:g}: mean |ratio| (median |ratio|) [mean signed ratio]")
    at_k = [t for t in at if t > 0]
    log("| content | kernel | " + " | ".join(f"Delta={t}" for t in at_k) + " |")
    log("|---|---|" + "---|" * len(at_k))
    for row in ksum:
        log(f"| {row['content']} | {row['kernel']} | " + " | ".join(
            f"{row[f'mean_abs@{t}']:.3f} ({row[f'median_abs@{t}']:.3f}) [{row[f'mean@{t}']:+.3f}]" for t in at_k)
            + " |")
    plot_bound(brows, out / "bound.png")
    plot_kernel(curves, deltas, brows, out / "kernel.png", cfg)

    # (c) trained models
    if not cfg.skip_models:
        log("")
        mc0, tc0 = _train_configs(cfg, cfg.variants[0], cfg.seeds[0])
        log(f"(c) byte LMs, the quick preset's model ({mc0.n_layer} layers, dim {mc0.dim}, {mc0.heads} heads, "
            f"r = {mc0.nb_features}), N = {cfg.length}, batch {tc0.batch_size}, {cfg.steps} steps, lr {tc0.lr:g}, "
            f"seeds {list(cfg.seeds)}; weights measured in float64 on {cfg.eval_windows} held-out windows")
        corpus = load_corpus(None)
        task = LMTask(corpus, cfg.length, eval_windows=cfg.eval_windows)
        x_val, _ = task.val_batch()
        prow, trows, models, rsums = [], [], [], []
        profiles = {}
        for variant in cfg.variants:
            for seed in cfg.seeds:
                mc, tc = _train_configs(cfg, variant, seed)
                torch.manual_seed(seed)  # the init train() starts from
                init = measure_model(ByteLM(mc), x_val)
                model, result = train(mc, tc, task, out / "runs" / f"{variant}_s{seed}", resume=cfg.resume,
                                      progress=cfg.progress, desc=f"{variant} s{seed}")
                trained = measure_model(model, x_val)
                bpb = (result["val"] or {}).get("bpb")
                models.append({"variant": variant, "seed": seed, "steps": result["step"], "val_bpb": bpb,
                               "s_per_step": round(result["s_per_step"], 3)})
                log(f"  {variant} seed {seed}: val {bpb:.3f} bpb after {result['step']} steps, "
                    f"{result['s_per_step']:.2f} s/step")
                for stage, layers in (("init", init), ("trained", trained)):
                    for layer, sums in [(str(i), s) for i, s in enumerate(layers)] + [("all", _all_layers(layers))]:
                        tags = {"variant": variant, "seed": seed, "stage": stage, "layer": layer}
                        profiles[(variant, seed, stage, layer)] = sums
                        means = profile_means(sums)
                        prow += [{**tags, "delta": t, **{k: float(f"{float(v[t]):.6g}") for k, v in means.items()},
                                  "count": int(sums["count"][t])} for t in range(len(sums["count"]))]
                        trows += _row_bins(sums, tags)
                        rsums.append({**tags, **{f"row_sum_{k}": round(v, 4) for k, v in row_sums(sums).items()}})
        write_rows(out / "profiles.csv", prow)
        write_rows(out / "trained_summary.csv", trows)
        write_rows(out / "models.csv", models)
        write_rows(out / "row_sums.csv", rsums)
        summary["models"] = models
        summary["row_sums"] = [r for r in rsums if r["layer"] == "all"]
        summary["trained"] = [r for r in trows if r["layer"] == "all"]
        log("")
        log("mean weight by distance Delta = m - n, all layers, heads, rows (bins of Delta; |a| (m+1) is the weight "
            "relative to uniform attention): trained [init]")
        names = [b[0] for b in REPORT_BINS if b[2] < cfg.length]
        for key, what in (("rel_abs", "mean |a| (m+1)"), ("rel", "mean signed a (m+1)"), ("mean_abs", "mean |a|")):
            log("")
            log(f"{what}:")
            log("| variant | seed | " + " | ".join(f"Delta {n}" for n in names) + " |")
            log("|---|---|" + "---|" * len(names))
            for variant in cfg.variants:
                for seed in cfg.seeds:
                    cells = []
                    for n in names:
                        tr, ini = (next(r for r in trows if r["variant"] == variant and r["seed"] == seed
                                        and r["stage"] == st and r["layer"] == "all" and r["bin"] == n)
                                   for st in ("trained", "init"))
                        cells.append(f"{tr[key]:.3g} [{ini[key]:.3g}]")
                    log(f"| {variant} | {seed} | " + " | ".join(cells) + " |")
        log("")
        log("row sums, mean over rows of sum_n a_mn and of sum_n |a_mn| (all layers): trained [init]")
        log("| variant | seed | sum a | sum |a| |")
        log("|---|---|---|---|")
        for variant in cfg.variants:
            for seed in cfg.seeds:
                tr, ini = (next(r for r in rsums if r["variant"] == variant and r["seed"] == seed and r["stage"] == st
                                and r["layer"] == "all") for st in ("trained", "init"))
                log(f"| {variant} | {seed} | {tr['row_sum_signed']:.3f} [{ini['row_sum_signed']:.3f}] | "
                    f"{tr['row_sum_abs']:.3f} [{ini['row_sum_abs']:.3f}] |")
        plot_trained(profiles, out / "trained.png", cfg)
    summary["seconds"] = time.perf_counter() - t_start
    log("")
    log(f"total {summary['seconds']:.0f} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "stdout.txt").write_text("\n".join(lines) + "\n")
    return summary


# ================================================================================================== figures
def plot_bound(rows: list[dict], path: Path) -> None:
    """Left: the relative upper bound against Delta = 0..256 (linear axes, as the paper's Fig. 2); right: divided
    by its value at Delta = 0, log distance up to the largest Delta."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = ["-", "--", "-"]
    for i, design in enumerate(dict.fromkeys(r["design"] for r in rows)):
        rs = [r for r in rows if r["design"] == design]
        x = np.array([r["delta"] for r in rs])
        for ax, key, sel in ((axes[0], "bound", x <= 256), (axes[1], "bound_rel", x >= 1)):
            ax.plot(x[sel], np.array([r[key] for r in rs])[sel], styles[i % 3], lw=1.1 if i else 2.2,
                    color=plt.get_cmap("tab10")(i), label=f"{design}, {rs[0]['pairs']} pairs")
    axes[0].set_xlabel("relative distance")
    axes[0].set_ylabel("relative upper bound (1/P) sum_i |S_i|")
    axes[0].set_title("RoFormer Fig. 2: the bound (r = 64 coincides with d = 64)", fontsize=10)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("relative distance (log)")
    axes[1].set_ylabel("bound / bound at distance 0")
    axes[1].set_title("relative to distance 0", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_kernel(curves: dict, deltas, brows: list[dict], path: Path, cfg: LongtermConfig) -> None:
    """Mean |ratio| (top) and median |ratio| (bottom) against Delta (log-log) for each kernel, independent (left)
    and aligned (right) content; the bound relative to Delta = 0 (d = 64) in gray for reference."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(14, 10), sharey=True)
    x = np.asarray(deltas)
    sel = x >= 1
    brel = {r["delta"]: r["bound_rel"] for r in brows if r["pairs"] == cfg.d // 2 and r["design"].startswith("RoPE")}
    names = list(dict.fromkeys(n for _, n in curves))
    for row, (stat, what_stat) in enumerate((("mean_abs", "mean"), ("median_abs", "median"))):
        for ax, content in zip(axes[row], ("independent", "aligned")):
            for i, name in enumerate(names):
                s = curves.get((content, name))
                if s is None:
                    continue
                ls = "-" if name.startswith("eq. 19") else ("--" if "FAVOR" in name else ":")
                ax.plot(x[sel], s[stat].numpy()[sel], ls, color=plt.get_cmap("tab10")(i), lw=1.6, label=name)
            ax.plot(x[sel], [brel[int(t)] for t in x[sel]], "-", color="0.6", lw=0.8,
                    label=f"paper's bound / its value at 0 (d={cfg.d})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_xlabel("distance Delta (query at Delta, key at 0)")
            what = "q, k independent, N(0, I)" if content == "independent" else "k = q ~ N(0, I) (aligned)"
            ax.set_title(f"{what}: {what_stat} over {cfg.draws} draws of |weight(Delta) / weight(0)|", fontsize=10)
        axes[row, 0].set_ylabel(f"{what_stat} |K(Delta) / K(0)|")
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_bins(n: int) -> list[tuple[int, int]]:
    """Distances 0..15 one by one, then log-spaced bins up to n - 1."""
    edges = [0] + sorted(set(np.geomspace(16, n, 24).astype(int).tolist()))
    bins = [(t, t) for t in range(min(16, n))]
    bins += [(lo, min(hi, n) - 1) for lo, hi in zip(edges[1:-1], edges[2:]) if lo < n]
    return bins


def plot_trained(profiles: dict, path: Path, cfg: LongtermConfig) -> None:
    """Trained models (solid) and the same models at init (dotted), all layers, seed cfg.seeds[0]: mean |a| (top
    left), mean |a| (m+1) (top right), mean signed a (m+1) (bottom left), and mean |a| (m+1) per layer of
    trained models (bottom right). Distances in log bins (0..15 one by one)."""
    plt = pyplot()
    seed = cfg.seeds[0]
    bins = _log_bins(cfg.length)
    xs = np.array([max((lo + hi) / 2, 0.5) for lo, hi in bins])
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    panels = ((axes[0, 0], "mean_abs", "mean |a_mn| (raw)", "log"),
              (axes[0, 1], "rel_abs", "mean |a_mn| (m+1): relative to uniform", "log"),
              (axes[1, 0], "rel", "mean signed a_mn (m+1)", "symlog"))
    for i, variant in enumerate(cfg.variants):
        col = plt.get_cmap("tab10")(i)
        for stage, ls in (("trained", "-"), ("init", ":")):
            sums = profiles.get((variant, seed, stage, "all"))
            if sums is None:
                continue
            vals = [binned(sums, lo, hi) for lo, hi in bins]
            for ax, key, _, _ in panels:
                ax.plot(xs, [v[key] for v in vals], ls, color=col, lw=1.6 if stage == "trained" else 1.0,
                        label=f"{variant} ({stage})")
        for layer, mk in zip(range(8), "os^vD<>p"):
            sums = profiles.get((variant, seed, "trained", str(layer)))
            if sums is None:
                continue
            axes[1, 1].plot(xs, [binned(sums, lo, hi)["rel_abs"] for lo, hi in bins], "-", marker=mk, ms=3,
                            color=col, lw=0.9, label=f"{variant}, layer {layer}")
    for ax, _, title, yscale in panels + ((axes[1, 1], None, "mean |a_mn| (m+1) per layer (trained)", "log"),):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale(yscale, **({"linthresh": 0.1} if yscale == "symlog" else {}))
        if yscale == "symlog":
            ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("distance m - n")
        ax.set_title(title, fontsize=10)
    axes[0, 1].axhline(1, color="k", lw=0.6, ls="--")
    axes[0, 0].legend(fontsize=7)
    axes[1, 1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"byte LMs ({cfg.steps} steps, seed {seed}, N = {cfg.length}): attention weight against distance "
                 f"on {cfg.eval_windows} held-out windows, mean over layers, heads and rows", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
