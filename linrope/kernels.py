"""The chunked engine behind ``linear_attention`` and ``favor_attention`` (private; use ``linrope.functional``).

Shapes: B batch, H heads, N positions, r features, dv value dim, C chunk size, G positions per group.

What is computed (eq. 19 of RoFormer, keys carried as ``f_n * exp(s_n)``, ``f`` bounded, ``s`` a log-scale)::

    num_t = sum_{n<=t} exp(s_n) (R_t fq_t) . (R_n fk_n) v_n        den_t = sum_{n<=t} exp(s_n) fq_t . fk_n
    out_t = num_t / max(den_t, eps)

Why it is organised this way:

* Positions are processed in *groups* of G (a multiple of C). A group's features are computed, used and
  dropped; the backward recomputes them group by group, newest first, from the state saved at each group start.
  Memory is O(N (d + dv) + N/G r dv) instead of O(N r) for saved features.
* Inside a group the C-sized chunks are batched: intra-chunk masked products plus the state entering each
  chunk (an exclusive cumsum over chunks). The unrotated denominator is a running sum of key features (a
  cumsum), not a second C x C product, so RoPE adds rotations, not matmuls.
* Key log-scales are referred to P, the running max of s over keys seen *up to the group's first position*
  (causal: nothing later than any output position is looked at). exp(s_n - P) is then <= 1 for old keys;
  a key inside the group may exceed P, and if one exceeds it by more than JUMP_LIMIT the group is split there:
  the rows before it keep P, the key is a group of its own (whose P includes it) and a new group follows. The running state is kept relative to the running max
  M and rescaled by exp(M - P) <= 1 when a group starts. Per-row factors cancel between num and den, so this
  changes nothing but the range of the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .features import favor_plus
from .rotary import apply_rotary

NEG = -1e30  # "no key seen yet": exp(NEG - P) == 0 without the NaNs of -inf - -inf
JUMP_LIMIT = 40.0  # exp(40) ~ 2e17 leaves ~1e21 of float32 headroom for sums over keys, features and values


@dataclass(frozen=True)
class Config:
    causal: bool
    chunk_size: int
    group_size: int
    eps: float
    interleaved: bool  # pairing of the rotation applied to the features


# ---------------------------------------------------------------------------------------------- feature sources
class _Source:
    """Where a group's features come from, and where their gradients go.

    ``query(a, b)`` -> (fq, R fq, ctx); ``key(a, b)`` -> (fk, s, ctx) with s the per-key log-scale or None;
    ``query_grad``/``key_grad`` take the gradients w.r.t. the unrotated features (rotation already undone).
    """

    def __init__(self, cos: Tensor | None, sin: Tensor | None, interleaved: bool):
        self.cos, self.sin, self.interleaved = cos, sin, interleaved

    def rotate(self, x: Tensor, a: int, b: int, inverse: bool = False) -> Tensor:
        if self.cos is None:
            return x
        return apply_rotary(x, self.cos[a:b], self.sin[a:b], interleaved=self.interleaved, inverse=inverse)


def _masked(f: Tensor, s: Tensor | None, mask: Tensor | None, a: int, b: int) -> tuple[Tensor, Tensor | None]:
    if mask is None:
        return f, s
    m = mask[:, None, a:b]  # (B, 1, G)
    f = f * m[..., None]
    return f, (None if s is None else s.masked_fill(~m, NEG))


class GivenFeatures(_Source):
    """Precomputed features qf, kf (B, H, N, r), optional key log-scales ks (B, H, N)."""

    def __init__(self, qf, kf, ks, mask, cos, sin, interleaved):
        super().__init__(cos, sin, interleaved)
        self.qf, self.kf, self.ks, self.mask = qf, kf, ks, mask
        self.dq = torch.zeros_like(qf)
        self.dk = torch.zeros_like(kf)
        self.dks = None if ks is None else torch.zeros_like(ks)

    def query(self, a, b):
        fq = self.qf[:, :, a:b]
        return fq, self.rotate(fq, a, b), None

    def key(self, a, b):
        fk, s = _masked(self.kf[:, :, a:b], None if self.ks is None else self.ks[:, :, a:b], self.mask, a, b)
        return fk, s, None

    def query_grad(self, a, b, ctx, dfq):
        self.dq[:, :, a:b] = dfq

    def key_grad(self, a, b, ctx, s, P, k0, dk0):
        # k0 = fk * exp(s - P): d fk = dk0 * exp(s - P), d s = sum_r dk0 * k0
        if s is None:
            dfk = dk0
        else:
            dfk = dk0 * torch.exp(s - P[..., None])[..., None]
            self.dks[:, :, a:b] = (dk0 * k0).sum(-1)
        if self.mask is not None:
            dfk = dfk * self.mask[:, None, a:b, None]
        self.dk[:, :, a:b] = dfk


class FavorFeatures(_Source):
    """FAVOR+ features computed on the fly from raw q, k (B, H, N, d) and a projection W (r, d).

    With x~ = x d^(-1/4) and u = x~ W^T: fq = exp(u - max_i u) (a per-row factor, it cancels);
    fk = exp(u - max_i u) and s = max_i u - |x~|^2 / 2, so fk exp(s) = exp(u - |x~|^2/2), the positive
    random feature of Performer up to the constant 1/sqrt(r).
    """

    def __init__(self, q, k, W, mask, cos, sin, interleaved):
        super().__init__(cos, sin, interleaved)
        self.q, self.k, self.W, self.mask = q, k, W, mask
        self.scale = q.shape[-1] ** -0.25
        self.dq = torch.zeros_like(q)
        self.dk = torch.zeros_like(k)

    def query(self, a, b):
        fq, _ = favor_plus(self.q[:, :, a:b], self.W, is_query=True)
        return fq, self.rotate(fq, a, b), fq

    def key(self, a, b):
        fk, s = _masked(*favor_plus(self.k[:, :, a:b], self.W, is_query=False), self.mask, a, b)
        return fk, s, None

    def query_grad(self, a, b, fq, dfq):
        self.dq[:, :, a:b] = (dfq * fq) @ self.W * self.scale

    def key_grad(self, a, b, ctx, s, P, k0, dk0):
        du = dk0 * k0  # k0 = exp(u - |x~|^2/2 - P), u = x~ W^T
        xs = self.k[:, :, a:b] * self.scale
        self.dk[:, :, a:b] = (du @ self.W - du.sum(-1, keepdim=True) * xs) * self.scale


# ---------------------------------------------------------------------------------------------- one group
_TRIL: dict = {}


def _tril(C: int, device) -> Tensor:
    key = (C, str(device))
    if key not in _TRIL:
        _TRIL[key] = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    return _TRIL[key]


def _chunked(x: Tensor, C: int) -> Tensor:
    return x.unflatten(2, (-1, C))  # (B, H, G, D) -> (B, H, nc, C, D)


def _states(Kr: Tensor, V: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Per-chunk K^T V (B, H, nc, r, dv) and the state entering each chunk (exclusive cumsum, plus S)."""
    KV = Kr.transpose(-1, -2) @ V
    Sst = torch.cumsum(KV, dim=2)
    Sst = torch.cat((S[:, :, None], Sst[:, :, :-1].add_(S[:, :, None])), dim=2)
    return KV, Sst


