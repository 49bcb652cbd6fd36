"""Where the engine's per-group features come from (private; used by ``chunked.py`` beside it).

A *source* (the ``FeatureSource`` protocol) hands the chunked engine the features of positions [a, b) as
contiguous (BH, G, r) tensors in the compute dtype, written into reused workspace buffers, and takes their
gradients back: ``FavorFeatures`` computes FAVOR+ features from raw q, k and a projection (recomputed in the
backward, never stored); ``GivenFeatures`` serves features computed by the caller. Inputs stay in the caller's
dtype (half precision stays half: that is what autograd keeps) and are cast group by group. ``Rotation`` applies
R_n to interleaved feature pairs as one complex multiply.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

NEG = -1e30  # log-scale of "no key": exp(NEG - P) == 0 without the NaNs of -inf - -inf
LOG_DTYPE = torch.float64  # key log-scales, references and states' log_ref: a decay adds log(gamma) * position,
# which grows without bound; in float64 differences of nearby log-scales stay exact (float32: eps * |value|)


class FeatureSource(Protocol):
    """Features of positions [a, b) for the engine. ``BH`` rows (batch x heads), ``r`` features, ``dtype`` the
    compute dtype. Keys come in two steps so that the engine can pick a reference P from their log-scales before
    exponentiating: ``key_logscale`` -> (u, logscale), then ``key_finish`` -> k0 = features * exp(logscale - P).
    Gradients are written into ``dq``, ``dk`` (and ``dks`` for given log-scales), (BH, N, .) in the input dtypes.
    Log-scales are ``LOG_DTYPE``; a key log-bias (BH, N) (a decay: log(1/gamma) times the position) adds to them.
    """

    BH: int
    r: int
    dtype: torch.dtype
    dq: Tensor
    dk: Tensor
    dks: Tensor | None

    def query(self, a: int, b: int, buf: Tensor) -> Tensor:
        """Query features (BH, G, r) written into ``buf``; any positive per-row factor may be dropped."""

    def key_logscale(self, a: int, b: int, buf: Tensor) -> tuple[Tensor, Tensor | None]:
        """Raw key material in ``buf`` and per-key log-scales (BH, G), NEG for padded keys (None: no scales)."""

    def key_finish(self, a: int, b: int, u: Tensor, logscale: Tensor | None, ref: Tensor | None,
                   buf: Tensor) -> Tensor:
        """Key features relative to the reference ``ref`` (BH,), or one per key (BH, G): exp(logscale - ref)
        times the bounded part."""

    def query_grad(self, a: int, b: int, fq: Tensor, dfq: Tensor) -> None:
        """Store the gradient of the loss w.r.t. the query inputs of [a, b), given d fq."""

    def key_grad(self, a: int, b: int, k0: Tensor, dk0: Tensor, logscale: Tensor | None, ref: Tensor | None) -> None:
        """Store the gradient w.r.t. the key inputs of [a, b), given d k0."""


def interleaved_order(r: int, device=None) -> Tensor:
    """Feature order that turns half-split pairs (i, i + r/2) into interleaved pairs (2i, 2i+1)."""
    return torch.stack((torch.arange(r // 2, device=device), torch.arange(r // 2, r, device=device)), 1).flatten()


class Workspace:
    """Named flat buffers of one dtype reused across groups; ``get`` returns a contiguous view of the shape."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.store = device, dtype, {}

    def get(self, name: str, *shape: int) -> Tensor:
        n = 1
        for size in shape:
            n *= size
        buf = self.store.get(name)
        if buf is None or buf.numel() < n:
            buf = self.store[name] = torch.empty(n, device=self.device, dtype=self.dtype)
        return buf[:n].view(shape)


def _as_complex(x: Tensor) -> Tensor:
    if x.storage_offset() % 2:  # view_as_complex needs an even offset
        x = x.clone()
    return torch.view_as_complex(x.view(*x.shape[:-1], -1, 2))


