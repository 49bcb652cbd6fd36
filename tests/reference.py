"""Float64 quadratic references written independently of the library (explicit rotation matrices)."""

import math

import torch


def rotation_matrices(positions, dim, base=10000.0, interleaved=True, scale=1.0):
    """Explicit block-diagonal R_m (len(positions), dim, dim), float64, from the paper's definition."""
    positions = torch.as_tensor(positions, dtype=torch.float64)
    R = torch.zeros(len(positions), dim, dim, dtype=torch.float64)
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
        ang = positions * theta / scale
        R[:, a, a], R[:, a, b] = torch.cos(ang), -torch.sin(ang)
        R[:, b, a], R[:, b, b] = torch.sin(ang), torch.cos(ang)
    return R


def favor_features(x, W):
    """Performer's positive random features exp(W x~ - |x~|^2/2) / sqrt(r), x~ = x d^(-1/4), float64."""
    x = x.double() * x.shape[-1] ** -0.25
    return torch.exp(x @ W.double().t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(W.shape[0])


def eq19(qf, kf, v, *, causal, R=None, mask=None, eps=0.0):
    """RoFormer eq. 19 in float64: sum_n (R_m qf_m).(R_n kf_n) v_n / sum_n qf_m.kf_n (no stabilizer)."""
    qf, kf, v = qf.double(), kf.double(), v.double()
    if mask is not None:
        kf = kf * mask[:, None, :, None]
    den = qf @ kf.transpose(-1, -2)
    if R is not None:
        rq = torch.einsum("nij,bhnj->bhni", R.double(), qf)
        rk = torch.einsum("nij,bhnj->bhni", R.double(), kf)
        num = rq @ rk.transpose(-1, -2)
    else:
        num = den
    if causal:
        tri = torch.ones(qf.shape[2], qf.shape[2], dtype=torch.bool).tril()
        num, den = num * tri, den * tri
    return (num @ v) / den.sum(-1, keepdim=True).clamp_min(eps) if eps else (num @ v) / den.sum(-1, keepdim=True)


def softmax_ref(q, k, v, *, causal, R=None, mask=None):
    """Softmax attention in float64 with an explicit rotation of q and k."""
    q, k, v = q.double(), k.double(), v.double()
    if R is not None:
        q = torch.einsum("nij,bhnj->bhni", R.double(), q)
        k = torch.einsum("nij,bhnj->bhni", R.double(), k)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = torch.ones_like(s, dtype=torch.bool)
    if causal:
        keep = keep & torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    s = s.masked_fill(~keep, -math.inf)
    return torch.softmax(s, -1) @ v


def assert_close(name, ref, got, rtol=1e-6, atol=1e-8):
    """Relative max error check that reports the error and catches NaN."""
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3e} (scale {scale:.3e}, rtol {rtol}, atol {atol})"