def group_forward(qr, q0, kr, k0, v, S, z, C: int, eps: float):
    """Causal eq. 19 over one group of G = nc*C positions. Returns out (B,H,G,dv), den (B,H,G), S, z at the end."""
    Qr, Kr, V = _chunked(qr, C), _chunked(kr, C), _chunked(v, C)
    KV, Sst = _states(Kr, V, S)
    A = (Qr @ Kr.transpose(-1, -2)).masked_fill_(~_tril(C, qr.device), 0)  # (B, H, nc, C, C)
    num = (A @ V).add_(Qr @ Sst).flatten(2, 3)  # (B, H, G, dv)
    Z = torch.cumsum(k0, dim=2).add_(z[:, :, None])  # running unrotated key sum, (B, H, G, r)
    den = torch.linalg.vecdot(q0, Z)
    out = num.div_(den.clamp_min(eps)[..., None])
    return out, den, Sst[:, :, -1] + KV[:, :, -1], Z[:, :, -1]


def group_backward(qr, q0, kr, k0, v, S, z, out, den, dout, dS, dz, C: int, eps: float):
    """Gradients of ``group_forward`` w.r.t. (qr, q0, kr, k0, v, S, z) given those of (out, S_end, z_end)."""
    Qr, Kr, V = _chunked(qr, C), _chunked(kr, C), _chunked(v, C)
    KV, Sst = _states(Kr, V, S)
    tril = _tril(C, qr.device)
    A = (Qr @ Kr.transpose(-1, -2)).masked_fill_(~tril, 0)
    denc = den.clamp_min(eps)
    g = dout / denc[..., None]  # d num
    dden = (dout * out).sum(-1).div_(denc).neg_().masked_fill_(den <= eps, 0)  # (B, H, G)
    Gc = _chunked(g, C)
    dA = (Gc @ V.transpose(-1, -2)).masked_fill_(~tril, 0)
    dqr = (dA @ Kr).add_(Gc @ Sst.transpose(-1, -2)).flatten(2, 3)
    dSst = Qr.transpose(-1, -2) @ Gc  # gradient w.r.t. the state entering each chunk
    # the state leaving chunk c feeds every later chunk start and the group's end state
    dKV = torch.cumsum(dSst.flip(2), dim=2).flip(2)
    dS_in = dKV[:, :, 0] + dS
    dKV = torch.cat((dKV[:, :, 1:], torch.zeros_like(dKV[:, :, :1])), dim=2).add_(dS[:, :, None])
    dkr = (dA.transpose(-1, -2) @ Qr).add_(V @ dKV.transpose(-1, -2)).flatten(2, 3)
    dv = (A.transpose(-1, -2) @ Gc).add_(Kr @ dKV).flatten(2, 3)
    Z = torch.cumsum(k0, dim=2).add_(z[:, :, None])
    dq0 = Z.mul_(dden[..., None])
    dk0 = torch.cumsum((q0 * dden[..., None]).flip(2), dim=2).flip(2).add_(dz[:, :, None])
    return dqr, dq0, dkr, dk0, dv, dS_in, dk0[:, :, 0].clone() if dk0.shape[2] else dz


