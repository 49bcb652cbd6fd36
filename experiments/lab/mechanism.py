"""Why RoPE on positive features (eq. 19) selects positions weakly: the kernel it can express, and what one
attention layer learns with it (``experiments/mechanism.py``; results in experiments/results/mechanism*/).

Kernel: with content-free queries and keys (the same q, k at every position), eq. 19 weighs a key at distance
Delta = m - n by K(Delta) = Re sum_i c_i e^{i theta_i Delta}, c_i = z_q,i conj(z_k,i) over the feature pairs
z_i = phi_2i + i phi_2i+1 (``kernel_from_attention`` checks it against ``linear_attention``). Positive features
confine arg c_i to [-pi/2, pi/2] (Re c_i >= 0); pairing each feature with a copy of itself makes c real, so
K(Delta) <= K(0) (``copy_pairing_check``).

Part (a), capacity: the best selectivity SNR = K(target)^2 / sum_(Delta != target) K(Delta)^2 over the N distances,
for a frequency design (``DESIGNS``, optionally with a decay gamma^Delta) and a cone of c (``CONES``: 'positive',
'free' for any phase, 'copy'). It is a cone-constrained least-squares problem (``cone_lstsq``: NNLS extended to
free variables, checked against projected gradient and the KKT conditions). RoPE's low frequencies make the
problem nearly singular, so it carries a ridge term (stated, with each solution's cancellation) instead of
optima that only huge cancelling coefficients reach, which float32 features cannot represent.

Parts (b) and (c), toys (``OneLayerToy``): one causal attention head of a variant of the lab's one registry
(``ATTENTIONS``, the toys' view of ``lab.models.ALL_VARIANTS``) and a linear readout, nothing else. In 'lookback'
(copy the token ``distance`` back) q and k are learned content-free vectors, so only the positional mechanism
can find the target; in 'pair-recall' they come from token embeddings. The toys' own variants: eq. 19 with copy
pairing, with learned frequencies or phases alone, and the kernel alone ('linear-rope-c': c learned directly;
'linear-rope-optimum': fixed at part (a)'s optimum). A decay variant decays by the toy's ``gamma``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.functional import favor_attention, linear_attention, softmax_attention
from linrope.rotary import LearnedRotary, RotaryEmbedding

from .data import IGNORE, lookback, pair_recall
from .models import TOY_VARIANTS
from .plots import finite_stats, pyplot, write_rows
from .profiling import cpu_name as _profiling_cpu_name

__all__ = [
    "CONES", "rope_frequencies", "linear_frequencies", "Design", "DESIGNS", "design_matrix", "kernel", "cone_lstsq",
    "cone_lstsq_pgd", "snr_of", "best_selectivity", "capacity_table", "peak_reach", "kernel_from_attention",
    "copy_pairing_check", "ATTENTIONS", "POSITIONAL_ONLY", "ToyAttention", "OneLayerToy",
    "ToyConfig", "train_toy", "parse_spec", "run_toys", "toy_summary", "cpu_name", "MechanismConfig", "run",
]

CONES = ("positive", "free", "copy")


# ============================================================================================ part (a): capacity
def rope_frequencies(r: int, base: float = 10000.0) -> np.ndarray:
    """theta_i = base^(-2i/r), i = 0 .. r/2-1: ``RotaryEmbedding(r, base)``'s frequencies."""
    return base ** (-np.arange(0, r, 2, dtype=np.float64) / r)