class Rotation:
    """R_n on interleaved pairs of (BH, G, r), written into a separate buffer: (x0 + i x1) * exp(i n theta).

    The complex factors are built per group from the cos/sin tables (a whole-length complex table would be as
    large as q itself) and kept for the few groups in flight: a group's queries, keys and gradients reuse them.
    """

    def __init__(self, cos: Tensor, sin: Tensor):
        self.cos, self.sin = cos, sin  # (N, r/2), or (B, N, r/2) for positions per example
        self._factors: dict = {}

    def factor(self, a: int, b: int, inverse: bool = False) -> Tensor:
        key = (a, b, inverse)
        if key not in self._factors:
            if len(self._factors) >= 4:  # the backward alternates between two groups, both directions
                self._factors.pop(next(iter(self._factors)))
            cos, sin = self.cos[..., a:b, :], self.sin[..., a:b, :]
            self._factors[key] = torch.complex(cos, -sin if inverse else sin)
        return self._factors[key]

    def __call__(self, x: Tensor, a: int, b: int, out: Tensor, inverse: bool = False) -> Tensor:
        f = self.factor(a, b, inverse)
        xc, oc = _as_complex(x), _as_complex(out)  # (BH, G, r/2)
        if f.dim() == 3:  # per example: the heads of an example share its factor
            xc, oc, f = xc.view(f.shape[0], -1, *xc.shape[1:]), oc.view(f.shape[0], -1, *oc.shape[1:]), f[:, None]
        torch.mul(xc, f, out=oc)
        return out