def _bulk_and_tail(a: int, b: int, C: int):
    """Split [a, b) into a part of whole chunks and a tail shorter than C (each with its chunk size)."""
    bulk = a + (b - a) // C * C
    parts = [(a, bulk, C)] if bulk > a else []
    if b > bulk:
        parts.append((bulk, b, b - bulk))
    return parts


# ---------------------------------------------------------------------------------------------- causal driver
def _first_valid(s: Tensor) -> Tensor:
    """The log-scale of the first valid (not NEG) key of each row of s (B, H, G); NEG if none."""
    idx = (s > NEG / 2).to(torch.uint8).argmax(-1, keepdim=True)
    return s.gather(-1, idx).squeeze(-1)


def _scaled(fk: Tensor, s: Tensor | None, P: Tensor | None) -> Tensor:
    return fk if s is None else fk * torch.exp(s - P[..., None])[..., None]


def causal_forward(src: _Source, v, S, z, M, cfg: Config):
    """Run all groups; returns out, den, the final (S, z, M) and the plan the backward replays."""
    B, H, N, dv = v.shape
    out = v.new_empty(B, H, N, dv)
    den = v.new_empty(B, H, N)
    plan = []
    work = [(a, min(a + cfg.group_size, N)) for a in range(0, N, cfg.group_size)][::-1]
    while work:
        a, b = work.pop()
        fk, s, _ = src.key(a, b)
        P = e_in = None
        if s is not None:
            P = torch.maximum(M, _first_valid(s))
            P = torch.where(P > NEG / 2, P, torch.zeros_like(P))  # no key yet: any finite reference will do
            jumps = ((s - P[..., None]) > JUMP_LIMIT).flatten(0, 1).any(0)  # (G,)
            if b - a > 1 and bool(jumps.any()):
                # split at the first jumping key: the rows before it keep this reference, the key gets a
                # group of its own (its reference includes itself), the rest starts again after it
                t = a + int(jumps.nonzero()[0])
                work.extend(x for x in ((t + 1, b), (t, t + 1), (a, t)) if x[1] > x[0])
                continue
            e_in = torch.exp(M - P)
            S, z = S * e_in[..., None, None], z * e_in[..., None]
        k0 = _scaled(fk, s, P)
        S_start, z_start = S, z
        for lo, hi, C in _bulk_and_tail(a, b, cfg.chunk_size):
            fq, qr, _ = src.query(lo, hi)
            k = k0[:, :, lo - a:hi - a]
            out[:, :, lo:hi], den[:, :, lo:hi], S, z = group_forward(
                qr, fq, src.rotate(k, lo, hi), k, v[:, :, lo:hi], S, z, C, cfg.eps)
        e_out = None
        if s is not None:
            M_new = torch.maximum(P, s.amax(-1))
            e_out = torch.exp(P - M_new)
            S, z, M = S * e_out[..., None, None], z * e_out[..., None], M_new
        plan.append((a, b, P, e_in, e_out, S_start, z_start))
    return out, den, S, z, M, plan


