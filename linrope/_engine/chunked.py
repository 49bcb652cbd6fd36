"""The chunked engine behind ``linear_attention`` and ``favor_attention`` (private; use ``linrope.functional``).

Features come from ``feature_sources.py`` beside this file, a group at a time.

Shapes: B batch, H heads (flattened here to BH), N positions, r features, dv value dim, C chunk size, G
positions per group.

What is computed (RoFormer eq. 19 with keys carried as a bounded feature times exp(log-scale))::

    num_t = sum_{n<=t} (R_t fq_t) . (R_n k0_n) v_n,    den_t = sum_{n<=t} fq_t . k0_n,
    out_t = num_t / den_t   (0 where den_t == 0: the row sees no key)

How, and why:

* Positions go through in *groups* (G a multiple of C, or one chunk shorter than C). A group's features are
  computed into reused buffers, used and dropped; the backward recomputes them group by group, newest first,
  from the state saved at each group start: O(N (d + dv) + N/G r dv) memory, never N x r.
* Inside a group the chunks are batched: intra-chunk masked products, the state entering each chunk (a short
  scan over chunks), ``baddbmm`` for the inter-chunk term. torch.cumsum is avoided: along a non-innermost dim
  it runs 30-80x slower than an elementwise pass on CPU; short Python scans over slices are cheaper.
* The normalizer is never rotated. Without RoPE it is the row sum of the masked score matrix (free); with RoPE
  it is fq . (running key sum): masked unrotated products within sub-chunks of up to 32 positions (which also
  give the distance-0 terms below) and a short scan of key sums across them.
* The rotation runs on interleaved pairs viewed as complex numbers: one complex multiply, a single memory pass,
  where cos/sin arithmetic takes four. With the half-split pairing the feature order is permuted on the way in
  (projection rows, or feature columns) and states on the way out: dot products, hence outputs, do not depend
  on the order of features.
* Key magnitudes: keys arrive as (u, logscale) with k0 = exp(u - h - P) (FAVOR+) or f exp(logscale - P). P, the
  reference of a group, is the running max M of the log-scales of earlier keys, or the group's first key if that
  is larger (or if there is no earlier key): every row of the group sees a key whose factor is exactly 1, so no
  row's normalizer is scaled towards zero by keys it cannot see (causal: an output never looks at a later key).
  A key exceeding P by more than JUMP_LIMIT splits the group (the key starts a group of its own). The running
  state is kept relative to M and rescaled by exp(M - P) <= 1 at each group start. Factors shared by a row's
  numerator and normalizer cancel, so the normalizer is never clamped: a row divides by what it sums, and only
  rows that see no key at all (normalizer exactly 0) return 0.
* Distance 0: the rotations cancel in exact arithmetic, so the causal score matrix takes fq_t . k0_t (the
  normalizer's own diagonal) instead of R_t fq_t . R_t k0_t, whose float32 rounding is eps |fq_t| |k0_t|: far
  above fq_t . k0_t when, at large activations, a query's and a key's features weigh on different members of
  the pairs. Every other term is rounded to eps |fq_t| |k0_n| too, but there the rotation is real signal.
* Inputs stay in their dtype (half stays half, which is what autograd keeps); each group is cast to the compute
  dtype (float32, float64 for float64 input) in the workspace, and autocast is off inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import compiled, parallel, products, triton_kernels
from .feature_sources import (LOG_DTYPE, NEG, AngleRotation, FavorFeatures, GivenFeatures, Rotation, Workspace,
                              group_rows, interleaved_order)

JUMP_LIMIT = 40.0  # exp(40) ~ 2e17 leaves ~1e21 of float32 headroom for sums over keys, features and values
DEN_CHUNK = 32  # sub-chunk of the unrotated normalizer under RoPE (a divisor of the chunk is used); measured best


@dataclass(frozen=True)
class EngineConfig:
    causal: bool
    chunk_size: int
    group_size: int
    dtype: torch.dtype  # compute dtype of features, states and normalizer
    needs_grad: bool = True  # False: nothing will be differentiated, keep no state for a backward
    kernel: str = "torch"  # the causal chunk products: "torch" (batched matmuls) or "triton" (triton_kernels.py)
    precision: str = "float32"  # of the attention products (``products.py``): "float32", "tf32" or "bfloat16"


@dataclass
class Group:
    """One group [a, b) of the causal forward, as the backward replays it. Tensors are (BH,) or states."""

    a: int
    b: int
    ref: Tensor | None  # P: the log-scale reference of the group's keys (None: keys carry no log-scale)
    rescale_in: Tensor | None  # exp(M - P), applied to the state entering the group
    rescale_out: Tensor | None  # exp(P - M'), applied to the state leaving it (M' the new running max)
    S0: Tensor | None = None  # (BH, r, dv) state entering the group, kept for every other group
    z0: Tensor | None = None  # (BH, r)
    diag: Tensor | None = None  # (BH, G) with RoPE: the distance-0 products (a view of one (BH, N) tensor)


def empty_state(B: int, H: int, r: int, dv: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """The causal state before any key: numerator (B, H, r, dv) and key sum (B, H, r) zero, reference NEG."""
    S = torch.zeros(B, H, r, dv, dtype=dtype, device=device)
    return S, S.new_zeros(B, H, r), S.new_full((B, H), NEG, dtype=LOG_DTYPE)


def _groups(N: int, G: int) -> list[tuple[int, int]]:
    """Positions [0, N) as groups [a, b) of G positions (the last one shorter)."""
    return [(a, min(a + G, N)) for a in range(0, N, G)]


# ---------------------------------------------------------------------------------------------- one group
_TRIL: dict = {}


def _tril(C: int, like: Tensor) -> Tensor:
    key = (C, like.dtype, like.device)
    if key not in _TRIL:
        _TRIL[key] = torch.ones(C, C, dtype=like.dtype, device=like.device).tril()
    return _TRIL[key]


# The scans below are Python loops over slices on a CPU; ``unbind`` makes all the slices in one call, which
# halves the per-step overhead that dominates them. On a GPU each slice is a kernel launch (~5-10 us, far more than
# the add), so there they are one torch.cumsum, which is a single fast kernel.
def _loop_scans(X: Tensor) -> bool:
    return X.device.type == "cpu"


def _exclusive_scan(X: Tensor, init: Tensor, out: Tensor, end: bool = True) -> Tensor | None:
    """out[:, c] = init + sum_{c' < c} X[:, c'] along dim 1; returns init + sum of all X (a new tensor), or
    None with ``end=False`` (the backward's replay of the forward, which does not need it)."""
    if not _loop_scans(X):
        out[:, 0].copy_(init)
        if X.shape[1] > 1:
            torch.cumsum(X[:, :-1], 1, out=out[:, 1:]).add_(init.unsqueeze(1))
        return out[:, -1] + X[:, -1] if end else None
    xs, os = X.unbind(1), out.unbind(1)
    os[0].copy_(init)
    for c in range(1, len(xs)):
        torch.add(os[c - 1], xs[c - 1], out=os[c])
    return os[-1] + xs[-1] if end else None


def _reverse_scan(X: Tensor, init: Tensor, out: Tensor, end: bool = True) -> Tensor | None:
    """out[:, c] = init + sum_{c' > c} X[:, c'] along dim 1; returns init + sum of all X (None with ``end=False``)."""
    if not _loop_scans(X):
        out[:, -1].copy_(init)
        if X.shape[1] > 1:
            rev = torch.cumsum(X[:, 1:].flip(1), 1).flip(1)  # sums from the end
            torch.add(rev, init.unsqueeze(1), out=out[:, :-1])
        return out[:, 0] + X[:, 0] if end else None
    xs, os = X.unbind(1), out.unbind(1)
    os[-1].copy_(init)
    for c in range(len(xs) - 2, -1, -1):
        torch.add(os[c + 1], xs[c + 1], out=os[c])
    return os[0] + xs[0] if end else None


def _key_sums(ws, k0, z, sub: int) -> tuple[Tensor, Tensor]:
    """zst (BH, G/sub, r): the unrotated key sum entering each sub-chunk of ``sub`` positions, and z after."""
    BH, G, r = k0.shape
    ns = G // sub
    ksum = ws.get("ksum", BH, ns, r)
    torch.sum(k0.view(BH, ns, sub, r), 2, out=ksum)
    zst = ws.get("zst", BH, ns, r)
    return zst, _exclusive_scan(ksum, z, zst)


def _normalizer(ws, fq, k0, z, sub: int, D: Tensor | None = None):
    """den_t = fq_t . z_t with z_t the unrotated key sum up to t, in sub-chunks of ``sub`` positions.

    Within a sub-chunk: row sums of the masked product fq k0^T (``D``, or the score matrix of the chunks when
    there is no RoPE); before it: fq_t . (key sum at the sub-chunk start), a short scan over sub-chunks. Small
    sub-chunks keep the extra product cheap where RoPE makes it necessary. Returns den (BH, G) and z after.
    """
    BH, G, r = fq.shape
    ns = G // sub
    Qs, Ks = fq.view(BH * ns, sub, r), k0.view(BH * ns, sub, r)
    if D is None:
        D = ws.get("D", BH * ns, sub, sub)
        torch.bmm(Qs, Ks.transpose(1, 2), out=D).mul_(_tril(sub, D))
    zst, z_end = _key_sums(ws, k0, z, sub)
    den = torch.baddbmm(D.sum(-1, keepdim=True), Qs, zst.view(BH * ns, r, 1))  # (BH*ns, sub, 1)
    return den.view(BH, G), z_end, D


def _normalizer_backward(ws, fq, k0, z, dden, dz, sub: int, dfq, dk0, intra: bool, ddiag: Tensor | None = None):
    """Adds the normalizer's share of the gradients to dfq, dk0 (BH, G, r) in place; returns dz before.

    ``intra=False`` when the within-sub-chunk part already went through the score matrix (no RoPE). ``ddiag``
    (BH, G): the gradient of the numerator's unrotated distance-0 products fq_t . k0_t, which are the diagonal
    of the same sub-chunk products (so it rides along in their gradient, no extra pass).
    """
    BH, G, r = fq.shape
    ns = G // sub
    Qs, Ks = fq.view(BH * ns, sub, r), k0.view(BH * ns, sub, r)
    zst, _ = _key_sums(ws, k0, z, sub)
    dd = dden.view(BH * ns, sub, 1)
    wsum = torch.bmm(dd.transpose(1, 2), Qs).view(BH, ns, r)  # d (key sum at each sub-chunk start)
    dks = ws.get("dks", BH, ns, r)
    dz_in = _reverse_scan(wsum, dz, dks)  # the keys of a sub-chunk feed every later one and z after
    if intra:
        dD = torch.mul(_tril(sub, fq), dd, out=ws.get("dD", BH * ns, sub, sub))  # d den_t / d D_tn, n <= t
        if ddiag is not None:
            dD.diagonal(0, 1, 2).add_(ddiag.view(BH * ns, sub))
        dfq.view(BH * ns, sub, r).baddbmm_(dD, Ks)
        dk0.view(BH * ns, sub, r).baddbmm_(dD.transpose(1, 2), Qs)
    dfq.view(BH * ns, sub, r).baddbmm_(dd, zst.view(BH * ns, 1, r))
    dk0.view(BH, ns, sub, r).add_(dks.unsqueeze(2))
    return dz_in


def _chunk_products(ws, fq, qr, k0, kr, V, S, C: int, end: bool = True, precision: str = "float32"):
    """What both passes over a group start from: the chunks Qc, Kc (BH*nc, C, r) (rotated with RoPE) and Vc
    (BH*nc, C, dv); Sst (BH, nc, r, dv), the state entering each chunk; A (BH*nc, C, C), the causal scores
    Qc Kc^T within each chunk; and S after the group (None with ``end=False``)."""
    BH, G, r = fq.shape
    nc, dv = G // C, V.shape[-1]
    rope = qr is not None
    Qc = (qr if rope else fq).view(BH * nc, C, r)
    Kc = (kr if rope else k0).view(BH * nc, C, r)
    Vc = V.view(BH * nc, C, dv)
    KV = ws.get("KV", BH, nc, r, dv)
    products.bmm(Kc.transpose(1, 2), Vc, precision, out=KV.view(BH * nc, r, dv))
    Sst = ws.get("Sst", BH, nc, r, dv)
    S_end = _exclusive_scan(KV, S, Sst, end)
    A = ws.get("A", BH * nc, C, C)
    products.bmm(Qc, Kc.transpose(1, 2), precision, out=A).mul_(_tril(C, A))
    return Qc, Kc, Vc, Sst, A, S_end


def _distance0(D: Tensor, pq: Tensor | None, k0: Tensor) -> Tensor:
    """The distance-0 products (BH, G): the diagonal of the normalizer's sub-chunk products D = fq k0^T, or, with
    a learned phase, pq_t . k0_t."""
    BH, G, _ = k0.shape
    return D.diagonal(0, 1, 2).reshape(BH, G) if pq is None else torch.linalg.vecdot(pq, k0)


def _kernel_chunk(C: int) -> int:
    """The Triton kernels' chunk for a group chunked by C: C, or (a group shorter than the chunk size) the power
    of two >= 16 holding it."""
    return max(16, 1 << (C - 1).bit_length())


def group_forward(ws, fq, qr, k0, kr, V, S, z, C: int, sub: int, pq=None, diag_out=None, kernel="torch",
                  precision="float32"):
    """Causal eq. 19 over one group (chunks of C, normalizer sub-chunks of sub | C). qr/kr None without RoPE;
    pq: R_phase fq when queries turn by a learned phase more than keys (their distance-0 product is pq . k0).
    diag_out (BH, G): with RoPE, receives the distance-0 products, which the backward then reads instead of
    recomputing them (a pass over the group's features). kernel: "torch" or "triton" (``EngineConfig.kernel``);
    precision: of the attention products (``products.py``).

    Returns num (BH, G, dv), den (BH, G), and S, z after the group.
    """
    BH, G, r = fq.shape
    nc, dv = G // C, V.shape[-1]
    rope = qr is not None
    if kernel == "triton":  # the same sums, the chunk products fused on the GPU; the normalizer as below
        den, z_end, D = _normalizer(ws, fq, k0, z, sub)
        diag = _distance0(D, pq, k0) if rope else None
        if diag_out is not None:
            diag_out.copy_(diag)
        num, S_end, _ = triton_kernels.chunk_forward(qr if rope else fq, kr if rope else k0, V, S, diag,
                                                     _kernel_chunk(C), store_h=False)
        return num, den, S_end, z_end
    Qc, Kc, Vc, Sst, A, S_end = _chunk_products(ws, fq, qr, k0, kr, V, S, C, precision=precision)
    if not rope and precision != "float32":  # the normalizer stays float32: its own products, not A's
        den, z_end, _ = _normalizer(ws, fq, k0, z, sub)
    elif rope:
        den, z_end, D = _normalizer(ws, fq, k0, z, sub)
        # at distance 0 the rotations cancel: take fq_t . k0_t unrotated (the normalizer's diagonal) instead of
        # R_t fq_t . R_t k0_t, whose float32 rounding is eps |fq_t| |k0_t|, far above fq_t . k0_t when a query's
        # and a key's features sit in different members of the pairs (large activations); with a learned phase
        # only the phase is left there: (R_phase fq_t) . k0_t, each pair's term rounded to its own size
        A.diagonal(0, 1, 2).copy_(_distance0(D, pq, k0).view(BH * nc, C))
        if diag_out is not None:
            diag_out.view(BH, nc, C).copy_(A.diagonal(0, 1, 2).view(BH, nc, C))
    else:
        den, z_end, _ = _normalizer(ws, fq, k0, z, C, D=A)  # no RoPE: A is fq k0^T
    num = ws.get("num", BH * nc, C, dv)
    products.baddbmm_(products.bmm(A, Vc, precision, out=num), Qc, Sst.view(BH * nc, r, dv), precision)
    return num.view(BH, G, dv), den, S_end, z_end


def group_backward(ws, fq, qr, k0, kr, V, S, z, g, dden, dS, dz, C: int, sub: int, unrotate=None, pq=None,
                   learned=None, diag=None, kernel="torch", precision="float32"):
    """Gradients of ``group_forward`` given g = d num (BH, G, dv), dden (BH, G) and those of (S, z) after;
    ``diag`` (BH, G): with RoPE, the distance-0 products the forward wrote (``group_forward``'s ``diag_out``).

    Returns (d fq, d k0, d V, dS, dz before): the feature gradients w.r.t. the *unrotated* features (the
    rotated parts pass through ``unrotate(x, out, is_key)``, R^T). They live in workspace buffers. ``learned``: with
    learned angles, ``learned.rotated(dqr, dkr)`` receives the gradients of the rotated features and
    ``learned.phase`` the query rotation (its phase turns pq = R_phase fq, the distance-0 side).
    """
    rope = qr is not None
    if kernel == "triton":  # the chunk products' gradients fused; the normalizer's all in _normalizer_backward
        dQ, dK, dVg, dS_in, ddiag = triton_kernels.chunk_backward(qr if rope else fq, kr if rope else k0, V, S,
                                                                  diag if rope else None, None, g, dS,
                                                                  _kernel_chunk(C))
        intra, nsub = True, sub
    else:
        dQ, dK, dVg, dS_in, ddiag = _chunk_backward(ws, fq, qr, k0, kr, V, S, g, dden, dS, C, diag, precision)
        # no RoPE in float32: the normalizer's within-chunk part went through dA
        intra = rope or precision != "float32"
        nsub = sub if intra else C
    if rope:
        if learned is not None:
            learned.rotated(dQ, dK)
        dQ = unrotate(dQ, ws.get("dfq", *dQ.shape), False)
        dK = unrotate(dK, ws.get("dk0", *dK.shape), True)
    dz_in = _normalizer_backward(ws, fq, k0, z, dden, dz, nsub, dQ, dK, intra=intra,
                                 ddiag=ddiag if pq is None else None)
    if pq is not None:  # d (pq_t . k0_t): into k0, and into fq and the phase through pq = R_phase fq
        gpq = torch.mul(k0, ddiag.unsqueeze(-1), out=ws.get("gpq", *k0.shape))
        dK.addcmul_(pq, ddiag.unsqueeze(-1))
        learned.phase.phase_grad(gpq, pq)
        dQ.add_(learned.phase.phase_only(gpq, ws.get("tmp", *k0.shape), inverse=True))
    return dQ, dK, dVg, dS_in, dz_in


def _chunk_backward(ws, fq, qr, k0, kr, V, S, g, dden, dS, C: int, diag, precision="float32"):
    """``group_backward``'s chunk products with batched matmuls: the gradients of the (rotated, with RoPE) query
    and key features, of V and of the state entering the group, and, with RoPE, of the distance-0 products."""
    BH, G, r = fq.shape
    nc, dv = G // C, V.shape[-1]
    rope = qr is not None
    # as the forward had them
    Qc, Kc, Vc, Sst, A, _ = _chunk_products(ws, fq, qr, k0, kr, V, S, C, end=False, precision=precision)
    Gc = g.view(BH * nc, C, dv)
    tril = _tril(C, fq)
    dA = ws.get("dA", BH * nc, C, C)
    products.bmm(Gc, Vc.transpose(1, 2), precision, out=dA)
    if not rope and precision == "float32":
        dA.add_(dden.view(BH * nc, C, 1))  # den_t = sum_{n<=t} A_tn + ...
    dA.mul_(tril)
    ddiag = None
    if rope:  # the diagonal is fq_t . k0_t, unrotated (see group_forward): its gradient bypasses the rotation
        A.diagonal(0, 1, 2).view(BH, nc, C).copy_(diag.view(BH, nc, C))
        ddiag = dA.diagonal(0, 1, 2).clone().view(BH, G)
        dA.diagonal(0, 1, 2).zero_()
    dQ = ws.get("dQ", BH, G, r)
    products.baddbmm_(products.bmm(dA, Kc, precision, out=dQ.view(BH * nc, C, r)), Gc,
                      Sst.view(BH * nc, r, dv).transpose(1, 2), precision)
    dSst = ws.get("dSst", BH, nc, r, dv)
    products.bmm(Qc.transpose(1, 2), Gc, precision, out=dSst.view(BH * nc, r, dv))
    dKV = ws.get("dKV", BH, nc, r, dv)
    dS_in = _reverse_scan(dSst, dS, dKV)
    dK = ws.get("dK", BH, G, r)
    products.baddbmm_(products.bmm(dA.transpose(1, 2), Qc, precision, out=dK.view(BH * nc, C, r)), Vc,
                      dKV.view(BH * nc, r, dv).transpose(1, 2), precision)
    dVg = ws.get("dV", BH, G, dv)
    products.baddbmm_(products.bmm(A.transpose(1, 2), Gc, precision, out=dVg.view(BH * nc, C, dv)), Kc,
                      dKV.view(BH * nc, r, dv), precision)
    return dQ, dK, dVg, dS_in, ddiag


# ---------------------------------------------------------------------------------------------- causal driver
def _phase_side(rot, fq, ws):
    """R_phase fq when queries turn by a learned phase beyond the keys' angle (else None)."""
    if isinstance(rot, AngleRotation) and rot.phase is not None:
        return rot.phase_only(fq, ws.get("pq", *fq.shape))
    return None


@dataclass
class _AngleGrads:
    """What ``group_backward`` reports the rotated features' gradients to, with learned angles."""

    phase: AngleRotation  # the queries' rotation (its phase turns the distance-0 side)
    keys: AngleRotation
    qr: Tensor
    kr: Tensor
    a: int
    b: int

    def rotated(self, dqr: Tensor, dkr: Tensor) -> None:
        self.phase.grad(dqr, self.qr, self.a, self.b)
        self.keys.grad(dkr, self.kr, self.a, self.b)


def _rescale(S: Tensor, z: Tensor, e: Tensor, owned: bool) -> tuple[Tensor, Tensor]:
    """(S e, z e) per row, e (BH,): in place when the engine ``owned`` S and z (fresh results of its own that
    nothing else holds: a new tensor is a new allocation, whose pages the OS faults in on first touch, about as
    slow as the multiply itself for a (BH, r, dv) state), else new tensors (the caller's state)."""
    if owned:
        return S.mul_(e[:, None, None]), z.mul_(e[:, None])
    return S * e[:, None, None], z * e[:, None]


def _first_valid(logscale: Tensor) -> Tensor:
    """The log-scale of the first valid (not NEG) key of each row of ``logscale`` (BH, G); NEG if none."""
    idx = (logscale > NEG / 2).to(torch.uint8).argmax(-1, keepdim=True)
    return logscale.gather(-1, idx).squeeze(-1)


def _causal_ref(M: Tensor, logscale: Tensor) -> Tensor:
    """P of a causal group: max(M, the group's first key), else its first valid key, else 0 (no key at all).

    Taking the first *position* (not the first valid key) keeps the rows before a late key referred to the keys
    they do see; every row of the group then sees a key whose factor exp(logscale - P) is 1, or sees none.
    """
    P = torch.maximum(M, logscale[:, 0])
    P = torch.where(P > NEG / 2, P, _first_valid(logscale))
    return torch.where(P > NEG / 2, P, torch.zeros_like(P))


def _rotated(rot, x, a, b, ws, name):
    return None if rot is None else rot(x, a, b, ws.get(name, *x.shape))


def _group_features(src, rot, ws, a, b, P=None, M=None, tag=""):
    """Key features of [a, b) at reference P (or, if P is None, the causal reference from M), in the workspace
    buffers named with ``tag``. Returns (k0, kr, logscale, P, jumps), jumps (G,) marking keys that exceed P by
    more than JUMP_LIMIT.
    """
    BH, G, r = src.BH, b - a, src.r
    u, logscale = src.key_logscale(a, b, ws.get("k0" + tag, BH, G, r))
    jumps = None
    if logscale is not None and P is None:
        P = _causal_ref(M, logscale)
        jumps = ((logscale - P[:, None]) > JUMP_LIMIT).any(0)
    k0 = src.key_finish(a, b, u, logscale, P, ws.get("k0" + tag, BH, G, r))
    return k0, _rotated(rot, k0, a, b, ws, "kr" + tag), logscale, P, jumps


def _query_features(src, rot, ws, a, b, r):
    fq = src.query(a, b, ws.get("fq", src.BH, b - a, r))
    return fq, _rotated(rot, fq, a, b, ws, "qr")


def _divide(num: Tensor, den: Tensor, out: Tensor) -> None:
    """out = num / den row by row, 0 where den == 0: a row that sees no key, or (features of your own) one whose
    features are orthogonal to every key it sees, whose rotated numerator need not vanish: 0 is the convention."""
    empty = den == 0
    torch.div(num, torch.where(empty, 1, den).unsqueeze(-1), out=out)
    out.masked_fill_(empty.unsqueeze(-1), 0)


def _output_grads(out, den, dout, buf):
    """g = d num = dout / den (into the contiguous ``buf``: dout may come with any strides and dtype) and
    d den = -(dout . out) / den; both 0 on rows that returned 0 for want of keys."""
    empty = den == 0
    denc = torch.where(empty, 1, den)
    g = torch.div(dout, denc.unsqueeze(-1), out=buf).masked_fill_(empty.unsqueeze(-1), 0)
    dden = (g * out).sum(-1).neg_()
    return g, dden


def _confine(k0: Tensor, kr: Tensor | None, V: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """A group's keys and values with non-finite rows (a NaN or inf key feature or value) set to 0, and the first
    such position per row of BH (G where none), or None when all are finite: the caller computes the rows before it
    without them and marks the others NaN, as the float64 definition gives them (a causal row never sees a later
    position, a non-finite one included)."""
    bad = ~(torch.isfinite(k0).all(-1) & torch.isfinite(V).all(-1))
    if kr is not None:
        bad |= ~torch.isfinite(kr).all(-1)
    if not bool(bad.any()):
        return k0, kr, V, None
    G = k0.shape[1]
    first = torch.where(bad, torch.arange(G, device=k0.device), G).amin(-1)
    keep = (torch.arange(G, device=k0.device) < first[:, None]).unsqueeze(-1)
    zero = lambda x: None if x is None else torch.where(keep, x, 0)  # noqa: E731  (0 * nan would stay nan)
    return zero(k0), zero(kr), zero(V), first


def causal_forward(src, rot, V, S, z, M, cfg: EngineConfig, keep_states: bool = True, rot_k=None):
    """Run all groups; returns outputs (BH, N, dv) in V's dtype, den, the final (S, z, M) and the plan (a list
    of ``Group``) the backward replays (without the group states when ``keep_states`` is False). Queries turn
    by ``rot``, keys by ``rot_k`` (default: the same; learned angles: the queries' add a phase).

    Key jumps (a key exceeding its group's reference by more than JUMP_LIMIT) split groups, a decision that
    needs the values on the host: asking per group would stall a GPU once per group. So the groups run
    optimistically, the jump flags gathered on the device, and one read at the end (the engine's only host
    synchronisation, one per call) says whether a jump occurred; only then does the call run again, splitting
    groups at jumps as it goes (rare: keys whose log-scales rise by more than 40 within a group).

    The same flag records a non-finite state after a group: a NaN or inf key or value, which the chunk products
    would spread to the earlier rows of its chunk (0 * nan = nan). The second pass then confines it
    (``_confine``): rows before the first such position compute without it, the rest of that (batch, head) is NaN.
    """
    first = _causal_pass(src, rot, V, S, z, M, cfg, keep_states, rot_k, split=False)
    jumped = first[-1]
    if jumped is None or not bool(jumped):
        return first[:-1]
    del first  # its outputs are void; free its plan's states before the second pass
    return _causal_pass(src, rot, V, S, z, M, cfg, keep_states, rot_k, split=True)[:-1]


def _causal_pass(src, rot, V, S, z, M, cfg: EngineConfig, keep_states, rot_k, split: bool):
    """``causal_forward``'s pass over the groups; ``split``: split groups at key jumps (host reads per group), else
    run them as planned and return, last, a device flag of whether any group had a jump (None: keys carry no
    log-scale)."""
    rot_k = rot if rot_k is None else rot_k
    B, H, N, dv = V.shape
    BH = B * H
    r = S.shape[1]
    ws = Workspace(V.device, cfg.dtype)
    out, den = V.new_empty(BH, N, dv), S.new_empty(BH, N)
    diag = S.new_empty(BH, N) if keep_states and rot is not None else None
    plan: list[Group] = []
    C0 = cfg.chunk_size
    owned = False  # S, z are the caller's until the first group returns the engine's own
    jumped = None
    work = _groups(N, cfg.group_size)[::-1]  # a stack: groups pop in order, split ones push their halves
    while work:
        a, b = work.pop()
        if (b - a) > C0 and (b - a) % C0:  # whole chunks, then one short chunk
            cut = a + (b - a) // C0 * C0
            work.extend(((cut, b), (a, cut)))
            continue
        k0, kr, logscale, P, jumps = _group_features(src, rot_k, ws, a, b, M=M)
        if jumps is not None and b - a > 1:
            if not split:
                jumped = jumps[1:].any() if jumped is None else jumped | jumps[1:].any()
            elif bool(jumps[1:].any()):
                # the rows before the first jumping key keep P; that key starts a group whose P is its own
                t = a + 1 + int(jumps[1:].nonzero()[0])
                work.extend(((t, b), (a, t)))
                continue
        first_bad = None
        if split:  # a non-finite key or value is seen by its own row and the later ones only
            k0, kr, Vg, first_bad = _confine(k0, kr, group_rows(V, a, b, ws.get("v", BH, b - a, dv)))
        group = Group(a, b, P, None, None)
        if P is not None:
            group.rescale_in = torch.exp(M - P).to(cfg.dtype)
            S, z = _rescale(S, z, group.rescale_in, owned)
        if keep_states and len(plan) % 2 == 0:  # the backward rebuilds the other states from the one before
            group.S0, group.z0 = S, z
        plan.append(group)
        if diag is not None:
            group.diag = diag[:, a:b]
        fq, qr = _query_features(src, rot, ws, a, b, r)
        if first_bad is None:
            Vg = group_rows(V, a, b, ws.get("v", BH, b - a, dv))
        C = min(C0, b - a)
        num, d, S, z = group_forward(ws, fq, qr, k0, kr, Vg, S, z, C, math.gcd(DEN_CHUNK, C),
                                     _phase_side(rot, fq, ws), group.diag, cfg.kernel, cfg.precision)
        owned = True  # the group's end state is new (stored states are never the one rescaled later)
        den[:, a:b] = d
        _divide(num, d, out[:, a:b])
        if first_bad is not None:
            after = torch.arange(b - a, device=V.device) >= first_bad[:, None]  # (BH, G): rows that see it
            out[:, a:b].masked_fill_(after.unsqueeze(-1), math.nan)
            den[:, a:b].masked_fill_(after, math.nan)
            hit = after[:, -1]
            S, z = S.masked_fill(hit[:, None, None], math.nan), z.masked_fill(hit[:, None], math.nan)
        elif not split:
            finite = torch.isfinite(S).all() & torch.isfinite(z).all()
            jumped = ~finite if jumped is None else jumped | ~finite
        if P is not None:  # M follows real keys only (a group without any keeps M, and P was a stand-in)
            M = torch.maximum(M, logscale.amax(-1))
            group.rescale_out = torch.exp(P - torch.where(M > NEG / 2, M, P)).to(cfg.dtype)
            S, z = _rescale(S, z, group.rescale_out, owned)
    return out, den, S, z, M, plan, jumped


def causal_backward(src, rot, V, out, den, dout, dS, dz, plan: list[Group], cfg: EngineConfig, rot_k=None):
    rot_k = rot if rot_k is None else rot_k
    learned = isinstance(rot, AngleRotation)
    B, H, N, dv = V.shape
    BH = B * H
    r = dS.shape[1]
    ws = Workspace(V.device, cfg.dtype)
    dV = V.new_empty(BH, N, dv)
    ahead = None  # key features of the next group to process, computed early to rebuild a state
    owned = False  # dS, dz are autograd's until the first group returns the engine's own
    for i in range(len(plan) - 1, -1, -1):
        grp = plan[i]
        a, b, P = grp.a, grp.b, grp.ref
        if grp.rescale_out is not None:
            dS, dz = _rescale(dS, dz, grp.rescale_out, owned)
        k0, kr, logscale = ahead if ahead is not None else _group_features(src, rot_k, ws, a, b, P=P,
                                                                           tag=str(i % 2))[:3]
        ahead = None
        S0, z0 = grp.S0, grp.z0
        if S0 is None:  # rebuild this group's start state from the previous group (whose keys we need next anyway)
            prev = plan[i - 1]
            ahead = _group_features(src, rot_k, ws, prev.a, prev.b, P=prev.ref, tag=str((i - 1) % 2))[:3]
            pk0, pkr, _ = ahead
            S0 = products.baddbmm(prev.S0, (pk0 if pkr is None else pkr).transpose(1, 2),
                                  group_rows(V, prev.a, prev.b, dtype=cfg.dtype), cfg.precision)
            z0 = prev.z0 + pk0.sum(1)
            for e in (prev.rescale_out, grp.rescale_in):
                if e is not None:
                    S0, z0 = _rescale(S0, z0, e, True)  # new from baddbmm and +
        fq, qr = _query_features(src, rot, ws, a, b, r)
        Vg = group_rows(V, a, b, ws.get("v", BH, b - a, dv))
        g, dden = _output_grads(out[:, a:b], den[:, a:b], dout[:, a:b], ws.get("g", BH, b - a, dv))
        unrotate = None if rot is None else (
            lambda x, out, key: (rot_k if key else rot)(x, a, b, out, inverse=True))
        C = min(cfg.chunk_size, b - a)
        pq = _phase_side(rot, fq, ws)
        grads = None if not learned else _AngleGrads(rot, rot_k, qr, kr, a, b)
        dfq, dk0, dVg, dS, dz = group_backward(ws, fq, qr, k0, kr, Vg, S0, z0, g, dden, dS, dz, C,
                                               math.gcd(DEN_CHUNK, C), unrotate, pq, grads, grp.diag,
                                               cfg.kernel, cfg.precision)
        dV[:, a:b] = dVg
        src.query_grad(a, b, fq, dfq)
        src.key_grad(a, b, k0, dk0, logscale, P)
        owned = True  # group_backward's dS, dz before the group are new
        if grp.rescale_in is not None:
            dS, dz = _rescale(dS, dz, grp.rescale_in, owned)
    return dV, dS, dz


# ---------------------------------------------------------------------------------------------- bidirectional
def _add_keys(src, rot_k, V, a, b, S, z, M, ws, precision="float32"):
    """Add the keys and values of positions [a, b) to the state (S, z) kept relative to M, the running max of
    the key log-scales (rescaled in place when the max grows). Returns S, z, M and P, the reference the state is
    at (M, or 0 while there is no key; None if keys carry no log-scale)."""
    BH, r, dv = S.shape
    u, logscale = src.key_logscale(a, b, ws.get("k0", BH, b - a, r))
    P = None
    if logscale is not None:
        M_new = torch.maximum(M, logscale.amax(-1))
        P = _nonneg_ref(M_new)
        e = torch.exp(M - P).to(S.dtype)
        S.mul_(e[:, None, None]), z.mul_(e[:, None])
        M = M_new
    k0 = src.key_finish(a, b, u, logscale, P, ws.get("k0", BH, b - a, r))
    kr = _rotated(rot_k, k0, a, b, ws, "kr")
    Vg = group_rows(V, a, b, ws.get("v", BH, b - a, dv))
    products.baddbmm_(S, (k0 if kr is None else kr).transpose(1, 2), Vg, precision)
    z.add_(k0.sum(1))
    return S, z, M, P


def _nonneg_ref(M: Tensor) -> Tensor:
    """The reference of a state at running max M: M, or 0 while it holds no key (M == NEG)."""
    return torch.where(M > NEG / 2, M, torch.zeros_like(M))


def key_state(src, rot_k, V, S, z, M, cfg: EngineConfig):
    """Add the keys and values of V's N positions (keys rotated by ``rot_k``) to the state (S, z) kept relative
    to M, the running max of the key log-scales: S (BH, r, dv), z (BH, r), M (BH,), updated in place. Returns
    S, z, M and P, the reference the state ends at (M, or 0 while there is no key; None if keys carry no
    log-scale)."""
    ws = Workspace(V.device, cfg.dtype)
    P = None
    for a, b in _groups(V.shape[2], cfg.group_size):
        S, z, M, P = _add_keys(src, rot_k, V, a, b, S, z, M, ws, cfg.precision)
    return S, z, M, P


def _segments(N: int, G: int, C: int) -> list[tuple[int, int]]:
    """Groups of G positions, each cut into whole chunks of C and one shorter chunk, as the causal pass cuts them."""
    out = []
    for a, b in _groups(N, G):
        cut = a + (b - a) // C * C
        out.extend(((a, cut), (cut, b)) if b - a > C and cut < b else ((a, b),))
    return out


def _two_sided_scan(X: Tensor, init: Tensor, out: Tensor) -> Tensor:
    """out[:, c] = init + sum_{c' != c} X[:, c'] along dim 1, from a suffix and a prefix scan: X[:, c] is never
    added and subtracted back out, which would leave its rounding in what chunk c reads. Returns sum_c X[:, c]."""
    _reverse_scan(X, init, out, end=False)
    if not _loop_scans(X):
        if X.shape[1] > 1:
            out[:, 1:] += torch.cumsum(X[:, :-1], 1)
        return X.sum(1)
    xs, os = X.unbind(1), out.unbind(1)
    acc = xs[0].clone()
    for c in range(1, len(xs)):
        os[c].add_(acc)
        acc.add_(xs[c])
    return acc


def _two_sided_forward(src, rot, V, S, z, M, cfg: EngineConfig):
    """Bidirectional eq. 19 with RoPE where each row reads a state that never held its own key, so its distance-0
    term is the unrotated fq_t . k0_t, as in the causal path: R_t fq_t . R_t k0_t read from a state is rounded to
    eps |fq_t| |k0_t|, all of a row's digits when its own key dominates it and the two weigh on different members of
    the pairs (large activations). Subtracting the own term from a total state would leave that rounding in place.

    Two sweeps over segments (``_segments``): newest first, the state of the keys after each segment is kept (one
    (BH, r, dv) state per segment, like the causal plan's); then in order, a segment's chunks read those plus the
    keys before the segment plus the segment's other chunks (``_two_sided_scan``), and their own chunk through its
    scores with the distance-0 products unrotated. About twice the one-sweep forward (see BENCHMARKS.md); the
    backward is the one-sweep one (``bidirectional_backward``)."""
    BH, r, dv = S.shape
    N = V.shape[2]
    ws = Workspace(V.device, cfg.dtype)
    segs = _segments(N, cfg.group_size, cfg.chunk_size)
    # S starts as the incoming state (other ranks' keys), a copy; a state is relative to its running max M, NEG
    # while it holds no key (then it is 0, and so is its factor below: its stand-in reference 0 could overflow it)
    after, refs, P = [], [], None
    for a, b in reversed(segs):
        after.append(S.clone())
        refs.append(M)
        S, z, M, P = _add_keys(src, rot, V, a, b, S, z, M, ws, cfg.precision)
    after, refs = after[::-1], refs[::-1]
    if P is not None:  # every state to the final reference (the running max only grew)
        for s, ref in zip(after, refs):
            s.mul_(torch.exp(ref - P).to(s.dtype)[:, None, None])
    out, den = V.new_empty(BH, N, dv), S.new_empty(BH, N)
    before = torch.zeros_like(S)
    for i, (a, b) in enumerate(segs):
        k0, kr, _, _, _ = _group_features(src, rot, ws, a, b, P=P)
        fq, qr = _query_features(src, rot, ws, a, b, r)
        C = min(cfg.chunk_size, b - a)
        nc = (b - a) // C
        Qc, Kc = qr.view(BH * nc, C, r), kr.view(BH * nc, C, r)
        Vc = group_rows(V, a, b, ws.get("v", BH, b - a, dv)).view(BH * nc, C, dv)
        KV = ws.get("KV", BH, nc, r, dv)
        products.bmm(Kc.transpose(1, 2), Vc, cfg.precision, out=KV.view(BH * nc, r, dv))
        Sst = ws.get("Sst", BH, nc, r, dv)
        before.add_(_two_sided_scan(KV, torch.add(before, after[i], out=ws.get("O", BH, r, dv)), Sst))
        after[i] = None
        A = products.bmm(Qc, Kc.transpose(1, 2), cfg.precision, out=ws.get("A", BH * nc, C, C))
        A.diagonal(0, 1, 2).copy_(torch.linalg.vecdot(fq, k0).view(BH * nc, C))
        num = products.baddbmm_(products.bmm(A, Vc, cfg.precision, out=ws.get("num", BH * nc, C, dv)), Qc,
                                Sst.view(BH * nc, r, dv), cfg.precision)
        d = torch.bmm(fq, z.unsqueeze(-1)).squeeze(-1)
        den[:, a:b] = d
        _divide(num.view(BH, b - a, dv), d, out[:, a:b])
    return out, den, S, z, M, P


def key_state_backward(src, rot_k, V, dS, dz, P, cfg: EngineConfig, dV: Tensor | None = None) -> Tensor:
    """Gradients of ``key_state`` given those of the final (S, z) (BH, r, dv), (BH, r): key gradients go to
    ``src``; returns dV (BH, N, dv). Given ``dV`` (sequence parallelism: this rank's keys also fed its own output),
    both are added to what is there rather than written."""
    BH, r, dv = dS.shape
    N = V.shape[2]
    ws = Workspace(V.device, cfg.dtype)
    add = dV is not None
    src.add_keys = add
    dV = V.new_empty(BH, N, dv) if dV is None else dV
    for a, b in _groups(N, cfg.group_size):  # keys, at the final reference P
        k0, kr, logscale, _, _ = _group_features(src, rot_k, ws, a, b, P=P)
        if add:
            dV[:, a:b] += products.bmm(k0 if kr is None else kr, dS, cfg.precision)
        else:
            dV[:, a:b] = products.bmm(k0 if kr is None else kr, dS, cfg.precision)
        dk0 = products.bmm(group_rows(V, a, b, ws.get("v", BH, b - a, dv)), dS.transpose(1, 2), cfg.precision)
        if kr is not None:
            dk0 = rot_k(dk0, a, b, ws.get("tmp", *dk0.shape), inverse=True)
        src.key_grad(a, b, k0, dk0.add_(dz.unsqueeze(1)), logscale, P)
    src.add_keys = False
    return dV


def bidirectional_forward(src, rot, rot_k, V, Nq: int, S, z, M, cfg: EngineConfig):
    """Bidirectional eq. 19 onto the state (S, z, M) (zero and NEG for one process; the other ranks' keys under
    sequence parallelism). Keys and values are V's N positions, rotated by ``rot_k``; queries are ``Nq``
    positions rotated by ``rot`` (cross-attention: another sequence, other positions). Returns out (BH, Nq, dv)
    in V's dtype, den (BH, Nq), the final S, z, M, reference P, and what the backward needs beyond them.

    Self-attention with RoPE takes the two-sided path (``_two_sided_forward``): a row's own key must not be read
    from a rotated state. Without RoPE, or with keys of another sequence (no key is a row's own), one sweep of the
    keys into a state, then one of the queries reading it.
    """
    if rot is not None and rot_k is rot and Nq == V.shape[2]:
        return _two_sided_forward(src, rot, V, S, z, M, cfg)
    BH, r, dv = S.shape
    S, z, M, P = key_state(src, rot_k, V, S, z, M, cfg)
    ws = Workspace(V.device, cfg.dtype)
    out, den = V.new_empty(BH, Nq, dv), S.new_empty(BH, Nq)
    for a, b in _groups(Nq, cfg.group_size):
        fq, qr = _query_features(src, rot, ws, a, b, r)
        d = torch.bmm(fq, z.unsqueeze(-1)).squeeze(-1)
        den[:, a:b] = d
        _divide(products.bmm(fq if qr is None else qr, S, cfg.precision), d, out[:, a:b])
    return out, den, S, z, M, P


def bidirectional_backward(src, rot, rot_k, V, out, den, dout, S, z, P, cfg: EngineConfig):
    """Gradients of ``bidirectional_forward``: queries first (d S, d z, query gradients), then keys. Returns dV
    and the gradients of the final S, z.

    One sweep each way, reading the total state S also on the two-sided path: the gradient of the same function,
    whose own-key terms carry rounding of eps |fq_t| |k0_t| here, as large as the terms the row's normalizer
    gradient cancels them against, so small against its gradient's scale (measured: the same errors against a
    float64 gradient as a two-sided backward at std 3 to 10)."""
    BH, r, dv = S.shape
    ws = Workspace(V.device, cfg.dtype)
    dS, dz = torch.zeros_like(S), torch.zeros_like(z)
    for a, b in _groups(out.shape[1], cfg.group_size):  # queries: d S, d z, and the query gradients
        fq, qr = _query_features(src, rot, ws, a, b, r)
        g, dden = _output_grads(out[:, a:b], den[:, a:b], dout[:, a:b], ws.get("g", BH, b - a, dv))
        products.baddbmm_(dS, (fq if qr is None else qr).transpose(1, 2), g, cfg.precision)
        dz.add_(torch.bmm(dden.unsqueeze(1), fq).squeeze(1))
        dfq = products.bmm(g, S.transpose(1, 2), cfg.precision)
        if qr is not None:
            dfq = rot(dfq, a, b, ws.get("tmp", *dfq.shape), inverse=True)
        src.query_grad(a, b, fq, dfq.baddbmm_(dden.unsqueeze(-1), z.unsqueeze(1)))
    return key_state_backward(src, rot_k, V, dS, dz, P, cfg), dS, dz


# ---------------------------------------------------------------------------------------------- autograd
@dataclass(frozen=True)
class Call:
    """What one engine call computes beyond its tensors.

    features: 'favor' (FAVOR+ computed from raw q, k and the projection, recomputed in the backward) or
    'features' (q, k are given features). interleaved: the pairing of the cos/sin tables (the engine works on
    interleaved pairs and permutes half-split ones on the way in). first_position: with learned angles at
    consecutive positions, the first one (rotations then build their factors from one table); None otherwise.
    parallel: sequence parallelism (``parallel.Parallel``), or None.
    """

    cfg: EngineConfig
    features: str
    interleaved: bool = True
    first_position: int | None = None
    parallel: parallel.Parallel | None = None


@dataclass(frozen=True)
class Inputs:
    """The tensors of one engine call, by name. Autograd needs them as positional arguments of ``apply``: they
    travel in this order (``fields``), and their gradients come back in it.

    Tensors are (B, H, N, .) in the caller's dtypes (half stays half), states (B, H, r, dv), (B, H, r), (B, H) in
    the compute dtype. The state (S0, z0, M0) is where the causal scan starts (streaming); bidirectional, it holds
    keys seen elsewhere (the other ranks under sequence parallelism), zero for one process.
    """

    q: Tensor  # (B, H, N, d) raw queries ('favor'), or (B, H, N, r) features
    k: Tensor  # the same for keys; (B, H, M, .) for cross-attention
    v: Tensor  # (B, H, N or M, dv)
    S0: Tensor  # (B, H, r, dv) numerator state, relative to exp(M0)
    z0: Tensor  # (B, H, r) key sum
    M0: Tensor  # (B, H) LOG_DTYPE reference log-scale of both
    k_logscale: Tensor | None = None  # (B, H, N) log-magnitudes of given key features; with 'favor', a log-bias
    # added to the keys' own (a gate's -G), differentiated either way
    key_bias: Tensor | None = None  # (BH, N) LOG_DTYPE added to the keys' log-scales (a decay), not differentiated
    projection: Tensor | None = None  # (r, d) 'favor'
    mask: Tensor | None = None  # (B, N) bool key padding mask, True = keep
    cos: Tensor | None = None  # (N, r/2) or (B, N, r/2): the queries' rotation (and the keys', but cross-attention)
    sin: Tensor | None = None
    key_cos: Tensor | None = None  # cross-attention: the keys' rotation at their own positions
    key_sin: Tensor | None = None
    theta: Tensor | None = None  # (H, r/2) learned frequencies (``LearnedRotary``), in place of cos/sin
    phase: Tensor | None = None  # (H, r/2) the queries' learned phase
    angle_positions: Tensor | None = None  # (N,) or (B, N) float64 positions the learned angles turn by, or
    # (B, H, N) float64 clocks (selective rotation, per head; differentiated when it requires grad)


_UNSAVED = ("S0", "z0", "M0")


def run(call: Call, x: Inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """out (B, H, Nq, dv) in v's dtype and the state after the call: S (B, H, r, dv), z (B, H, r), M (B, H)."""
    return LinearAttentionFunction.apply(call, *(getattr(x, f.name) for f in fields(Inputs)))


class LinearAttentionFunction(torch.autograd.Function):
    """``run``'s autograd Function: forward(call, *Inputs) -> out, S, z, M; the backward is hand-written (features
    recomputed group by group). Autocast is off inside: features, states and normalizer are computed in
    ``call.cfg.dtype`` whatever autocast says. Learned angles get their gradients; M is not differentiated."""

    @staticmethod
    def forward(ctx, call: Call, *tensors):
        x = Inputs(*tensors)
        cfg, v = call.cfg, x.v
        B, H, N, dv = v.shape
        r = x.projection.shape[0] if call.features == "favor" else x.q.shape[-1]
        perm = interleaved_order(r, v.device) if x.cos is not None and not call.interleaved else None
        ctx.call, ctx.perm = call, perm
        S0 = _to_internal(x.S0, perm).reshape(B * H, r, dv)
        z0, M0 = _to_internal(x.z0, perm).reshape(B * H, r), x.M0.reshape(B * H)
        par, final = call.parallel, None
        ctx.compiled = None
        with torch.autocast(v.device.type, enabled=False):
            src, rot, rot_k = _prepare(call, x, perm)
            if par is not None:  # the other ranks' keys, as the state this rank starts from (or adds)
                S0, z0, M0, final, ctx.incoming = _parallel_forward(par, src, rot_k, v, S0, z0, M0, cfg)
            if compiled.covers(call, x):  # kernel="cpp": the whole causal pass in causal_cpu.cpp
                out, den, S, z, M, ctx.compiled = compiled.causal_forward(src, x, cfg, S0, z0, M0)
            elif cfg.causal:
                out, den, S, z, M, ctx.plan = causal_forward(src, rot, v, S0, z0, M0, cfg,
                                                             keep_states=cfg.needs_grad, rot_k=rot_k)
            else:  # the state is summed into in place: a copy (S0 may be the caller's, or a view of it)
                out, den, S, z, M, ctx.ref = bidirectional_forward(src, rot, rot_k, v, x.q.shape[2], S0.clone(),
                                                                   z0.clone(), M0, cfg)
                ctx.M0 = M0
        # the starting state is not needed again (the plan keeps what the backward reads)
        ctx.save_for_backward(*(None if f.name in _UNSAVED else t for f, t in zip(fields(Inputs), tensors)), out, den)
        ctx.final = (S, z, M)
        if final is not None:  # the state after the whole sequence (every rank's keys)
            S, z, M = final
        S = _to_user(S.reshape(B, H, r, dv), perm)
        z = _to_user(z.reshape(B, H, r), perm)
        M = M.reshape(B, H)
        ctx.mark_non_differentiable(M)  # the tensor returned: a log-scale, not differentiated
        return out.view(B, H, x.q.shape[2], dv), S, z, M

    @staticmethod
    def backward(ctx, dout, dS, dz, _dM):
        if torch.is_grad_enabled():  # create_graph=True: the hand-written backward is not differentiable itself
            raise RuntimeError("linear_attention / favor_attention: double backward (create_graph=True) is not "
                               "supported: the backward is hand-written and cannot itself be differentiated")
        call, perm = ctx.call, ctx.perm
        cfg, par = call.cfg, call.parallel
        *tensors, out, den = ctx.saved_tensors
        x = Inputs(*tensors)
        v = x.v
        B, H = v.shape[:2]
        S, z, _ = ctx.final
        with torch.autocast(v.device.type, enabled=False):
            src, rot, rot_k = _prepare(call, x, perm, clock_grad=ctx.needs_input_grad[1 + _CLOCK])
            dout = torch.zeros_like(out) if dout is None else dout.reshape(out.shape)
            r = S.shape[1]
            dS = None if dS is None else _to_internal(dS, perm).reshape(S.shape)
            dz = None if dz is None else _to_internal(dz, perm).reshape(z.shape)
            dSf = dzf = None
            if par is not None:  # the returned state was the whole sequence's: its gradient goes to the ranks' keys
                dSf, dzf, dS, dz = dS, dz, None, None
            if cfg.causal:
                dS = torch.zeros_like(S) if dS is None else dS
                dz = torch.zeros_like(z) if dz is None else dz
            if ctx.compiled is not None:
                dq, dk, dV, dks, dS0, dz0 = compiled.causal_backward(src, x, cfg, out, den, ctx.compiled, dout, dS,
                                                                     dz)
                src.dq, src.dk, dV = dq.to(x.q.dtype), dk.to(x.k.dtype), dV.to(v.dtype)
                src.dks = None if src.dks is None else dks.to(src.dks.dtype)
            elif cfg.causal:
                dV, dS0, dz0 = causal_backward(src, rot, v, out, den, dout, dS, dz, ctx.plan, cfg, rot_k)
            else:  # S = S0 exp(M0 - P) + this call's keys (only the outputs are differentiated here)
                dV, dS0, dz0 = bidirectional_backward(src, rot, rot_k, v, out, den, dout, S, z, ctx.ref, cfg)
                if ctx.ref is not None:
                    e = torch.exp(ctx.M0 - ctx.ref).to(dS0.dtype)
                    dS0, dz0 = dS0 * e[:, None, None], dz0 * e[:, None]
            if par is not None:  # through the combination and the all-reduce into this rank's keys; what is
                # left is the initial state's share (None without one)
                dS0, dz0 = _parallel_backward(par, ctx.incoming, src, rot_k, v, dS0, dz0, dSf, dzf, dV, cfg)
            if dS0 is not None:
                dS0 = _to_user(dS0.reshape(B, H, r, -1), perm)
                dz0 = _to_user(dz0.reshape(B, H, r), perm)
        grads = dict(q=src.dq.view(x.q.shape), k=src.dk.view(x.k.shape), v=dV.view(v.shape), S0=dS0, z0=dz0)
        if x.k_logscale is not None:
            grads["k_logscale"] = src.dks.view(x.k_logscale.shape)
        if x.theta is not None:  # learned angles: the queries' and the keys' rotations both turn by theta
            grads["theta"] = (rot.dtheta + rot_k.dtheta).to(x.theta.dtype)
            if x.phase is not None:
                grads["phase"] = rot.dphase.to(x.phase.dtype)
            if rot.dpos is not None:  # a clock: its value at each position turns that query and that key
                grads["angle_positions"] = rot.dpos + rot_k.dpos
        return (None, *(grads.get(f.name) for f in fields(Inputs)))


# ---------------------------------------------------------------------------------------------- sequence parallel
@dataclass
class _Incoming:
    """What the backward of ``_parallel_forward`` needs."""

    e: Tensor  # (P', BH): the weight of each gathered state (the initial state first, if any) in this rank's start
    f: Tensor | None  # (P', BH): the same in the state returned after the whole sequence (return_state)
    ref: Tensor | None  # the reference this rank's own key state ended at (``key_state``)
    first: int  # row of rank 0 in the gathered stack (1 after an initial state, else 0)


def _parallel_forward(par, src, rot_k, v, S0, z0, M0, cfg: EngineConfig):
    """This rank's keys summed into a state, every rank's by one all-gather, combined after the initial state
    (S0, z0, M0: (BH, r, dv), (BH, r), (BH,), zero without one). Returns the state the engine starts from (causal:
    the earlier ranks'; bidirectional: the other ranks', added to its own keys), the final state of the whole
    sequence (``par.return_state``, else None) and an ``_Incoming`` for the backward."""
    BH, r, dv = S0.shape
    Sl, zl, Ml = S0.new_zeros(BH, r, dv), S0.new_zeros(BH, r), torch.full_like(M0, NEG)
    Sl, zl, Ml, ref = key_state(src, rot_k, v, Sl, zl, Ml, cfg)
    Sg, zg, Mg = parallel.gather(Sl, zl, Ml, par.lay)
    ranks = torch.arange(par.lay.size, device=v.device)
    use = ranks < par.lay.rank if cfg.causal else ranks != par.lay.rank
    first = 0
    if par.initial:  # it precedes rank 0's first position
        Sg, zg, Mg = torch.cat((S0[None], Sg)), torch.cat((z0[None], zg)), torch.cat((M0[None], Mg))
        use, first = torch.cat((use.new_ones(1), use)), 1
    e, Mc = parallel.weights(Mg, use, S0.dtype)
    S_in, z_in = torch.einsum("pb,pbrd->brd", e, Sg), torch.einsum("pb,pbr->br", e, zg)
    final = f = None
    if par.return_state:
        f, Mf = parallel.weights(Mg, torch.ones_like(use), S0.dtype)
        final = (torch.einsum("pb,pbrd->brd", f, Sg), torch.einsum("pb,pbr->br", f, zg), Mf)
    return S_in, z_in, Mc, final, _Incoming(e, f, ref, first)


def _parallel_backward(par, inc: _Incoming, src, rot_k, v, dS0, dz0, dSf, dzf, dV, cfg: EngineConfig):
    """Mirror of ``_parallel_forward``: the gradients of the gathered states (from the state the engine started
    from, and from the returned final state), summed over ranks by one all-reduce; this rank's row flows into its
    keys (added to the source's key gradients and to dV: one set of gradient buffers). Returns the initial
    state's gradient (None, None without one)."""
    dSg = inc.e[..., None, None] * dS0  # (P', BH, r, dv)
    dzg = inc.e[..., None] * dz0
    if inc.f is not None and dSf is not None:
        dSg = dSg + inc.f[..., None, None] * dSf
    if inc.f is not None and dzf is not None:
        dzg = dzg + inc.f[..., None] * dzf
    mine_S, mine_z = parallel.reduce_row(dSg[inc.first:], dzg[inc.first:], par.lay)
    key_state_backward(src, rot_k, v, mine_S, mine_z, inc.ref, cfg, dV=dV)
    return (dSg[0], dzg[0]) if par.initial else (None, None)


_CLOCK = [f.name for f in fields(Inputs)].index("angle_positions")


def _prepare(call: Call, x: Inputs, perm: Tensor | None, clock_grad: bool = False):
    """The feature source and the rotations of queries and keys (the same one unless keys have their own
    positions, cross-attention, or the angles are learned: the queries' then add the phase). ``clock_grad``:
    the (B, H, N) clock of a selective rotation is differentiated (the backward)."""
    dtype, H = call.cfg.dtype, x.v.shape[1]
    rot = None if x.cos is None else Rotation(x.cos, x.sin)
    rot_k = rot if x.key_cos is None else Rotation(x.key_cos, x.key_sin)
    if x.theta is not None:
        clock_grad = clock_grad and x.angle_positions.dim() == 3
        rot = AngleRotation(x.theta, x.phase, x.angle_positions, H, dtype, call.first_position, clock_grad)
        rot_k = AngleRotation(x.theta, None, x.angle_positions, H, dtype, call.first_position, clock_grad)
    if call.features == "favor":
        W = x.projection if perm is None else x.projection[perm]
        src = FavorFeatures(x.q, x.k, W, x.mask, dtype, x.key_bias, x.k_logscale)
    else:
        src = GivenFeatures(x.q, x.k, x.k_logscale, x.mask, perm, dtype, x.key_bias)
    return src, rot, rot_k


def _to_internal(t: Tensor, perm: Tensor | None) -> Tensor:
    """State in the caller's feature order -> the engine's (interleaved) order. Features are dim 2."""
    return t if perm is None else t.index_select(2, perm)


def _to_user(t: Tensor, perm: Tensor | None) -> Tensor:
    return t if perm is None else t.index_select(2, torch.argsort(perm))
