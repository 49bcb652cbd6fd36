"""The chunked engine behind ``linear_attention`` and ``favor_attention`` (private; use ``linrope.functional``).

Shapes: B batch, H heads (flattened here to BH), N positions, r features, dv value dim, C chunk size, G
positions per group.

What is computed (RoFormer eq. 19 with keys carried as a bounded feature times exp(log-scale))::

    num_t = sum_{n<=t} (R_t fq_t) . (R_n k0_n) v_n,    den_t = sum_{n<=t} fq_t . k0_n,
    out_t = num_t / max(den_t, eps)

How, and why:

* Positions go through in *groups* (G a multiple of C, or one chunk shorter than C). A group's features are
  computed into reused buffers, used and dropped; the backward recomputes them group by group, newest first,
  from the state saved at each group start: O(N (d + dv) + N/G r dv) memory, never N x r.
* Inside a group the chunks are batched: intra-chunk masked products, the state entering each chunk (a short
  scan over chunks), ``baddbmm`` for the inter-chunk term. torch.cumsum is avoided: along a non-innermost dim
  it runs 30-80x slower than an elementwise pass on CPU; short Python scans over slices are cheaper.
* The normalizer is never rotated. Without RoPE it is the row sum of the masked score matrix (free); with RoPE
  it is fq . (running key sum), the key sum scanned within chunks (no second C x C product).
* The rotation runs on interleaved pairs viewed as complex numbers: one complex multiply, a single memory pass,
  where cos/sin arithmetic takes four. With the half-split pairing the feature order is permuted on the way in
  (projection rows, or feature columns) and states on the way out: dot products, hence outputs, do not depend
  on the order of features.
* Key magnitudes: keys arrive as (u, s) with k0 = exp(u - h - P) (FAVOR+) or f exp(s - P), s a per-key
  log-scale. P, the reference of a group, is the running max of s over keys up to the group's first position:
  causal, so an output never looks at a later key. A key exceeding P by more than JUMP_LIMIT splits the group
  (the key gets a group whose P includes it). The running state is kept relative to the running max M and
  rescaled by exp(M - P) <= 1 at each group start. Factors shared by a row's numerator and normalizer cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .sources import NEG, FavorFeatures, GivenFeatures, Rotation, Workspace, group_rows, interleaved_order

JUMP_LIMIT = 40.0  # exp(40) ~ 2e17 leaves ~1e21 of float32 headroom for sums over keys, features and values
DEN_CHUNK = 32  # sub-chunk of the unrotated normalizer under RoPE (a divisor of the chunk is used); measured best


@dataclass(frozen=True)
class Config:
    causal: bool
    chunk_size: int
    group_size: int
    eps: float
    needs_grad: bool = True  # False: nothing will be differentiated, keep no state for a backward


# ---------------------------------------------------------------------------------------------- one group
_TRIL: dict = {}


def _tril(C: int, like: Tensor) -> Tensor:
    key = (C, like.dtype, like.device)
    if key not in _TRIL:
        _TRIL[key] = torch.ones(C, C, dtype=like.dtype, device=like.device).tril()
    return _TRIL[key]


# The scans below are Python loops over slices; ``unbind`` makes all the slices in one call, which halves the
# per-step overhead that dominates them.
def _exclusive_scan(X: Tensor, init: Tensor, out: Tensor) -> Tensor:
    """out[:, c] = init + sum_{c' < c} X[:, c'] along dim 1; returns init + sum of all X."""
    xs, os = X.unbind(1), out.unbind(1)
    os[0].copy_(init)
    for c in range(1, len(xs)):
        torch.add(os[c - 1], xs[c - 1], out=os[c])
    return os[-1] + xs[-1]


def _reverse_scan(X: Tensor, init: Tensor, out: Tensor) -> Tensor:
    """out[:, c] = init + sum_{c' > c} X[:, c'] along dim 1; returns init + sum of all X."""
    xs, os = X.unbind(1), out.unbind(1)
    os[-1].copy_(init)
    for c in range(len(xs) - 2, -1, -1):
        torch.add(os[c + 1], xs[c + 1], out=os[c])
    return os[0] + xs[0]


def _normalizer(ws, fq, k0, z, s: int, D: Tensor | None = None):
    """den_t = fq_t . z_t with z_t the unrotated key sum up to t, in sub-chunks of s positions.

    Within a sub-chunk: row sums of the masked product fq k0^T (``D``, or the score matrix of the chunks when
    there is no RoPE); before it: fq_t . (key sum at the sub-chunk start), a short scan over sub-chunks. Small
    sub-chunks keep the extra product cheap where RoPE makes it necessary. Returns den (BH, G) and z after.
    """
    BH, G, r = fq.shape
    ns = G // s
    Qs, Ks = fq.view(BH * ns, s, r), k0.view(BH * ns, s, r)
    if D is None:
        D = ws.get("D", BH * ns, s, s)
        torch.bmm(Qs, Ks.transpose(1, 2), out=D).mul_(_tril(s, D))
    ksum = ws.get("ksum", BH, ns, r)
    torch.sum(k0.view(BH, ns, s, r), 2, out=ksum)
    zst = ws.get("zst", BH, ns, r)
    z_end = _exclusive_scan(ksum, z, zst)
    den = torch.baddbmm(D.sum(-1, keepdim=True), Qs, zst.view(BH * ns, r, 1))  # (BH*ns, s, 1)
    return den.view(BH, G), z_end


def _normalizer_backward(ws, fq, k0, z, dden, dz, s: int, dfq, dk0, intra: bool):
    """Adds the normalizer's share of the gradients to dfq, dk0 (BH, G, r) in place; returns dz before.

    ``intra=False`` when the within-sub-chunk part already went through the score matrix (no RoPE).
    """
    BH, G, r = fq.shape
    ns = G // s
    Qs, Ks = fq.view(BH * ns, s, r), k0.view(BH * ns, s, r)
    ksum = ws.get("ksum", BH, ns, r)
    torch.sum(k0.view(BH, ns, s, r), 2, out=ksum)
    zst = ws.get("zst", BH, ns, r)
    _exclusive_scan(ksum, z, zst)
    dd = dden.view(BH * ns, s, 1)
    wsum = torch.bmm(dd.transpose(1, 2), Qs).view(BH, ns, r)  # d (key sum at each sub-chunk start)
    dks = ws.get("dks", BH, ns, r)
    dz_in = _reverse_scan(wsum, dz, dks)  # the keys of a sub-chunk feed every later one and z after
    if intra:
        dD = torch.mul(_tril(s, fq), dd, out=ws.get("dD", BH * ns, s, s))  # d den_t / d D_tn, n <= t
        dfq.view(BH * ns, s, r).baddbmm_(dD, Ks)
        dk0.view(BH * ns, s, r).baddbmm_(dD.transpose(1, 2), Qs)
    dfq.view(BH * ns, s, r).baddbmm_(dd, zst.view(BH * ns, 1, r))
    dk0.view(BH, ns, s, r).add_(dks.unsqueeze(2))
    return dz_in


def group_forward(ws, fq, qr, k0, kr, V, S, z, C: int, s: int):
    """Causal eq. 19 over one group (chunks of C, normalizer sub-chunks of s | C). qr/kr None without RoPE.

    Returns num (BH, G, dv), den (BH, G), and S, z after the group.
    """
    BH, G, r = fq.shape
    nc, dv = G // C, V.shape[-1]
    rope = qr is not None
    Qc = (qr if rope else fq).view(BH * nc, C, r)
    Kc = (kr if rope else k0).view(BH * nc, C, r)
    Vc = V.view(BH * nc, C, dv)
    KV = ws.get("KV", BH, nc, r, dv)
    torch.bmm(Kc.transpose(1, 2), Vc, out=KV.view(BH * nc, r, dv))
    Sst = ws.get("Sst", BH, nc, r, dv)
    S_end = _exclusive_scan(KV, S, Sst)
    A = ws.get("A", BH * nc, C, C)
    torch.bmm(Qc, Kc.transpose(1, 2), out=A).mul_(_tril(C, A))
    num = ws.get("num", BH * nc, C, dv)
    torch.bmm(A, Vc, out=num).baddbmm_(Qc, Sst.view(BH * nc, r, dv))
    den, z_end = _normalizer(ws, fq, k0, z, s if rope else C, D=None if rope else A)  # no RoPE: A is fq k0^T
    return num.view(BH, G, dv), den, S_end, z_end


def group_backward(ws, fq, qr, k0, kr, V, S, z, g, dden, dS, dz, C: int, s: int, unrotate=None):
    """Gradients of ``group_forward`` given g = d num (BH, G, dv), dden (BH, G) and those of (S, z) after.

    Returns (d fq, d k0, d V, dS, dz before): the feature gradients w.r.t. the *unrotated* features (the
    rotated parts pass through ``unrotate(x, out)``, R^T). They live in workspace buffers.
    """
    BH, G, r = fq.shape
    nc, dv = G // C, V.shape[-1]
    rope = qr is not None
    Qc = (qr if rope else fq).view(BH * nc, C, r)
    Kc = (kr if rope else k0).view(BH * nc, C, r)
    Vc, Gc = V.view(BH * nc, C, dv), g.view(BH * nc, C, dv)
    tril = _tril(C, fq)
    KV = ws.get("KV", BH, nc, r, dv)
    torch.bmm(Kc.transpose(1, 2), Vc, out=KV.view(BH * nc, r, dv))
    Sst = ws.get("Sst", BH, nc, r, dv)
    _exclusive_scan(KV, S, Sst)
    A = ws.get("A", BH * nc, C, C)
    torch.bmm(Qc, Kc.transpose(1, 2), out=A).mul_(tril)
    dA = ws.get("dA", BH * nc, C, C)
    torch.bmm(Gc, Vc.transpose(1, 2), out=dA)
    if not rope:
        dA.add_(dden.view(BH * nc, C, 1))  # den_t = sum_{n<=t} A_tn + ...
    dA.mul_(tril)
    dQ = ws.get("dQ", BH, G, r)
    torch.bmm(dA, Kc, out=dQ.view(BH * nc, C, r)).baddbmm_(Gc, Sst.view(BH * nc, r, dv).transpose(1, 2))
    dSst = ws.get("dSst", BH, nc, r, dv)
    torch.bmm(Qc.transpose(1, 2), Gc, out=dSst.view(BH * nc, r, dv))
    dKV = ws.get("dKV", BH, nc, r, dv)
    dS_in = _reverse_scan(dSst, dS, dKV)
    dK = ws.get("dK", BH, G, r)
    torch.bmm(dA.transpose(1, 2), Qc, out=dK.view(BH * nc, C, r)).baddbmm_(Vc, dKV.view(BH * nc, r, dv).transpose(1, 2))
    dVg = ws.get("dV", BH, G, dv)
    torch.bmm(A.transpose(1, 2), Gc, out=dVg.view(BH * nc, C, dv)).baddbmm_(Kc, dKV.view(BH * nc, r, dv))
    if rope:
        dQ = unrotate(dQ, ws.get("dfq", BH, G, r))
        dK = unrotate(dK, ws.get("dk0", BH, G, r))
    dz_in = _normalizer_backward(ws, fq, k0, z, dden, dz, s if rope else C, dQ, dK, intra=rope)
    return dQ, dK, dVg, dS_in, dz_in


# ---------------------------------------------------------------------------------------------- causal driver
def _first_valid(s: Tensor) -> Tensor:
    """The log-scale of the first valid (not NEG) key of each row of s (BH, G); NEG if none."""
    idx = (s > NEG / 2).to(torch.uint8).argmax(-1, keepdim=True)
    return s.gather(-1, idx).squeeze(-1)


def _rotated(rot, x, a, b, ws, name):
    return None if rot is None else rot(x, a, b, ws.get(name, *x.shape))


def _group_features(src, rot, ws, a, b, P=None, M=None, tag=""):
    """Key features of [a, b) at reference P (or, if P is None, the causal reference from M), in the workspace
    buffers named with ``tag``. Returns (k0, kr, s, P, jumps), jumps (G,) marking keys that exceed P by more
    than JUMP_LIMIT.
    """
    BH, G, r = src.BH, b - a, src.r
    u, s = src.key_logscale(a, b, ws.get("k0" + tag, BH, G, r))
    jumps = None
    if s is not None and P is None:
        P = torch.maximum(M, _first_valid(s))
        P = torch.where(P > NEG / 2, P, torch.zeros_like(P))  # no key yet: any finite reference will do
        jumps = ((s - P[:, None]) > JUMP_LIMIT).any(0)
    k0 = src.key_finish(a, b, u, s, P, ws.get("k0" + tag, BH, G, r))
    return k0, _rotated(rot, k0, a, b, ws, "kr" + tag), s, P, jumps


def _query_features(src, rot, ws, a, b, r):
    fq = src.query(a, b, ws.get("fq", src.BH, b - a, r))
    return fq, _rotated(rot, fq, a, b, ws, "qr")


def causal_forward(src, rot, V, S, z, M, cfg: Config, keep_states: bool = True):
    """Run all groups; returns num-divided outputs, den, the final (S, z, M) and the plan the backward replays
    (without the group states when ``keep_states`` is False: nothing will be differentiated)."""
    B, H, N, dv = V.shape
    BH = B * H
    r = S.shape[1]
    ws = Workspace(V)
    out, den = V.new_empty(BH, N, dv), V.new_empty(BH, N)
    plan = []
    C0 = cfg.chunk_size
    work = [(a, min(a + cfg.group_size, N)) for a in range(0, N, cfg.group_size)][::-1]
    while work:
        a, b = work.pop()
        if (b - a) > C0 and (b - a) % C0:  # whole chunks, then one short chunk
            cut = a + (b - a) // C0 * C0
            work.extend(((cut, b), (a, cut)))
            continue
        k0, kr, s, P, jumps = _group_features(src, rot, ws, a, b, M=M)
        if jumps is not None and b - a > 1 and bool(jumps.any()):
            # the rows before the first jumping key keep P; the key gets a group whose P includes it
            t = a + int(jumps.nonzero()[0])
            work.extend(x for x in ((t + 1, b), (t, t + 1), (a, t)) if x[1] > x[0])
            continue
        e_in = e_out = None
        if P is not None:
            e_in = torch.exp(M - P)
            S, z = S * e_in[:, None, None], z * e_in[:, None]
        # every other group start state is kept; the backward rebuilds the others from the one before
        plan.append([a, b, P, e_in, None, *((S, z) if keep_states and len(plan) % 2 == 0 else (None, None))])
        fq, qr = _query_features(src, rot, ws, a, b, r)
        Vg = group_rows(V, a, b, ws.get("v", BH, b - a, dv))
        C = min(C0, b - a)
        num, d, S, z = group_forward(ws, fq, qr, k0, kr, Vg, S, z, C, math.gcd(DEN_CHUNK, C))
        den[:, a:b] = d
        torch.div(num, d.clamp_min(cfg.eps).unsqueeze(-1), out=out[:, a:b])
        if P is not None:
            M_new = torch.maximum(P, s.amax(-1))
            e_out = torch.exp(P - M_new)
            S, z, M = S * e_out[:, None, None], z * e_out[:, None], M_new
            plan[-1][4] = e_out
    return out, den, S, z, M, plan


def _output_grads(out, den, dout, eps, buf):
    """g = d num = dout / den (into the contiguous ``buf``: dout may come with any strides) and
    d den = -(dout . out) / den (zero where den was clamped)."""
    denc = den.clamp_min(eps)
    g = torch.div(dout, denc.unsqueeze(-1), out=buf)
    dden = (dout * out).sum(-1).div_(denc).neg_().masked_fill_(den <= eps, 0)
    return g, dden


def causal_backward(src, rot, V, out, den, dout, dS, dz, plan, cfg: Config):
    B, H, N, dv = V.shape
    BH = B * H
    r = dS.shape[1]
    ws = Workspace(V)
    dV = V.new_empty(BH, N, dv)
    ahead = None  # key features of the next group to process, computed early to rebuild a state
    for i in range(len(plan) - 1, -1, -1):
        a, b, P, e_in, e_out, S0, z0 = plan[i]
        if e_out is not None:
            dS, dz = dS * e_out[:, None, None], dz * e_out[:, None]
        k0, kr, s = ahead if ahead is not None else _group_features(src, rot, ws, a, b, P=P, tag=str(i % 2))[:3]
        ahead = None
        if S0 is None:  # rebuild this group's start state from the previous group (whose keys we need next anyway)
            pa, pb, pP, _, pe_out, pS0, pz0 = plan[i - 1]
            ahead = _group_features(src, rot, ws, pa, pb, P=pP, tag=str((i - 1) % 2))[:3]
            pk0, pkr, _ = ahead
            S0 = torch.baddbmm(pS0, (pk0 if pkr is None else pkr).transpose(1, 2), group_rows(V, pa, pb))
            z0 = pz0 + pk0.sum(1)
            for e in (pe_out, e_in):
                if e is not None:
                    S0, z0 = S0 * e[:, None, None], z0 * e[:, None]
        fq, qr = _query_features(src, rot, ws, a, b, r)
        Vg = group_rows(V, a, b, ws.get("v", BH, b - a, dv))
        g, dden = _output_grads(out[:, a:b], den[:, a:b], dout[:, a:b], cfg.eps, ws.get("g", BH, b - a, dv))
        unrotate = None if rot is None else (lambda x, out: rot(x, a, b, out, inverse=True))
        C = min(cfg.chunk_size, b - a)
        dfq, dk0, dVg, dS, dz = group_backward(ws, fq, qr, k0, kr, Vg, S0, z0, g, dden, dS, dz, C,
                                               math.gcd(DEN_CHUNK, C), unrotate)
        dV[:, a:b] = dVg
        src.query_grad(a, b, fq, dfq)
        src.key_grad(a, b, k0, dk0, s, P)
        if e_in is not None:
            dS, dz = dS * e_in[:, None, None], dz * e_in[:, None]
    return dV, dS, dz


# ---------------------------------------------------------------------------------------------- bidirectional
def _groups(N: int, G: int):
    return [(a, min(a + G, N)) for a in range(0, N, G)]


def bidirectional_forward(src, rot, V, r, cfg: Config):
    """Accumulate the key state (relative to the running max of s), then read it with the queries."""
    B, H, N, dv = V.shape
    BH = B * H
    ws = Workspace(V)
    S, z, M = V.new_zeros(BH, r, dv), V.new_zeros(BH, r), V.new_full((BH,), NEG)
    for a, b in _groups(N, cfg.group_size):
        u, s = src.key_logscale(a, b, ws.get("k0", BH, b - a, r))
        P = None
        if s is not None:
            P = torch.maximum(M, s.amax(-1))
            P = torch.where(P > NEG / 2, P, torch.zeros_like(P))
            e = torch.exp(M - P)
            S.mul_(e[:, None, None]), z.mul_(e[:, None])
            M = P
        k0 = src.key_finish(a, b, u, s, P, ws.get("k0", BH, b - a, r))
        kr = _rotated(rot, k0, a, b, ws, "kr")
        S.baddbmm_((k0 if kr is None else kr).transpose(1, 2), group_rows(V, a, b, ws.get("v", BH, b - a, dv)))
        z.add_(k0.sum(1))
    out, den = V.new_empty(BH, N, dv), V.new_empty(BH, N)
    for a, b in _groups(N, cfg.group_size):
        fq, qr = _query_features(src, rot, ws, a, b, r)
        d = torch.bmm(fq, z.unsqueeze(-1)).squeeze(-1)
        den[:, a:b] = d
        torch.div(torch.bmm(fq if qr is None else qr, S), d.clamp_min(cfg.eps).unsqueeze(-1), out=out[:, a:b])
    return out, den, S, z, M


def bidirectional_backward(src, rot, V, out, den, dout, S, z, M, cfg: Config):
    B, H, N, dv = V.shape
    BH = B * H
    r = S.shape[1]
    ws = Workspace(V)
    dS, dz = torch.zeros_like(S), torch.zeros_like(z)
    for a, b in _groups(N, cfg.group_size):  # queries: d S, d z, and the query gradients
        fq, qr = _query_features(src, rot, ws, a, b, r)
        g, dden = _output_grads(out[:, a:b], den[:, a:b], dout[:, a:b], cfg.eps, ws.get("g", BH, b - a, dv))
        dS.baddbmm_((fq if qr is None else qr).transpose(1, 2), g)
        dz.add_(torch.bmm(dden.unsqueeze(1), fq).squeeze(1))
        dfq = torch.bmm(g, S.transpose(1, 2))
        if qr is not None:
            dfq = rot(dfq, a, b, ws.get("tmp", *dfq.shape), inverse=True)
        src.query_grad(a, b, fq, dfq.baddbmm_(dden.unsqueeze(-1), z.unsqueeze(1)))
    dV = V.new_empty(BH, N, dv)
    for a, b in _groups(N, cfg.group_size):  # keys, at the final reference M
        k0, kr, s, _, _ = _group_features(src, rot, ws, a, b, P=M)
        dV[:, a:b] = torch.bmm(k0 if kr is None else kr, dS)
        dk0 = torch.bmm(group_rows(V, a, b, ws.get("v", BH, b - a, dv)), dS.transpose(1, 2))
        if kr is not None:
            dk0 = rot(dk0, a, b, ws.get("tmp", *dk0.shape), inverse=True)
        src.key_grad(a, b, k0, dk0.add_(dz.unsqueeze(1)), s, M)
    return dV


# ---------------------------------------------------------------------------------------------- autograd
class LinearAttentionFunction(torch.autograd.Function):
    """out, S, z, M = f(q, k, ks, v, S0, z0); q, k are features (kind 'features') or raw inputs ('favor').

    Tensors arrive as (B, H, N, .), states as (B, H, r, dv), (B, H, r), (B, H), all in the compute dtype;
    ``interleaved`` is the pairing of ``cos``/``sin`` (the engine works on interleaved pairs).
    """

    @staticmethod
    def forward(ctx, kind, cfg, interleaved, q, k, ks, v, W, mask, cos, sin, S0, z0, M0):
        B, H, N, dv = v.shape
        r = W.shape[0] if kind == "favor" else q.shape[-1]
        perm = interleaved_order(r, v.device) if cos is not None and not interleaved else None
        ctx.meta = (kind, cfg, perm, B, H)
        ctx.save_for_backward(q, k, ks, v, W, mask, cos, sin)
        src, rot, V = _prepare(ctx, q, k, ks, v, W, mask, cos, sin)
        if cfg.causal:
            S0, z0 = _to_internal(S0, perm), _to_internal(z0, perm)
            out, den, S, z, M, plan = causal_forward(src, rot, V, S0.reshape(B * H, r, dv), z0.reshape(B * H, r),
                                                     M0.reshape(B * H), cfg, keep_states=cfg.needs_grad)
            ctx.plan = plan
        else:
            out, den, S, z, M = bidirectional_forward(src, rot, V, r, cfg)
        ctx.out, ctx.den, ctx.final = out, den, (S, z, M)
        S = _to_user(S.view(B, H, r, dv), perm)
        z = _to_user(z.view(B, H, r), perm)
        ctx.mark_non_differentiable(M)
        return out.view(B, H, N, dv), S, z, M.view(B, H)

    @staticmethod
    def backward(ctx, dout, dS, dz, _dM):
        kind, cfg, perm, B, H = ctx.meta
        q, k, ks, v, W, mask, cos, sin = ctx.saved_tensors
        src, rot, V = _prepare(ctx, q, k, ks, v, W, mask, cos, sin)
        out, den, (S, z, M) = ctx.out, ctx.den, ctx.final
        dout = torch.zeros_like(out) if dout is None else dout.reshape(out.shape)
        r = S.shape[1]
        if cfg.causal:
            dS = torch.zeros_like(S) if dS is None else _to_internal(dS, perm).reshape(S.shape)
            dz = torch.zeros_like(z) if dz is None else _to_internal(dz, perm).reshape(z.shape)
            dV, dS0, dz0 = causal_backward(src, rot, V, out, den, dout, dS, dz, ctx.plan, cfg)
            dS0 = _to_user(dS0.view(B, H, r, -1), perm)
            dz0 = _to_user(dz0.view(B, H, r), perm)
        else:
            dV, dS0, dz0 = bidirectional_backward(src, rot, V, out, den, dout, S, z, M, cfg), None, None
        shape = lambda t, like: None if t is None else t.view(like.shape)  # noqa: E731
        return (None, None, None, shape(src.dq, q), shape(src.dk, k), shape(src.dks, ks), dV.view(v.shape),
                None, None, None, None, dS0, dz0, None)


def _prepare(ctx, q, k, ks, v, W, mask, cos, sin):
    kind, cfg, perm, B, H = ctx.meta
    rot = None if cos is None else Rotation(cos, sin)
    if kind == "favor":
        src = FavorFeatures(q, k, W if perm is None else W[perm], mask, H)
    else:
        src = GivenFeatures(q, k, ks, mask, H, perm)
    return src, rot, v


def _to_internal(t: Tensor, perm: Tensor | None) -> Tensor:
    """State in the caller's feature order -> the engine's (interleaved) order. Features are dim 2."""
    return t if perm is None else t.index_select(2, perm)


def _to_user(t: Tensor, perm: Tensor | None) -> Tensor:
    return t if perm is None else t.index_select(2, torch.argsort(perm))
