"""Where the engine's per-group features come from (private; used by ``linrope.kernels``).

A *source* hands ``linrope.kernels`` the features of positions [a, b) as contiguous (B*H, G, r) tensors written
into reused workspace buffers, and takes their gradients back: ``FavorFeatures`` computes FAVOR+ features from raw
q, k and a projection (recomputed in the backward, never stored); ``GivenFeatures`` serves features computed by the
caller. ``Rotation`` applies R_n to interleaved feature pairs as one complex multiply.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG = -1e30  # log-scale of "no key": exp(NEG - P) == 0 without the NaNs of -inf - -inf


def interleaved_order(r: int, device=None) -> Tensor:
    """Feature order that turns half-split pairs (i, i + r/2) into interleaved pairs (2i, 2i+1)."""
    return torch.stack((torch.arange(r // 2, device=device), torch.arange(r // 2, r, device=device)), 1).flatten()


class Workspace:
    """Named flat buffers reused across groups; ``get`` returns a contiguous view of the requested shape."""

    def __init__(self, like: Tensor):
        self.like, self.store = like, {}

    def get(self, name: str, *shape: int) -> Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.store.get(name)
        if buf is None or buf.numel() < n:
            buf = self.store[name] = self.like.new_empty(n)
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
        self.cos, self.sin = cos, sin  # (N, r/2)
        self._factors: dict = {}

    def factor(self, a: int, b: int, inverse: bool = False) -> Tensor:
        key = (a, b, inverse)
        if key not in self._factors:
            if len(self._factors) >= 4:  # the backward alternates between two groups, both directions
                self._factors.pop(next(iter(self._factors)))
            self._factors[key] = torch.complex(self.cos[a:b], -self.sin[a:b] if inverse else self.sin[a:b])
        return self._factors[key]

    def __call__(self, x: Tensor, a: int, b: int, out: Tensor, inverse: bool = False) -> Tensor:
        torch.mul(_as_complex(x), self.factor(a, b, inverse), out=_as_complex(out))
        return out


def group_rows(x: Tensor, a: int, b: int, buf: Tensor | None = None) -> Tensor:
    """Positions [a, b) of x (B, H, N, D) as a contiguous (B*H, b-a, D): a view if possible, else copied into buf."""
    B, H, _, D = x.shape
    part = x[:, :, a:b]
    if buf is None:
        return part.reshape(B * H, b - a, D)
    try:
        return part.view(B * H, b - a, D) if part.is_contiguous() else buf.view(B, H, b - a, D).copy_(part).view_as(buf)
    except RuntimeError:
        return buf.view(B, H, b - a, D).copy_(part).view_as(buf)


def _flat_mask(mask: Tensor | None, H: int) -> Tensor | None:
    return None if mask is None else mask[:, None].expand(-1, H, -1).reshape(-1, mask.shape[-1])


class FavorFeatures:
    """FAVOR+ features computed on the fly from q, k (BH, N, d) and W (r, d).

    With x~ = x d^(-1/4) and u = x~ W^T: fq = exp(u - max_i u) (a per-row factor that cancels); keys have
    log-scale s = max_i u - |x~|^2/2 and k0 = exp(u - |x~|^2/2 - P): Performer's exp(u - |x~|^2/2) times the
    group constant exp(-P). The 1/sqrt(r) of Performer cancels and is dropped.
    """

    def __init__(self, q, k, W, mask, H):
        B, H, N, d = q.shape
        self.q, self.k, self.mask = q, k, _flat_mask(mask, H)
        self.BH, self.r = B * H, W.shape[0]
        self.Ws = W * d ** -0.25  # u = x @ Ws^T
        self.scale2 = d ** -0.5
        self.h = (0.5 * self.scale2 * (k * k).sum(-1)).reshape(B * H, N)  # |k~|^2 / 2
        self.dq, self.dk, self.dks = q.new_empty(B * H, N, d), k.new_empty(B * H, N, d), None

    def query(self, a, b, buf):
        torch.matmul(group_rows(self.q, a, b), self.Ws.t(), out=buf)
        return buf.sub_(buf.amax(-1, keepdim=True)).exp_()

    def key_logscale(self, a, b, buf):
        """Writes u into ``buf``; returns (buf, s) with s (BH, G), NEG for padded keys."""
        torch.matmul(group_rows(self.k, a, b), self.Ws.t(), out=buf)
        s = buf.amax(-1).sub_(self.h[:, a:b])
        if self.mask is not None:
            s.masked_fill_(~self.mask[:, a:b], NEG)
        return buf, s

    def key_finish(self, a, b, u, s, P, buf):
        u.sub_((self.h[:, a:b] + P[:, None]).unsqueeze(-1)).exp_()
        if self.mask is not None:
            u.mul_(self.mask[:, a:b, None])
        return u

    def query_grad(self, a, b, fq, dfq):
        self.dq[:, a:b] = dfq.mul_(fq) @ self.Ws

    def key_grad(self, a, b, k0, dk0, s, P):
        du = dk0.mul_(k0)  # d/du of exp(u - h - P)
        g = du @ self.Ws
        g.sub_(du.sum(-1, keepdim=True) * group_rows(self.k, a, b), alpha=self.scale2)  # d/dk of -h = -scale2 k
        self.dk[:, a:b] = g


class GivenFeatures:
    """Precomputed features qf, kf (B, H, N, r), optional key log-scales ks (B, H, N); ``perm`` reorders features."""

    def __init__(self, qf, kf, ks, mask, H, perm):
        B, H, N, r = qf.shape
        self.qf, self.kf, self.mask, self.perm = qf, kf, _flat_mask(mask, H), perm
        self.ks = None if ks is None else ks.reshape(B * H, N)
        self.BH, self.r = B * H, r
        self.inv = None if perm is None else torch.argsort(perm)
        self.dq, self.dk = qf.new_empty(B * H, N, r), kf.new_empty(B * H, N, r)
        self.dks = None if ks is None else ks.new_empty(B * H, N)

    def _take(self, x, a, b, buf):
        if self.perm is not None:
            B, H = x.shape[:2]
            return torch.index_select(x[:, :, a:b], -1, self.perm, out=buf.view(B, H, b - a, -1)).view_as(buf)
        return group_rows(x, a, b, buf)  # the chunked bmm needs (BH, G, r) contiguous

    def _put(self, dst, a, b, g):
        dst[:, a:b] = g if self.inv is None else g.index_select(-1, self.inv)

    def query(self, a, b, buf):
        return self._take(self.qf, a, b, buf)

    def key_logscale(self, a, b, buf):
        fk = self._take(self.kf, a, b, buf)
        if self.ks is None:
            return fk, None
        s = self.ks[:, a:b].clone()
        if self.mask is not None:
            s.masked_fill_(~self.mask[:, a:b], NEG)
        return fk, s

    def _weight(self, a, b, s, P):
        w = None if s is None else torch.exp(s - P[:, None])
        if self.mask is not None:
            m = self.mask[:, a:b].to(self.kf.dtype)
            w = m if w is None else w * m
        return w

    def key_finish(self, a, b, fk, s, P, buf):
        w = self._weight(a, b, s, P)
        return fk if w is None else torch.mul(fk, w.unsqueeze(-1), out=buf)

    def query_grad(self, a, b, fq, dfq):
        self._put(self.dq, a, b, dfq)

    def key_grad(self, a, b, k0, dk0, s, P):
        if s is not None:
            self.dks[:, a:b] = (dk0 * k0).sum(-1)
        w = self._weight(a, b, s, P)
        self._put(self.dk, a, b, dk0 if w is None else dk0.mul_(w.unsqueeze(-1)))