def causal_backward(src: _Source, v, out, den, dout, dS, dz, plan, cfg: Config):
    dv = torch.zeros_like(v)
    for a, b, P, e_in, e_out, S_start, z_start in reversed(plan):
        if e_out is not None:
            dS, dz = dS * e_out[..., None, None], dz * e_out[..., None]
        fk, s, kctx = src.key(a, b)
        k0 = _scaled(fk, s, P)
        dk0_all = torch.empty_like(k0)
        parts = _bulk_and_tail(a, b, cfg.chunk_size)
        # the tail's state comes after the bulk: recompute the bulk's end state first
        starts = [(S_start, z_start)]
        if len(parts) == 2:
            lo, hi, C = parts[0]
            k = k0[:, :, :hi - a]
            KV, Sst = _states(_chunked(src.rotate(k, lo, hi), C), _chunked(v[:, :, lo:hi], C), S_start)
            starts.append((Sst[:, :, -1] + KV[:, :, -1], z_start + k.sum(2)))
        for (lo, hi, C), (S0, z0) in reversed(list(zip(parts, starts))):
            fq, qr, qctx = src.query(lo, hi)
            k = k0[:, :, lo - a:hi - a]
            kr = src.rotate(k, lo, hi)
            dqr, dq0, dkr, dk0, dv_g, dS, dz = group_backward(
                qr, fq, kr, k, v[:, :, lo:hi], S0, z0, out[:, :, lo:hi], den[:, :, lo:hi], dout[:, :, lo:hi],
                dS, dz, C, cfg.eps)
            src.query_grad(lo, hi, qctx, dq0.add_(src.rotate(dqr, lo, hi, inverse=True)))
            dk0_all[:, :, lo - a:hi - a] = dk0.add_(src.rotate(dkr, lo, hi, inverse=True))
            dv[:, :, lo:hi] = dv_g
        src.key_grad(a, b, kctx, s, P, k0, dk0_all)
        if e_in is not None:
            dS, dz = dS * e_in[..., None, None], dz * e_in[..., None]
    return dv, dS, dz


# ---------------------------------------------------------------------------------------------- bidirectional
def _groups(N: int, G: int):
    return [(a, min(a + G, N)) for a in range(0, N, G)]


def bidirectional_forward(src: _Source, v, cfg: Config):
    """Two passes: accumulate the key state (relative to the running max of s), then read it with the queries."""
    B, H, N, dv = v.shape
    r = None
    S = z = M = None
    for a, b in _groups(N, cfg.group_size):
        fk, s, _ = src.key(a, b)
        if S is None:
            r = fk.shape[-1]
            S, z = v.new_zeros(B, H, r, dv), v.new_zeros(B, H, r)
            M = v.new_full((B, H), NEG)
        if s is not None:
            M_new = torch.maximum(M, s.amax(-1))
            e = torch.exp(M - M_new)
            S, z, M = S * e[..., None, None], z * e[..., None], M_new
        k0 = _scaled(fk, s, None if s is None else M)
        S = S + src.rotate(k0, a, b).transpose(-1, -2) @ v[:, :, a:b]
        z = z + k0.sum(2)
    out = v.new_empty(B, H, N, dv)
    den = v.new_empty(B, H, N)
    for a, b in _groups(N, cfg.group_size):
        fq, qr, _ = src.query(a, b)
        den[:, :, a:b] = torch.linalg.vecdot(fq, z[:, :, None])
        out[:, :, a:b] = (qr @ S).div_(den[:, :, a:b].clamp_min(cfg.eps)[..., None])
    return out, den, S, z, M