def linear_frequencies(r: int, period: float = 128.0) -> np.ndarray:
    """theta_k = 2 pi k / period, k = 1 .. r/2 (evenly spaced, no zero frequency, like RoPE)."""
    return 2 * math.pi * np.arange(1, r // 2 + 1, dtype=np.float64) / period


@dataclass(frozen=True)
class Design:
    """A frequency design: ``theta(r)`` gives the r/2 frequencies, ``gamma`` the decay per unit distance."""

    about: str
    theta: object
    gamma: float = 1.0


DESIGNS: dict[str, Design] = {
    "base 10000": Design("RoPE frequencies base^(-2i/r), base 10000", lambda r: rope_frequencies(r, 10000.0)),
    "base 84": Design("RoPE frequencies at base 84", lambda r: rope_frequencies(r, 84.0)),
    "linear 2pi k/128": Design("theta_k = 2 pi k / 128, k = 1..r/2", linear_frequencies),
    "decay 0.95": Design("base 10000 with gamma^Delta on numerator and normalizer, gamma 0.95",
                         lambda r: rope_frequencies(r, 10000.0), 0.95),
    "decay 0.9": Design("base 10000 with gamma^Delta, gamma 0.9", lambda r: rope_frequencies(r, 10000.0), 0.9),
}


def design_matrix(theta: np.ndarray, n: int = 64, gamma: float = 1.0) -> np.ndarray:
    """A (n, r): row Delta = gamma^Delta [cos(theta_i Delta) for i | -sin(theta_i Delta) for i], so that A @ (a, b) is
    K(Delta) = Re sum_i (a_i + i b_i) e^{i theta_i Delta} (times the decay)."""
    d = np.arange(n, dtype=np.float64)[:, None]
    t = np.asarray(theta, dtype=np.float64)[None, :]
    return np.hstack([np.cos(t * d), -np.sin(t * d)]) * (gamma ** d)


def kernel(c: np.ndarray, theta: np.ndarray, n: int = 64, gamma: float = 1.0) -> np.ndarray:
    """K(Delta) = gamma^Delta Re sum_i c_i e^{i theta_i Delta} for Delta = 0..n-1 (c complex, one per pair)."""
    d = np.arange(n, dtype=np.float64)[:, None]
    return (np.asarray(c)[None, :] * np.exp(1j * np.asarray(theta)[None, :] * d)).real.sum(1) * gamma ** d[:, 0]


def cone_lstsq(A: np.ndarray, t: np.ndarray, nonneg: np.ndarray, *, ridge: float = 0.0, max_iter: int | None = None
               ) -> tuple[np.ndarray, dict]:
    """min ||A x - t||^2 + ridge ||x||^2 subject to x_j >= 0 where ``nonneg[j]``, other x_j free.

    Lawson-Hanson active-set NNLS (1974), with the free variables kept in the passive set from the start; the
    ridge term enters as sqrt(ridge) I rows appended to A. float64. Returns x and ``info``: iterations and the
    KKT residual (largest violation of: gradient 0 on free and positive variables, >= 0 on variables at 0,
    x >= 0), relative to ||A^T t||.
    """
    A = np.asarray(A, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    nonneg = np.asarray(nonneg, dtype=bool)
    m, n = A.shape
    if ridge > 0:
        A = np.vstack([A, math.sqrt(ridge) * np.eye(n)])
        t = np.concatenate([t, np.zeros(n)])
    max_iter = max_iter or 30 * n
    scale = max(np.abs(A.T @ t).max(), 1e-300)
    tol = 1e-12 * scale

    def solve(P):
        z = np.zeros(n)
        if P.any():
            z[P] = np.linalg.lstsq(A[:, P], t, rcond=None)[0]
        return z

    P = ~nonneg.copy()
    x = solve(P)
    it = 0
    while it < max_iter:
        w = A.T @ (t - A @ x)  # minus half the gradient
        cand = nonneg & ~P & (w > tol)
        if not cand.any():
            break
        j = np.flatnonzero(cand)[np.argmax(w[cand])]
        P[j] = True
        while it < max_iter:
            it += 1
            z = solve(P)
            bad = P & nonneg & (z <= 0)
            if not bad.any():
                x = z
                break
            alpha = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + alpha * (z - x)
            drop = P & nonneg & (x <= 1e-15 * max(np.abs(x).max(), 1e-300))
            P[drop] = False
            x[drop] = 0.0
    g = A.T @ (A @ x - t)  # half the gradient
    active = nonneg & (x <= 0)
    viol = np.concatenate([np.abs(g[~active]), np.maximum(-g[active], 0), np.maximum(-x[nonneg], 0) * scale])
    return x, {"iterations": it, "kkt": float(viol.max() / scale) if viol.size else 0.0}


def cone_lstsq_pgd(A: np.ndarray, t: np.ndarray, nonneg: np.ndarray, *, ridge: float = 0.0, steps: int = 20000
                   ) -> np.ndarray:
    """The same problem as ``cone_lstsq`` by accelerated projected gradient (FISTA with restarts): an independent
    check of the active-set solver (slow to converge when A is ill-conditioned and ridge is small)."""
    A = np.asarray(A, dtype=np.float64)
    nonneg = np.asarray(nonneg, dtype=bool)
    H = A.T @ A + ridge * np.eye(A.shape[1])
    b = A.T @ np.asarray(t, dtype=np.float64)
    L = np.linalg.eigvalsh(H).max()
    x = y = np.zeros(A.shape[1])
    k = 1.0
    f_old = math.inf
    for _ in range(steps):
        x_new = y - (H @ y - b) / L
        x_new[nonneg] = np.maximum(x_new[nonneg], 0)
        f = 0.5 * x_new @ H @ x_new - b @ x_new
        if f > f_old:  # restart the momentum
            k, y = 1.0, x
            continue
        k_new = (1 + math.sqrt(1 + 4 * k * k)) / 2
        y = x_new + (k - 1) / k_new * (x_new - x)
        x, k, f_old = x_new, k_new, f
    return x


def _cone(cone: str, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns kept, nonneg mask over them) of x = (a, b) for a cone of ``CONES``."""
    h = r // 2
    if cone == "positive":
        return np.arange(r), np.r_[np.ones(h, bool), np.zeros(h, bool)]
    if cone == "free":
        return np.arange(r), np.zeros(r, bool)
    if cone == "copy":
        return np.arange(h), np.ones(h, bool)
    raise ValueError(f"cone: expected one of {CONES}, got {cone!r}")


def snr_of(y: np.ndarray, target: int) -> float:
    """y_target^2 / sum_{Delta != target} y_Delta^2 (0 when y_target = 0, inf when only the rest is 0 to float64
    rounding)."""
    rest = float((y ** 2).sum() - y[target] ** 2)
    sig = float(y[target] ** 2)
    if sig == 0:  # (also when the cone's best fit is K = 0)
        return 0.0
    return math.inf if rest <= 1e-24 * max(sig, 1e-300) else sig / rest


def best_selectivity(theta: np.ndarray, *, n: int = 64, target: int = 8, cone: str = "positive", gamma: float = 1.0,
                     ridge: float = 1e-4, solver: str = "lh") -> dict:
    """The best SNR of ``target`` among distances 0..n-1 over the cone (see the module docstring).

    Returns a dict: ``snr`` (the better sign), ``snr_peak`` (K(target) > 0 required), ``snr_trough`` (K(target) < 0),
    ``sign`` (of K(target) in the best solution), ``c`` (complex, r/2), ``K`` (n,),
    ``cancellation`` (sum |x| / |K(target)|), ``kkt`` and ``iterations`` of the solver (``'lh'``, or ``'pgd'``).
    """
    theta = np.asarray(theta, dtype=np.float64)
    r = 2 * theta.size
    A = design_matrix(theta, n, gamma)
    cols, nonneg = _cone(cone, r)
    best, by_sign = None, {}
    for sign in (1.0, -1.0):
        t = np.zeros(n)
        t[target] = sign
        if solver == "lh":
            xs, info = cone_lstsq(A[:, cols], t, nonneg, ridge=ridge)
        elif solver == "pgd":
            xs, info = cone_lstsq_pgd(A[:, cols], t, nonneg, ridge=ridge), {"iterations": None, "kkt": None}
        else:
            raise ValueError(f"solver: expected 'lh' or 'pgd', got {solver!r}")
        x = np.zeros(r)
        x[cols] = xs
        y = A @ x
        s = snr_of(y, target)
        by_sign[int(sign)] = s
        if best is None or s > best["snr"]:
            c = x[: r // 2] + 1j * x[r // 2:]
            best = {"snr": s, "sign": int(sign), "c": c, "K": y, "kkt": info["kkt"], "iterations": info["iterations"],
                    "cancellation": float(np.abs(x).sum() / max(abs(y[target]), 1e-300))}
    best["snr_peak"], best["snr_trough"] = by_sign[1], by_sign[-1]
    return best


def peak_reach(theta: np.ndarray, target: int = 8) -> np.ndarray:
    """Per pair: can a single pair with arg c in [-pi/2, pi/2] peak at ``target``? True where theta_i * target mod
    2 pi lies within +-pi/2 (its kernel |c| cos(theta_i Delta + arg c) then reaches |c| at Delta = target)."""
    ang = np.mod(np.asarray(theta) * target + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi)
    return np.abs(ang) <= math.pi / 2


def capacity_table(*, rs=(32, 64, 128), n: int = 64, target: int = 8, ridges=(1e-4, 0.0),
                   designs: dict[str, Design] | None = None, check_pgd: bool = True) -> list[dict]:
    """One row per (design, r, cone, ridge): the best SNR and the solution's sign, cancellation, KKT residual; with
    ``check_pgd`` the first ridge's rows also carry the SNR projected gradient finds (``snr_pgd``)."""
    rows = []
    for name, des in (designs or DESIGNS).items():
        for r in rs:
            theta = des.theta(r)
            for cone in CONES:
                for ridge in ridges:
                    b = best_selectivity(theta, n=n, target=target, cone=cone, gamma=des.gamma, ridge=ridge)
                    row = {"design": name, "r": r, "cone": cone, "ridge": ridge, "n": n, "target": target,
                           "gamma": des.gamma, "snr": b["snr"], "sign": b["sign"], "snr_peak": b["snr_peak"],
                           "snr_trough": b["snr_trough"],
                           "K_target_over_max_other": float(abs(b["K"][target])
                                                            / max(np.abs(np.delete(b["K"], target)).max(), 1e-300)),
                           "cancellation": b["cancellation"], "kkt": b["kkt"], "iterations": b["iterations"]}
                    if check_pgd and ridge == ridges[0] and ridge > 0:
                        row["snr_pgd"] = best_selectivity(theta, n=n, target=target, cone=cone, gamma=des.gamma,
                                                          ridge=ridge, solver="pgd")["snr"]
                    rows.append(row)
    return rows


def kernel_from_attention(qf: Tensor, kf: Tensor, rotary: RotaryEmbedding | None, n: int = 64) -> Tensor:
    """Eq. 19 weights of the last query over distances 0..n-1, times its normalizer, read from
    ``linrope.functional.linear_attention`` with one-hot values: the measured K(Delta).

    qf, kf: (r,) positive features, used at every position (content-free). float64.
    """
    q = qf.to(torch.float64).expand(1, 1, n, -1)
    k = kf.to(torch.float64).expand(1, 1, n, -1)
    v = torch.eye(n, dtype=torch.float64)[None, None]  # value n = e_n: output row m = the weights over keys
    w = linear_attention(q, k, v, causal=True, rotary=rotary)[0, 0, -1]  # (n,) over key positions 0..n-1
    den = n * (qf.to(torch.float64) * kf.to(torch.float64)).sum()  # unrotated normalizer of the last row
    return (w * den).flip(0)  # index Delta = (n - 1) - key position


def trained_frequencies(runs, *, n: int = 64, target: int = 8) -> list[dict]:
    """What learned rotations learned: for every checkpoint under ``runs`` (a directory searched for ``ckpt.pt``)
    whose layers learn their frequencies (``LearnedRotary``), one row per layer and head with

    * ``live_init`` / ``live``: the pairs whose frequency turns by at least a radian over ``n`` positions
      (|theta| n >= 1) at initialisation and after training: at RoPE's base 10000 the lower half of the pairs
      barely turn over a short sequence and carry no position;
    * ``snr_init`` / ``snr``: the best selectivity of distance ``target`` these frequencies allow, with the
      head's decay and any phase (a learned phase frees arg c; ``best_selectivity``, ridge 1e-4).

    and the run's final validation accuracy (``accuracy``, from its metrics) to set them against."""
    from .train import load_model, read_metrics  # the training harness is needed only here
    rows, runs = [], Path(runs)
    live = lambda theta: int((np.abs(theta) * n >= 1).sum())  # noqa: E731
    snr = lambda theta, g: best_selectivity(theta, n=n, target=target, cone="free", gamma=g)["snr"]  # noqa: E731
    snr_init: dict = {}  # (base, r, gamma) -> the initial frequencies' selectivity, the same for many heads
    for path in sorted(runs.rglob("ckpt.pt")):
        model, ckpt = load_model(path)
        layers = [b.attn for b in model.blocks if isinstance(getattr(b.attn, "rotary", None), LearnedRotary)]
        if not layers:
            continue
        vals = [m["accuracy"] for m in read_metrics(path.parent) if m.get("split") == "val" and "accuracy" in m]
        base, r = ckpt["model_config"].get("rope_base", 10000.0), layers[0].rotary.dim
        init = RotaryEmbedding(r, base).frequencies().double().numpy()
        for i, attn in enumerate(layers):
            for h, gamma in enumerate(attn.decay or (1.0,) * attn.heads):
                theta = attn.rotary.theta[h].detach().double().numpy()
                if (base, r, gamma) not in snr_init:
                    snr_init[base, r, gamma] = snr(init, gamma)
                rows.append({"run": str(path.parent.relative_to(runs)), "layer": i, "head": h, "gamma": gamma,
                             "live_init": live(init), "live": live(theta), "pairs": theta.size,
                             "snr_init": snr_init[base, r, gamma], "snr": snr(theta, gamma),
                             "accuracy": vals[-1] if vals else math.nan})
    if not rows:
        raise ValueError(f"runs: no checkpoint with learned rotations under {runs}")
    return rows


def trained_frequencies_markdown(rows: list[dict]) -> str:
    """One line per run: live pairs and selectivity (mean over layers and heads), initial -> trained, and the
    run's accuracy; runs in order of accuracy."""
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    lines = ["| run | live pairs (turning >= 1 rad over N), init -> trained | best SNR, init -> trained | accuracy |",
             "|---|---:|---:|---:|"]
    for name, rs in sorted(runs.items(), key=lambda kv: kv[1][0]["accuracy"]):
        m = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        lines.append(f"| {name} | {m('live_init'):.1f} -> {m('live'):.1f} of {rs[0]['pairs']} | "
                     f"{m('snr_init'):.2f} -> {m('snr'):.2f} | {rs[0]['accuracy']:.3f} |")
    return "\n".join(lines)


def copy_pairing_check(*, draws: int = 200, r: int = 32, d: int = 16, n: int = 64, scale: float = 2.0,
                       seed: int = 0) -> dict:
    """Through the library: for random content-free q, k and a FAVOR+ projection, compare the eq. 19 kernel of the
    last query with plain features and with copy pairing (each of r/2 features paired with itself).

    Returns the largest (K(Delta) - K(0)) / K(0) over Delta > 0 and draws for each, and the fraction of draws whose
    kernel peaks away from Delta = 0. Copy pairing must give <= 0 (to rounding) and fraction 0.
    """
    g = torch.Generator().manual_seed(seed)
    rot = RotaryEmbedding(r)
    worst = {"plain": -math.inf, "copy": -math.inf}
    away = {"plain": 0, "copy": 0}
    for _ in range(draws):
        q = torch.randn(d, generator=g, dtype=torch.float64) * scale
        k = torch.randn(d, generator=g, dtype=torch.float64) * scale
        W = gaussian_orthogonal_matrix(r, d, generator=g)
        feats = {"plain": (favor_plus(q, W, is_query=True)[0], favor_plus(k, W, is_query=False)[0])}
        fq, fk = favor_plus(q, W[: r // 2], is_query=True)[0], favor_plus(k, W[: r // 2], is_query=False)[0]
        feats["copy"] = (fq.repeat_interleave(2), fk.repeat_interleave(2))
        for name, (a, b) in feats.items():
            K = kernel_from_attention(a, b, rot, n)
            rel = float(((K[1:] - K[0]) / K[0]).max())
            worst[name] = max(worst[name], rel)
            away[name] += int(rel > 1e-9)
    return {"draws": draws, "r": r, "d": d, "n": n, "max_rel_excess_plain": worst["plain"],
            "max_rel_excess_copy": worst["copy"], "frac_peak_away_plain": away["plain"] / draws,
            "frac_peak_away_copy": away["copy"] / draws}


# ============================================================================================ part (b): the toys
ATTENTIONS = TOY_VARIANTS  # the variants a one-head toy builds, from the one registry (``lab.models``)
POSITIONAL_ONLY = tuple(name for name, v in ATTENTIONS.items() if v.kernel)  # kernels of the distance alone


class ToyAttention(nn.Module):
    """One causal attention head of kind ``name`` (``ATTENTIONS``): forward(q, k, v) with (B, 1, N, d|dv)."""

    def __init__(self, name: str, d: int, r: int, *, seed: int, base: float = 10000.0, n: int = 64, target: int = 8,
                 ridge: float = 1e-4, gamma: float = 0.9):
        super().__init__()
        if name not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {sorted(ATTENTIONS)}, got {name!r}")
        self.name, self.variant = name, ATTENTIONS[name]
        self.gamma = gamma if self.variant.decay is not None else None  # one head: the toy's gamma, not multiscale
        if self.variant.kernel == "optimum":  # K(Delta) of the best c (base ``base``, r features), fixed
            best = best_selectivity(rope_frequencies(r, base), n=n, target=target, cone="positive", ridge=ridge)
            self.register_buffer("kernel", torch.tensor(best["K"] / abs(best["K"][target]), dtype=torch.float32))
        if self.variant.kernel == "learned":  # c_i = softplus(alpha_i) + i beta_i: the whole cone Re c > 0
            self.alpha = nn.Parameter(torch.randn(r // 2))
            self.beta = nn.Parameter(torch.randn(r // 2))
            self.register_buffer("theta", torch.tensor(rope_frequencies(r, base), dtype=torch.float32))
        g = torch.Generator().manual_seed(seed)
        rows = r // 2 if self.variant.copy_pairs else r
        self.register_buffer("projection", gaussian_orthogonal_matrix(rows, d, generator=g).float())
        self.rotary_d = RotaryEmbedding(d, base)
        self.rotary_r = RotaryEmbedding(r, base)
        self.learned = None
        if self.variant.rope_learned:
            self.learned = LearnedRotary(r, 1, base, learn_theta=self.variant.learn_theta,
                                         learn_phase=self.variant.learn_phase)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        var = self.variant
        if var.kernel:  # content-free eq. 19: weight K(m - n) / ((m + 1) sum_i Re c_i)
            N = q.shape[-2]
            if var.kernel == "learned":
                a = F.softplus(self.alpha)
                ang = torch.arange(N, dtype=torch.float32)[:, None] * self.theta
                K = (a * ang.cos() - self.beta * ang.sin()).sum(-1) / a.sum()  # (N,) over Delta
            else:  # the normalizer's sum_i Re c_i is one constant here: the readout absorbs it
                K = self.kernel[:N]
            delta = torch.arange(N)[:, None] - torch.arange(N)[None, :]
            w = torch.where(delta >= 0, K[delta.clamp(0, N - 1)], 0) / torch.arange(1, N + 1)[:, None]
            return w.to(v.dtype) @ v
        if var.kind == "softmax":
            return softmax_attention(q, k, v, causal=True, rotary=self.rotary_d if var.rope == "inputs" else None)
        if var.rope == "inputs":
            q, k = self.rotary_d.rotate(q), self.rotary_d.rotate(k)
        if not (var.copy_pairs or var.rope_learned):
            rot = self.rotary_r if var.rope == "features" else None
            return favor_attention(q, k, v, self.projection, causal=True, rotary=rot, decay=self.gamma)
        qf, _ = favor_plus(q, self.projection, is_query=True)
        kf, ks = favor_plus(k, self.projection, is_query=False)
        if var.copy_pairs:
            qf, kf = qf.repeat_interleave(2, -1), kf.repeat_interleave(2, -1)
        rot = self.rotary_r if var.copy_pairs else self.learned
        return linear_attention(qf, kf, v, causal=True, rotary=rot, k_logscale=ks, decay=self.gamma)


@dataclass
class ToyConfig:
    """A one-layer toy: ``task`` 'lookback' (content-free q, k) or 'pair-recall' (q, k from token embeddings)."""

    attention: str = "linear-rope"
    task: str = "lookback"
    length: int = 64
    distance: int = 8          # lookback
    symbols: int = 16          # lookback: alphabet (chance 1/symbols)
    num_pairs: int = 8         # pair-recall
    d: int = 32                # query/key size
    dv: int = 32               # value size
    r: int = 64                # random features (eq. 19 rotates r/2 pairs)
    base: float = 10000.0
    ridge: float = 1e-4        # 'linear-rope-optimum': the ridge of its selectivity problem
    gamma: float = 0.9         # '*-decay': the decay per position
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 20
    steps: int = 1000
    eval_at: tuple = (100, 200, 300, 500, 700, 1000)
    eval_sequences: int = 256
    seed: int = 0

    @property
    def vocab(self) -> int:
        return self.symbols if self.task == "lookback" else 256

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.task == "lookback":
            return lookback(batch_size, self.length, self.distance, generator, symbols=self.symbols)
        if self.task == "pair-recall":
            return pair_recall(batch_size, self.length, self.num_pairs, generator)
        raise ValueError(f"task: expected 'lookback' or 'pair-recall', got {self.task!r}")


class OneLayerToy(nn.Module):
    """tokens (B, N) -> logits (B, N, vocab): one attention head and a linear readout, nothing else.

    'lookback': q = q0, k = k0 (learned, position- and content-free), v_n = E_v[x_n].
    'pair-recall': q_n, k_n, v_n = E_q[x_n], E_k[x_n], E_v[x_n].
    """

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.content_free = cfg.task == "lookback"
        if self.content_free:
            self.q0 = nn.Parameter(torch.randn(cfg.d))
            self.k0 = nn.Parameter(torch.randn(cfg.d))
        else:
            self.qk = nn.Embedding(cfg.vocab, 2 * cfg.d)
        self.values = nn.Embedding(cfg.vocab, cfg.dv)
        if cfg.attention in POSITIONAL_ONLY and not self.content_free:
            raise ValueError(f"attention: {cfg.attention!r} is a kernel of the distance alone (task 'lookback' only)")
        self.attn = ToyAttention(cfg.attention, cfg.d, cfg.r, seed=cfg.seed, base=cfg.base, n=cfg.length,
                                 target=cfg.distance, ridge=cfg.ridge, gamma=cfg.gamma)
        self.readout = nn.Linear(cfg.dv, cfg.vocab)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N = x.shape
        v = self.values(x)[:, None]  # (B, 1, N, dv)
        if self.content_free:
            q = self.q0.expand(B, 1, N, -1)
            k = self.k0.expand(B, 1, N, -1)
        else:
            q, k = self.qk(x)[:, None].chunk(2, -1)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x)
        return self.readout(self.attn(q, k, v)[:, 0])

    @torch.no_grad()
    def weights_last_row(self) -> np.ndarray:
        """Content-free toys: the attention weights of the last query over distances 0..N-1 (one-hot values)."""
        N = self.cfg.length
        x = torch.zeros(1, N, dtype=torch.long)
        q, k, _ = self.qkv(x)
        w = self.attn(q, k, torch.eye(N)[None, None])[0, 0, -1]
        return w.flip(0).double().numpy()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        pred = model(x).argmax(-1)
    keep = y != IGNORE
    return float((pred[keep] == y[keep]).float().mean())


def train_toy(cfg: ToyConfig) -> dict:
    """Train one toy with AdamW (constant lr after a linear warmup, so the accuracy at step s is that of an s-step
    run; gradient norm clipped at 1) and evaluate on ``eval_sequences`` fixed sequences at each of ``eval_at``.

    Returns {'config', 'curve': [(step, accuracy)], 'seconds', and for content-free toys 'weights' (the last
    query's attention over distances), 'snr_realized', plus 'theta' and 'phase' of learned rotations}.
    """
    torch.manual_seed(cfg.seed)
    model = OneLayerToy(cfg)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    xv, yv = cfg.batch(cfg.eval_sequences, torch.Generator().manual_seed(2**31 - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    curve = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
        x, y = cfg.batch(cfg.batch_size, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step in cfg.eval_at or step == cfg.steps:
            curve.append((step, _accuracy(model, xv, yv)))
    out = {"config": asdict(cfg), "curve": curve, "seconds": time.perf_counter() - t0}
    if model.content_free:
        w = model.weights_last_row()
        out["weights"] = w.tolist()
        out["snr_realized"] = snr_of(w, cfg.distance)
    if model.attn.learned is not None:
        out["theta"] = model.attn.learned.theta.detach()[0].tolist()
        out["phase"] = model.attn.learned.phase.detach()[0].tolist()
    return out


def parse_spec(spec: str) -> tuple[str, dict]:
    """'linear-rope' -> ('linear-rope', {}); 'linear-rope@r=32' -> ('linear-rope', {'r': 32}) (ToyConfig fields
    after '@', separated by ',' or '+' (the command line splits specs on ','): integers r, d, dv, steps,
    distance; gamma a float in (0, 1])."""
    name, _, rest = spec.partition("@")
    over = {}
    for item in filter(None, rest.replace("+", ",").split(",")):
        key, _, value = item.partition("=")
        if key == "gamma":
            try:
                over[key] = float(value)
            except ValueError:
                over[key] = -1.0
            if not 0 < over[key] <= 1:
                raise ValueError(f"attentions: cannot read {item!r} in {spec!r} (expected gamma= in (0, 1])")
            continue
        if key not in ("r", "d", "dv", "steps", "distance") or not value.isdigit():
            raise ValueError(f"attentions: cannot read {item!r} in {spec!r} (expected r=, d=, dv=, steps= or "
                             f"distance= an integer, or gamma= a float)")
        over[key] = int(value)
    if name not in ATTENTIONS:
        raise ValueError(f"attentions: expected names from {sorted(ATTENTIONS)}, got {name!r}")
    return name, over


def run_toys(specs, seeds, base_cfg: ToyConfig, *, progress=print) -> list[dict]:
    """``train_toy`` for every spec (``parse_spec``: an attention name, optionally '@r=32,steps=300') x seed."""
    results = []
    for spec in specs:
        name, over = parse_spec(spec)
        for seed in seeds:
            steps = over.get("steps", base_cfg.steps)
            cfg = ToyConfig(**{**asdict(base_cfg), **over, "attention": name, "seed": seed, "steps": steps,
                               "eval_at": tuple(s for s in base_cfg.eval_at if s <= steps)})
            res = train_toy(cfg)
            res["label"] = spec
            results.append(res)
            if progress:
                progress(f"  {cfg.task} {spec} seed {seed}: " + ", ".join(f"{s}:{a:.3f}" for s, a in res["curve"])
                         + f"  ({res['seconds']:.0f} s)")
    return results


def toy_summary(results: list[dict], at=(300, 1000)) -> list[dict]:
    """Per label (attention spec) and step in ``at``: mean, std, min, max of the accuracy over seeds, the number of
    seeds, the median realized SNR of the runs that ended at that step, and seconds per run."""
    rows = []
    for label in dict.fromkeys(r.get("label", r["config"]["attention"]) for r in results):
        runs = [r for r in results if r.get("label", r["config"]["attention"]) == label]
        for step in at:
            accs = [a for r in runs for s, a in r["curve"] if s == step]
            if not accs:
                continue
            c = runs[0]["config"]
            row = {"task": c["task"], "attention": label, "r": c["r"], "step": step, "seeds": len(accs),
                   **finite_stats(accs)}
            snrs = [r["snr_realized"] for r in runs if "snr_realized" in r and r["config"]["steps"] == step]
            if snrs:
                row["snr_realized_median"] = float(np.median(snrs))
            row["seconds_per_run"] = sum(r["seconds"] for r in runs) / len(runs)
            rows.append(row)
    return rows


# ============================================================================================ outputs
def cpu_name() -> str:
    """The CPU's model name (``lab.profiling.cpu_name`` without the count of logical CPUs)."""
    return _profiling_cpu_name(count=False)


def study_start(out: str, log) -> tuple:
    """The start of a one-thread study: (a log that also keeps every line, for ``stdout.txt``; those lines; the
    output folder, created; the CPU's name, logged; the start time)."""
    lines: list[str] = []

    def tee(msg):
        log(msg)
        lines.append(msg)

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    tee(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return tee, lines, out, cpu, t_start


def _fmt_snr(s: float) -> str:
    return "inf" if not math.isfinite(s) else (f"{s:.3g}" if s < 1e3 else f"{s:.1e}")


def capacity_markdown(rows: list[dict], ridge: float) -> str:
    sel = [r for r in rows if r["ridge"] == ridge]
    rs = sorted({r["r"] for r in sel})
    lines = ["| design | cone | " + " | ".join(f"r={r}: SNR (peak only)" for r in rs) + " | cancellation (r="
             + "/".join(map(str, rs)) + ") |", "|---|---|" + "---|" * (len(rs) + 1)]
    for design in dict.fromkeys(r["design"] for r in sel):
        for cone in CONES:
            cells = {r["r"]: r for r in sel if r["design"] == design and r["cone"] == cone}
            lines.append(f"| {design} | {cone} | " + " | ".join(
                f"{_fmt_snr(cells[r]['snr'])} ({_fmt_snr(cells[r]['snr_peak'])})" for r in rs) + " | "
                         + "/".join(f"{cells[r]['cancellation']:.0e}" for r in rs) + " |")
    return "\n".join(lines)


def toy_markdown(summary: list[dict]) -> str:
    lines = ["| task | attention | step | accuracy mean ± std | min – max | seeds | realized SNR (median) | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        snr = _fmt_snr(r["snr_realized_median"]) if "snr_realized_median" in r else ""
        lines.append(f"| {r['task']} | {r['attention']} | {r['step']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                     f"{r['min']:.3f} – {r['max']:.3f} | {r['seeds']} | {snr} | {r['seconds_per_run']:.0f} |")
    return "\n".join(lines)


def plot_capacity(path, *, rs=(32, 64, 128), n=64, target=8, ridge=1e-4) -> None:
    """One panel per design (and copy pairing): the optimal K(Delta) / |K(target)| for each r (positive cone,
    solid) and, for r = 32, the free-phase optimum (dashed)."""
    plt = pyplot()
    panels = [(name, des, "positive") for name, des in DESIGNS.items()] + [("copy pairing (base 10000)",
                                                                           DESIGNS["base 10000"], "copy")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    delta = np.arange(n)
    for ax, (name, des, cone) in zip(axes.flat, panels):
        for j, r in enumerate(rs):
            b = best_selectivity(des.theta(r), n=n, target=target, cone=cone, gamma=des.gamma, ridge=ridge)
            K = b["K"] / abs(b["K"][target])
            ax.plot(delta, K, "-", color=plt.get_cmap("tab10")(j), label=f"r={r}: SNR {_fmt_snr(b['snr'])}")
        if cone == "positive":
            b = best_selectivity(des.theta(rs[0]), n=n, target=target, cone="free", gamma=des.gamma, ridge=ridge)
            ax.plot(delta, b["K"] / abs(b["K"][target]), "--", color="gray",
                    label=f"r={rs[0]} free phase: SNR {_fmt_snr(b['snr'])}")
        ax.axvline(target, color="k", lw=0.5, ls=":")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-1.6, 1.6)
        ax.set_title(name + (f" (gamma {des.gamma})" if des.gamma != 1 and "decay" not in name else ""), fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("distance Delta")
    for ax in axes[:, 0]:
        ax.set_ylabel("optimal K(Delta) / |K(8)|")
    fig.suptitle(f"Most selective eq. 19 kernel for distance {target} among 0..{n - 1} (Re c >= 0: positive "
                 f"features; ridge {ridge:g}; the sign of K({target}) is free: a trough counts, a readout can flip it)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KERNEL_PANEL = ("softmax-rope", "linear-rope-inputs", "linear-rope", "linear-rope-copy", "linear-rope-learned",
                "linear-rope-c")


def _curves(ax, runs: list[dict], chance: float, title: str, cmap) -> None:
    """Accuracy against step per label: the mean over seeds, the band min..max."""
    label = lambda r: r.get("label", r["config"]["attention"])  # noqa: E731
    for j, name in enumerate(dict.fromkeys(label(r) for r in runs)):
        mine = [r for r in runs if label(r) == name]
        steps = sorted({s for r in mine for s, _ in r["curve"]})
        st = [finite_stats([a for r in mine for s, a in r["curve"] if s == step]) for step in steps]
        ax.plot(steps, [x["mean"] for x in st], "-o", ms=3, color=cmap(j), label=name)
        ax.fill_between(steps, [x["min"] for x in st], [x["max"] for x in st], color=cmap(j), alpha=0.15)
    ax.axhline(chance, color="k", ls=":", lw=0.8, label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=10)


def plot_toys(results: list[dict], path, *, chance: float, optimum: dict | None = None,
              recall_chance: float = 1 / 128) -> None:
    """Top left: copy-8-back accuracy of each attention at 300 and at the last step (seeds as dots, mean as a bar).
    Top right: accuracy against step (mean, band min-max). Bottom left: the trained last-query weights over distance
    (seed 0) of a few attentions, divided by w(8), with the optimum of the selectivity problem. Bottom right:
    the pair-recall toy against step."""
    plt = pyplot()
    cmap = plt.get_cmap("tab20")
    label = lambda r: r.get("label", r["config"]["attention"])  # noqa: E731
    lb = [r for r in results if r["config"]["task"] == "lookback"]
    rc = [r for r in results if r["config"]["task"] == "pair-recall"]
    names = list(dict.fromkeys(label(r) for r in lb))
    last = max((r["config"]["steps"] for r in lb), default=1000)
    fig, axes = plt.subplots(2, 2, figsize=(16, 11))
    ax = axes[0, 0]
    for j, name in enumerate(names):
        runs = [r for r in lb if label(r) == name]
        for k, (step, mk) in enumerate(((300, "o"), (last, "s"))):
            accs = [a for r in runs for s, a in r["curve"] if s == step]
            if not accs:
                continue
            xpos = j + (k - 0.5) * 0.38
            col = plt.get_cmap("tab10")(k)
            ax.bar(xpos, np.mean(accs), width=0.36, color=col, alpha=0.35, label=f"{step} steps" if j == 0 else None)
            ax.plot([xpos] * len(accs), accs, mk, color=col, ms=4)
    ax.axhline(chance, color="k", ls=":", lw=0.8, label="chance")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (copy 8 back)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("one-layer copy-8-back, content-free q, k: seeds (dots) and mean (bar)", fontsize=10)
    _curves(axes[0, 1], lb, chance, "copy-8-back: accuracy against step (mean, band min-max over seeds)", cmap)
    ax = axes[1, 0]
    for j, name in enumerate(names):
        run = next((r for r in lb if label(r) == name and "weights" in r), None)
        if run is None or name not in KERNEL_PANEL:
            continue
        w = np.asarray(run["weights"])
        dist = run["config"]["distance"]
        ax.plot(np.arange(len(w)), w / w[dist], "-", color=cmap(j), lw=1.2,
                label=f"{name} (SNR {_fmt_snr(run['snr_realized'])})")
    if optimum is not None:
        ax.plot(np.arange(len(optimum["K"])), optimum["K"] / optimum["K"][optimum["target"]], "k--", lw=1,
                label=f"selectivity optimum, Re c >= 0, r={optimum['r']} (SNR {_fmt_snr(optimum['snr'])})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_xlabel("distance Delta")
    ax.set_ylabel("weight / weight at 8 (a trough at 8 is drawn as a peak)")
    ax.legend(fontsize=7)
    ax.set_title("trained attention of the last query over distance (seed 0); SNR = w(8)^2 / sum of the others'",
                 fontsize=10)
    if rc:
        _curves(axes[1, 1], rc, recall_chance, "one-layer pair recall, N=64, 8 pairs (mean, band min-max)", cmap)
    else:
        axes[1, 1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class MechanismConfig:
    """What ``run`` measures (the script's arguments)."""

    out: str = "experiments/results/mechanism"
    rs: tuple = (32, 64, 128)
    n: int = 64
    target: int = 8
    ridge: float = 1e-4
    attentions: tuple = ("softmax-rope", "linear-rope-inputs", "linear-rope", "linear-rope@r=32", "linear-rope@r=128",
                         "linear-rope-copy", "linear-rope-learned", "linear-rope-theta", "linear-rope-phase",
                         "linear-rope-c", "linear-rope-c@r=32", "linear-rope-c@r=128", "linear-rope-optimum",
                         "linear-rope-optimum@r=32")
    seeds: tuple = (0, 1, 2, 3, 4)
    steps: int = 1000
    recall_attentions: tuple = ("softmax-rope", "linear-rope-inputs", "linear-rope", "linear-nope")
    recall_seeds: tuple = (0, 1, 2)
    recall_steps: int = 1000
    skip_toys: bool = False
    skip_recall: bool = False
    d: int = 32
    r: int = 64
    lr: float = 1e-2


def run(cfg: MechanismConfig, log=print) -> dict:
    """Everything: the capacity table, the copy-pairing check, the toys; tables on stdout (through ``log``, and
    into ``stdout.txt``), CSV / JSON / PNG under ``cfg.out``."""
    for spec in cfg.attentions + cfg.recall_attentions:  # fail now on a bad name, not after the capacity table
        parse_spec(spec)
    log, lines, out, cpu, t_start = study_start(cfg.out, log)
    summary = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "config": asdict(cfg)}

    # (a) capacity
    t0 = time.perf_counter()
    ridges = (cfg.ridge, 0.0) if cfg.ridge > 0 else (0.0,)
    cap = capacity_table(rs=cfg.rs, n=cfg.n, target=cfg.target, ridges=ridges)
    write_rows(out / "capacity.csv", cap)
    reach = {r: peak_reach(rope_frequencies(r), cfg.target) for r in cfg.rs}
    copy = copy_pairing_check(n=cfg.n)
    theta32 = rope_frequencies(32)
    g = torch.Generator().manual_seed(0)
    qf, kf = (torch.rand(32, generator=g, dtype=torch.float64) + 0.05 for _ in range(2))  # positive features
    c_used = ((qf[0::2] + 1j * qf[1::2]) * (kf[0::2] - 1j * kf[1::2])).numpy()  # z_q conj(z_k)
    K_lib = kernel_from_attention(qf, kf, RotaryEmbedding(32), cfg.n).numpy()
    formula_err = float(np.abs(K_lib - kernel(c_used, theta32, cfg.n)).max() / np.abs(K_lib).max())
    summary["capacity"] = {"seconds": time.perf_counter() - t0, "ridge": cfg.ridge, "copy_pairing": copy,
                           "kernel_formula_rel_error": formula_err,
                           "pairs_that_can_peak_at_target": {r: int(v.sum()) for r, v in reach.items()},
                           "first_pairs_reach": {r: v[:6].tolist() for r, v in reach.items()},
                           "max_kkt_ridge": max(r["kkt"] for r in cap if r["ridge"] == cfg.ridge),
                           "max_kkt_ridge0": max(r["kkt"] for r in cap if r["ridge"] == 0),
                           "max_rel_snr_pgd_minus_lh": max((abs(r["snr_pgd"] - r["snr"]) / r["snr"] for r in cap
                                                            if "snr_pgd" in r and r["snr"] < 1e6),
                                                           default=math.nan)}
    plot_capacity(out / "capacity.png", rs=cfg.rs, n=cfg.n, target=cfg.target, ridge=cfg.ridge)
    log("")
    log(f"(a) best selectivity SNR = K({cfg.target})^2 / sum_(Delta != {cfg.target}) K(Delta)^2 over Delta = 0.."
        f"{cfg.n - 1}; cones: positive = Re c >= 0 (eq. 19 on positive features), free = any phase, copy = c real "
        f">= 0; ridge {cfg.ridge:g}. Each cell: the best over the sign of K({cfg.target}) (a readout can flip it), in "
        f"brackets with K({cfg.target}) > 0 required (a peak, not a trough)")
    log(capacity_markdown(cap, cfg.ridge))
    if cfg.ridge > 0:
        log("")
        log("same, ridge 0 (exact float64 optimum; the cancellation column shows what it relies on):")
        log(capacity_markdown(cap, 0.0))
    log("")
    sc = summary["capacity"]
    log(f"solver: max relative KKT residual {sc['max_kkt_ridge']:.1e} (ridge {cfg.ridge:g}), "
        f"{sc['max_kkt_ridge0']:.1e} (ridge 0); projected gradient vs active set, max relative SNR difference "
        f"{sc['max_rel_snr_pgd_minus_lh']:.1e} (rows with SNR < 1e6; above it the indicator is in the span)")
    log(f"K(Delta) read from linear_attention vs Re sum c_i e^(i theta_i Delta): max rel. error {formula_err:.1e}")
    log("pairs (base 10000) whose theta_i * 8 mod 2 pi lies within +-pi/2 (can peak at Delta=8 alone): "
        + ", ".join(f"r={r}: {int(v.sum())}/{v.size} (pairs 0-5: {''.join('y' if b else 'n' for b in v[:6])})"
                    for r, v in reach.items()))
    log(f"copy pairing through the library, {copy['draws']} draws: max (K(Delta) - K(0)) / K(0) over Delta > 0 = "
        f"{copy['max_rel_excess_copy']:.1e}; kernels with a maximum away from Delta = 0: copy pairing "
        f"{copy['frac_peak_away_copy']:.0%} of draws, plain eq. 19 features {copy['frac_peak_away_plain']:.0%}")

    # (b) toys
    results = []
    if not cfg.skip_toys:
        log("")
        log(f"(b) one-layer copy-{cfg.target}-back toy, content-free q, k: d={cfg.d}, r={cfg.r}, N={cfg.n}, batch 32, "
            f"AdamW lr {cfg.lr:g} (warmup 20, then constant), seeds {list(cfg.seeds)}")
        base = ToyConfig(task="lookback", length=cfg.n, distance=cfg.target, d=cfg.d, dv=cfg.d, r=cfg.r,
                         lr=cfg.lr, steps=cfg.steps)
        results += run_toys(cfg.attentions, cfg.seeds, base, progress=log)
        log("")
    if not cfg.skip_recall:
        log("")
        log(f"(c) one-layer pair recall, N={cfg.n}, {cfg.n // 8} pairs, q, k, v from token embeddings, "
            f"seeds {list(cfg.recall_seeds)}, {cfg.recall_steps} steps")
        base = ToyConfig(task="pair-recall", length=cfg.n, num_pairs=cfg.n // 8, d=cfg.d, dv=cfg.d, r=cfg.r,
                         lr=cfg.lr, steps=cfg.recall_steps,
                         eval_at=tuple(s for s in (100, 200, 300, 400, 600, 800, 1000) if s <= cfg.recall_steps))
        results += run_toys(cfg.recall_attentions, cfg.recall_seeds, base, progress=log)
    if results:
        curves = [{"task": r["config"]["task"], "attention": r["label"], "r": r["config"]["r"],
                   "seed": r["config"]["seed"], "step": s, "accuracy": a} for r in results for s, a in r["curve"]]
        write_rows(out / "toys.csv", curves)
        lb_sum = toy_summary([r for r in results if r["config"]["task"] == "lookback"], at=(300, cfg.steps))
        rc_sum = toy_summary([r for r in results if r["config"]["task"] == "pair-recall"],
                             at=tuple(dict.fromkeys((min(400, cfg.recall_steps), cfg.recall_steps))))
        write_rows(out / "toys_summary.csv", lb_sum + rc_sum)
        (out / "toys.json").write_text(json.dumps(results, indent=1))
        summary["toys"] = lb_sum + rc_sum
        log("")
        log(f"toy results ({cpu}, 1 thread; d={cfg.d}, r={cfg.r} unless the name says @r=, N={cfg.n}, batch 32, "
            f"lr {cfg.lr:g}; accuracy on 256 fixed validation sequences):")
        log(toy_markdown(lb_sum + rc_sum))
        if lb_sum:
            opt = best_selectivity(rope_frequencies(cfg.r), n=cfg.n, target=cfg.target, ridge=cfg.ridge)
            plot_toys(results, out / "toys.png", chance=1 / ToyConfig().symbols,
                      optimum={"K": opt["K"], "snr": opt["snr"], "target": cfg.target, "r": cfg.r})
    summary["seconds"] = time.perf_counter() - t_start
    log(f"total {summary['seconds']:.0f} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "stdout.txt").write_text("\n".join(lines) + "\n")
    return summary


def trained_study(runs, out: str, *, n: int = 64, target: int = 8, log=print) -> list[dict]:
    """``trained_frequencies`` of the checkpoints under ``runs``: ``frequencies.csv`` and ``stdout.txt`` (the
    table) in ``out``."""
    log, lines, out, _, _ = study_start(out, log)
    rows = trained_frequencies(runs, n=n, target=target)
    write_rows(out / "frequencies.csv", rows)
    log(f"learned rotations under {runs}: pairs that turn by a radian or more over N = {n}, and the best "
        f"selectivity of distance {target} their frequencies allow (any phase, the head's decay); means over "
        f"layers and heads")
    log(trained_frequencies_markdown(rows))
    (out / "stdout.txt").write_text("\n".join(lines) + "\n")
    return rows