class AngleRotation:
    """R on interleaved pairs of (BH, G, r) by learned angles theta_hi p + phase_hi (``LearnedRotary``), built per
    group from float64 positions, and the gradients of those angles (``grad``): the engine hands it the gradient
    g of every rotated tensor y it used, and d(angle) = Im(g conj(y)) pair by pair, summed into dtheta (times
    the position) and dphase.

    theta, phase: (H, r/2) (phase None: keys, which turn by theta_hi n alone); pos: (N,) or (B, N) float64, or
    (B, H, N) for a clock per head (the selective rotation: A_n = sum_{t<=n} a_t), whose gradient d pos_n =
    sum_i theta_hi d angle_{n,i} is accumulated into ``dpos`` (float64, (B, H, N)) when ``pos_grad``.
    start: pos[j] = start + j (an int), or None. Then a group's factors are one product, e^(i theta (start + a) +
    phase) times a table of e^(i theta j), j < G, shared by every group, both from float64 angles: the float64
    cos and sin of a whole group's angles cost 4.5 times that (1.1 against 0.25 ms per factor for groups of 256
    at H = 8, r = 256 on the Xeon), and each group needs four factors (the inverses are conjugates).
    """

    def __init__(self, theta: Tensor, phase: Tensor | None, pos: Tensor, H: int, dtype: torch.dtype,
                 start: int | None = None, pos_grad: bool = False):
        self.theta = theta.detach().to(torch.float64)
        self.phase = None if phase is None else phase.detach().to(torch.float64)
        self.pos, self.H, self.dtype, self.start = pos.detach(), H, dtype, start
        self.dtheta = torch.zeros_like(self.theta)
        self.dphase = None if phase is None else torch.zeros_like(self.phase)
        self.dpos = torch.zeros_like(self.pos) if pos_grad else None  # (B, H, N) clocks only
        self._theta_c: Tensor | None = None  # theta in the compute dtype (the clock's gradient)
        self._factors: dict = {}
        self._steps: Tensor | None = None  # (H, L, r/2) complex: e^(i theta j), j < L

    def _unit(self, ang: Tensor) -> Tensor:
        """e^(i ang) for float64 angles, as complex numbers of the compute dtype."""
        return torch.complex(ang.cos().to(self.dtype), ang.sin().to(self.dtype))

    def _consecutive(self, a: int, b: int) -> Tensor:
        """The factors of positions start + a .. start + b - 1 (H, G, r/2): offset times the step table, each
        rounded from float64 angles, so a factor carries ~3 roundings of the compute dtype against 1 for the
        direct cos and sin (a product in complex128 would match that at 2.7x the time; the outputs and the
        gradients of q, k, v and the phase come out as accurate either way)."""
        G = b - a
        if self._steps is None or self._steps.shape[1] < G:
            j = torch.arange(G, dtype=torch.float64, device=self.theta.device)
            self._steps = self._unit(j[None, :, None] * self.theta[:, None, :])
        ang = (self.start + a) * self.theta  # float64: the same angle as the direct form's first row
        if self.phase is not None:
            ang = ang + self.phase
        return self._steps[:, :G] * self._unit(ang)[:, None, :]

    def _view(self, x: Tensor) -> Tensor:  # (BH, G, r/2) complex -> (B, H, G, r/2)
        return x.view(-1, self.H, *x.shape[1:])

    def factor(self, a: int, b: int, inverse: bool = False) -> Tensor:
        key = (a, b, inverse)
        if key not in self._factors:
            if len(self._factors) >= 4:
                self._factors.pop(next(iter(self._factors)))
            if self.start is not None:  # the two directions are each other's conjugates
                other = self._factors.get((a, b, not inverse))
                f = self._consecutive(a, b) if other is None else other
                self._factors[key] = torch.conj_physical(f) if other is not None or inverse else f
            else:
                pos = self.pos[..., a:b, None] if self.pos.dim() == 3 else self.pos[..., None, a:b, None]
                ang = pos * self.theta[:, None, :]  # (H, G, r/2) or (B, H, G, r/2)
                if self.phase is not None:
                    ang = ang + self.phase[:, None, :]
                self._factors[key] = self._unit(-ang if inverse else ang)
        return self._factors[key]

    def __call__(self, x: Tensor, a: int, b: int, out: Tensor, inverse: bool = False) -> Tensor:
        torch.mul(self._view(_as_complex(x)), self.factor(a, b, inverse), out=self._view(_as_complex(out)))
        return out

    def grad(self, g: Tensor, y: Tensor, a: int, b: int) -> None:
        """Accumulate the angle gradients from d loss / d y = g, y the rotated (BH, G, r) of [a, b).

        d theta = sum_p p d angle_p is taken as p0 sum_p d angle_p (float64) + sum_p (p - p0) d angle_p (a product
        in the compute dtype, where p - p0 is small and exact): the group's first position p0 may be 10^7.
        A clock (B, H, N) is taken the same way per head (p0 its value at the group's first position; p - p0 the
        clock's advance within the group, rounded once to the compute dtype), and its own gradient is
        d A_n = sum_i theta_hi d angle_{n,i} (the queries' and the keys' calls add into ``dpos``)."""
        dang = self._angle_grads(g, y)  # (B, H, G, r/2)
        per = dang.sum(2, dtype=torch.float64)  # (B, H, r/2)
        if self.dphase is not None:
            self.dphase += per.sum(0)
        pos = self.pos[..., a:b]  # (G,), (B, G) or (B, H, G)
        p0 = pos[..., :1]
        rel = (pos - p0).to(dang.dtype)
        if pos.dim() == 3:
            self.dtheta += (p0 * per).sum(0) + torch.matmul(rel[:, :, None, :], dang).squeeze(2).sum(0)
            if self.dpos is not None:
                if self._theta_c is None:
                    self._theta_c = self.theta.to(dang.dtype)
                self.dpos[..., a:b] += torch.matmul(dang, self._theta_c[:, :, None]).squeeze(-1)
        elif pos.dim() == 1:
            self.dtheta += p0 * per.sum(0) + torch.matmul(rel, dang).sum(0)
        else:
            self.dtheta += (p0[:, :, None] * per).sum(0) + torch.einsum("bhgi,bg->hi", dang, rel)

    def _angle_grads(self, g: Tensor, y: Tensor) -> Tensor:
        """d loss / d angle = Im(g conj(y)) = g1 y0 - g0 y1 pair by pair, (B, H, G, r/2) contiguous in the compute
        dtype (two passes over the pairs; a complex product with a conjugate would resolve the conjugate first)."""
        gp, yp = (self._view(t.view(*t.shape[:-1], -1, 2)) for t in (g, y))
        return torch.mul(gp[..., 1], yp[..., 0]).addcmul_(gp[..., 0], yp[..., 1], value=-1)

    def phase_only(self, x: Tensor, out: Tensor, inverse: bool = False) -> Tensor:
        """R_phase x (the rotation at distance 0: query angle minus key angle), (BH, G, r) -> out."""
        f = torch.complex(self.phase.cos(), (-self.phase if inverse else self.phase).sin()).to(
            _as_complex(x).dtype)[:, None, :]
        torch.mul(self._view(_as_complex(x)), f, out=self._view(_as_complex(out)))
        return out

    def phase_grad(self, g: Tensor, y: Tensor) -> None:
        """dphase from d loss / d (R_phase x) = g, y = R_phase x."""
        self.dphase += self._angle_grads(g, y).sum((0, 2), dtype=torch.float64)


def _store(dst: Tensor, a: int, b: int, g: Tensor, add: bool) -> None:
    if add:
        dst[:, a:b] += g
    else:
        dst[:, a:b] = g