def bidirectional_backward(src: _Source, v, out, den, dout, S, z, M, cfg: Config):
    dS, dz = torch.zeros_like(S), torch.zeros_like(z)
    for a, b in _groups(v.shape[2], cfg.group_size):
        fq, qr, qctx = src.query(a, b)
        d, o, do = den[:, :, a:b], out[:, :, a:b], dout[:, :, a:b]
        denc = d.clamp_min(cfg.eps)
        g = do / denc[..., None]
        dden = (do * o).sum(-1).div_(denc).neg_().masked_fill_(d <= cfg.eps, 0)
        dS += qr.transpose(-1, -2) @ g
        dz += (fq * dden[..., None]).sum(2)
        dfq = g @ S.transpose(-1, -2)
        src.query_grad(a, b, qctx, src.rotate(dfq, a, b, inverse=True).add_(dden[..., None] * z[:, :, None]))
    dv = torch.empty_like(v)
    for a, b in _groups(v.shape[2], cfg.group_size):
        fk, s, kctx = src.key(a, b)
        k0 = _scaled(fk, s, None if s is None else M)
        dv[:, :, a:b] = src.rotate(k0, a, b) @ dS
        dk0 = src.rotate(v[:, :, a:b] @ dS.transpose(-1, -2), a, b, inverse=True).add_(dz[:, :, None])
        src.key_grad(a, b, kctx, s, M, k0, dk0)
    return dv


# ---------------------------------------------------------------------------------------------- autograd
class LinearAttentionFunction(torch.autograd.Function):
    """out, S, z, M = f(q, k, ks, v, S0, z0); q, k are features (kind 'features') or raw inputs ('favor')."""

    @staticmethod
    def forward(ctx, kind, cfg, q, k, ks, v, W, mask, cos, sin, S0, z0, M0):
        src = _make_source(kind, q, k, ks, W, mask, cos, sin, cfg)
        if cfg.causal:
            out, den, S, z, M, plan = causal_forward(src, v, S0, z0, M0, cfg)
            ctx.plan = plan
        else:
            out, den, S, z, M = bidirectional_forward(src, v, cfg)
        ctx.kind, ctx.cfg = kind, cfg
        ctx.save_for_backward(q, k, ks, v, W, mask, cos, sin, out, den, S, z, M)
        ctx.mark_non_differentiable(M)
        return out, S, z, M

    @staticmethod
    def backward(ctx, dout, dS, dz, _dM):
        q, k, ks, v, W, mask, cos, sin, out, den, S, z, M = ctx.saved_tensors
        cfg = ctx.cfg
        src = _make_source(ctx.kind, q, k, ks, W, mask, cos, sin, cfg)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        if cfg.causal:
            dS = torch.zeros_like(S) if dS is None else dS
            dz = torch.zeros_like(z) if dz is None else dz
            dv, dS0, dz0 = causal_backward(src, v, out, den, dout, dS, dz, ctx.plan, cfg)
        else:
            dv, dS0, dz0 = bidirectional_backward(src, v, out, den, dout, S, z, M, cfg), None, None
        dks = getattr(src, "dks", None)
        return None, None, src.dq, src.dk, dks, dv, None, None, None, None, dS0, dz0, None


def _make_source(kind, q, k, ks, W, mask, cos, sin, cfg):
    if kind == "favor":
        return FavorFeatures(q, k, W, mask, cos, sin, cfg.interleaved)
    return GivenFeatures(q, k, ks, mask, cos, sin, cfg.interleaved)