def group_rows(x: Tensor, a: int, b: int, buf: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Positions [a, b) of x (B, H, N, D) as a contiguous (B*H, b-a, D) in ``dtype`` (default: buf's, else x's):
    a view when x already is that, else a copy (into ``buf`` when given)."""
    B, H, _, D = x.shape
    dtype = dtype or (buf.dtype if buf is not None else x.dtype)
    part = x[:, :, a:b]
    if part.dtype == dtype and part.is_contiguous():
        return part.view(B * H, b - a, D)
    if buf is None:
        return part.reshape(B * H, b - a, D).to(dtype)
    return buf.view(B, H, b - a, D).copy_(part).view_as(buf)


def _per_key(ref: Tensor) -> Tensor:
    """A reference (BH,) shared by a group's keys, or one per key (BH, G), as (BH, 1) or (BH, G)."""
    return ref if ref.dim() == 2 else ref[:, None]


def _flat_mask(mask: Tensor | None, H: int) -> Tensor | None:
    return None if mask is None else mask[:, None].expand(-1, H, -1).reshape(-1, mask.shape[-1])


def _square_norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """|x|^2 over the last dim of (B, H, N, d) in ``dtype``, as x.square().sum(-1) gives it (the same values),
    through 1 MiB pieces: the whole (B, H, N, d) temporary would cost page faults worth ten times the arithmetic.
    (The norm is faster still but squares a rounded square root: five times the error at std-5 activations.)"""
    B, H, N, d = x.shape
    step = max(1, 2**18 // (B * H * d))
    if N <= step:  # one piece: no buffer (a decoding step)
        return x.to(dtype).square().sum(-1)
    out = torch.empty(B, H, N, dtype=dtype, device=x.device)
    for s in range(0, N, step):
        torch.sum(x[:, :, s:s + step].to(dtype).square(), -1, out=out[:, :, s:s + step])
    return out


def _bounded(u: Tensor) -> Tensor:
    """exp(u - max_i u) in place: FAVOR+ query features up to their row's factor, each in (0, 1]."""
    return u.sub_(u.amax(-1, keepdim=True)).exp_()


class FavorFeatures:
    """FAVOR+ features computed on the fly from q, k (B, H, N, d) and W (r, d).

    With x~ = x d^(-1/4) and u = x~ W^T: fq = exp(u - max_i u) (a per-row factor that cancels); keys have
    log-scale max_i u - |x~|^2/2 and k0 = exp(u - |x~|^2/2 - P): Performer's exp(u - |x~|^2/2) times the
    group constant exp(-P). The 1/sqrt(r) of Performer cancels and is dropped. ``ks`` (B, H, M), optional: a
    log-bias of each key that is differentiated (a gate's -G_n): its gradient sum_i dk0_i k0_i goes to ``dks``.
    """

    add_keys = False  # key gradients add to dk instead of being written (a second pass over the same keys)

    def __init__(self, q, k, W, mask, dtype, bias=None, ks=None):
        B, H, M, d = k.shape
        self.q, self.k, self.mask, self.dtype = q, k, _flat_mask(mask, H), dtype
        self.BH, self.r = B * H, W.shape[0]
        self.Ws = W.to(dtype) * d ** -0.25  # u = x @ Ws^T
        self.scale2 = d ** -0.5
        # |k~|^2 / 2, less the log-biases: what a key's log-scale subtracts from max_i u
        self.half_sq = ((0.5 * self.scale2) * _square_norms(k, dtype).reshape(B * H, -1)).to(LOG_DTYPE)
        if bias is not None:
            self.half_sq = self.half_sq - bias
        if ks is not None:
            self.half_sq = self.half_sq - ks.detach().reshape(B * H, -1).to(LOG_DTYPE)
        self.dq = q.new_empty(B * H, q.shape[2], d)
        self.dk = k.new_empty(B * H, M, d)
        self.dks = None if ks is None else ks.new_empty(B * H, M)

    def query(self, a, b, buf):
        torch.matmul(group_rows(self.q, a, b, dtype=self.dtype), self.Ws.t(), out=buf)
        return _bounded(buf)

    def key_logscale(self, a, b, buf):
        torch.matmul(group_rows(self.k, a, b, dtype=self.dtype), self.Ws.t(), out=buf)
        return buf, self._logscale(buf, a, b)

    def _logscale(self, u, a, b):
        logscale = u.amax(-1).to(LOG_DTYPE).sub_(self.half_sq[:, a:b])
        if self.mask is not None:
            logscale.masked_fill_(~self.mask[:, a:b], NEG)
        return logscale

    def pair(self, a, b, buf):
        """``query`` into buf[0] and ``key_logscale`` into buf[1] (buf (2, BH, G, r)) by one product: for a few
        positions (a decoding step), where each call's fixed cost is what counts."""
        x = torch.stack((self.q[:, :, a:b], self.k[:, :, a:b])).to(self.dtype)
        torch.matmul(x.view(2, self.BH, b - a, -1), self.Ws.t(), out=buf)
        return _bounded(buf[0]), buf[1], self._logscale(buf[1], a, b)

    def key_finish(self, a, b, u, logscale, ref, buf):
        u.sub_((self.half_sq[:, a:b] + _per_key(ref)).to(u.dtype).unsqueeze(-1))  # moderate: exact in u's dtype
        if self.mask is not None:  # before exp: a padded key may lie far above the reference (inf * 0 = nan)
            u.masked_fill_(~self.mask[:, a:b, None], -math.inf)
        return u.exp_()

    def query_grad(self, a, b, fq, dfq):
        self.dq[:, a:b] = dfq.mul_(fq) @ self.Ws

    def key_grad(self, a, b, k0, dk0, logscale, ref):
        du = dk0.mul_(k0)  # d/du of exp(u - h - P)
        g = du @ self.Ws
        total = du.sum(-1, keepdim=True)  # d/d(a log-bias of the key): k0 scales by its exponential
        g.sub_(total * group_rows(self.k, a, b, dtype=self.dtype), alpha=self.scale2)  # -d h/dk
        _store(self.dk, a, b, g, self.add_keys)
        if self.dks is not None:
            _store(self.dks, a, b, total.squeeze(-1), self.add_keys)


class GivenFeatures:
    """Precomputed features qf, kf (B, H, N, r), optional key log-scales ks (B, H, N); ``perm`` reorders features."""

    add_keys = False  # as in FavorFeatures

    def __init__(self, qf, kf, ks, mask, perm, dtype, bias=None):
        B, H, M, r = kf.shape
        self.qf, self.kf, self.mask, self.perm, self.dtype = qf, kf, _flat_mask(mask, H), perm, dtype
        self.ks = None if ks is None else ks.reshape(B * H, -1)
        self.bias = bias
        self.BH, self.r = B * H, r
        self.inv = None if perm is None else torch.argsort(perm)
        self.dq = qf.new_empty(B * H, qf.shape[2], r)
        self.dk = kf.new_empty(B * H, M, r)
        self.dks = None if ks is None else ks.new_empty(B * H, ks.shape[2])

    def _take(self, x, a, b, buf):
        if self.perm is not None:
            B, H = x.shape[:2]
            return buf.view(B, H, b - a, -1).copy_(x[:, :, a:b].index_select(-1, self.perm)).view_as(buf)
        return group_rows(x, a, b, buf)  # the chunked bmm needs (BH, G, r) contiguous

    def _put(self, dst, a, b, g, add=False):
        _store(dst, a, b, g if self.inv is None else g.index_select(-1, self.inv), add)

    def query(self, a, b, buf):
        return self._take(self.qf, a, b, buf)

    def pair(self, a, b, buf):
        """``query`` and ``key_logscale`` (as ``FavorFeatures.pair``; the features may be views of the inputs)."""
        return (self.query(a, b, buf[0]),) + self.key_logscale(a, b, buf[1])

    def key_logscale(self, a, b, buf):
        fk = self._take(self.kf, a, b, buf)
        if self.ks is None and self.bias is None:
            return fk, None
        logscale = (self.bias[:, a:b].clone() if self.ks is None else self.ks[:, a:b].to(LOG_DTYPE, copy=True))
        if self.ks is not None and self.bias is not None:
            logscale += self.bias[:, a:b]
        if self.mask is not None:
            logscale.masked_fill_(~self.mask[:, a:b], NEG)
        return fk, logscale

    def _weight(self, a, b, logscale, ref):
        """exp(logscale - ref) per key (BH, G), 0 for padded keys (their log-scale is NEG); None if all 1."""
        if logscale is not None:
            return torch.exp(logscale - _per_key(ref)).to(self.dtype)
        return None if self.mask is None else self.mask[:, a:b].to(self.dtype)

    def key_finish(self, a, b, fk, logscale, ref, buf):
        w = self._weight(a, b, logscale, ref)
        if w is None:
            return fk
        fk = torch.mul(fk, w.unsqueeze(-1), out=buf)
        if self.mask is not None:  # whatever a padded key's features hold (inf * 0 = nan), it contributes 0
            fk.masked_fill_(~self.mask[:, a:b, None], 0)
        return fk

    def query_grad(self, a, b, fq, dfq):
        self._put(self.dq, a, b, dfq)

    def key_grad(self, a, b, k0, dk0, logscale, ref):
        if self.dks is not None:
            _store(self.dks, a, b, (dk0 * k0).sum(-1), self.add_keys)
        w = self._weight(a, b, logscale, ref)
        self._put(self.dk, a, b, dk0 if w is None else dk0.mul_(w.unsqueeze(-1)), self.add_keys)
