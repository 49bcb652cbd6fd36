"""Float64 quadratic references written independently of the library (explicit rotation matrices)."""

import math

import torch


def rotation_from_angles(angles, interleaved=True):
    """Explicit block-diagonal rotations (..., r, r), float64, turning pair i by ``angles[..., i]`` (..., r/2):
    pairs (2i, 2i+1) or, not ``interleaved``, (i, i + r/2). Differentiable in the angles."""
    angles = torch.as_tensor(angles, dtype=torch.float64)
    half = angles.shape[-1]
    R = torch.zeros(*angles.shape[:-1], 2 * half, 2 * half, dtype=torch.float64)
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        cos, sin = torch.cos(angles[..., i]), torch.sin(angles[..., i])
        R[..., a, a], R[..., a, b] = cos, -sin
        R[..., b, a], R[..., b, b] = sin, cos
    return R


def rotation_matrices(positions, dim, base=10000.0, interleaved=True, scale=1.0):
    """Explicit block-diagonal R_m (len(positions), dim, dim), float64, from the paper's definition."""
    positions = torch.as_tensor(positions, dtype=torch.float64)
    theta = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    return rotation_from_angles(positions[:, None] * theta / scale, interleaved)


def decay_weights(gammas, positions):
    """RetNet's decay written out: gamma_h^(p_m - p_n) for n <= m and 0 above the diagonal, (H, N, N) float64."""
    p = torch.as_tensor(positions, dtype=torch.float64)
    gammas = torch.as_tensor(gammas, dtype=torch.float64)
    N = len(p)
    w = torch.zeros(len(gammas), N, N, dtype=torch.float64)
    for m in range(N):
        for n in range(m + 1):
            w[:, m, n] = gammas ** (p[m] - p[n])
    return w


def favor_features(x, W, shift=0.0):
    """Performer's positive random features exp(W x~ - |x~|^2/2) / sqrt(r), x~ = x d^(-1/4), float64.

    ``shift`` (float or tensor broadcasting over (..., N, 1)) is subtracted in the exponent: a factor common to
    all keys, or to one query row, cancels in attention and keeps float64 finite at large activations.
    """
    x = x.double() * x.shape[-1] ** -0.25
    return torch.exp(x @ W.double().t() - 0.5 * (x * x).sum(-1, keepdim=True) - shift) / math.sqrt(W.shape[0])


def favor_log_features(x, W):
    """log of ``favor_features`` (exact, float64): (..., N, r)."""
    x = x.double() * x.shape[-1] ** -0.25
    return x @ W.double().t() - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(W.shape[0])


def pair_split(x, interleaved=True):
    """The two members of each RoPE pair of the last dim: (x_2i, x_2i+1) or (x_i, x_i+r/2)."""
    r = x.shape[-1]
    return (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : r // 2], x[..., r // 2:])


def eq19_relative(qf, kf, v, *, causal, positions, interleaved=True, base=10000.0, mask=None, key_positions=None):
    """eq. 19 in float64 from relative rotations, the form that stays exact at any feature scale.

    (R_m q).(R_n k) = q.(R_{n-m} k)
                    = sum_i cos(theta_i (n-m)) (q_a k_a + q_b k_b) + sin(theta_i (n-m)) (q_b k_a - q_a k_b)
    over the pairs (a, b). With absolute rotations, float64 rounding is eps |q| |k| per product, and |q| |k| can
    exceed q.k by 1e16 when q and k weigh on different members of the pairs (FAVOR+ features at std 5 span e^+-40).
    Here the distance-0 term is exactly the unrotated product, and every other term is rounded relative to
    its own size.
    """
    qf, kf, v = qf.double(), kf.double(), v.double()
    r = qf.shape[-1]
    if mask is not None:
        kf = kf * mask[:, None, :, None]
    qa, qb = pair_split(qf, interleaved)
    ka, kb = pair_split(kf, interleaved)
    pos = torch.as_tensor(positions, dtype=torch.float64)
    kpos = pos if key_positions is None else torch.as_tensor(key_positions, dtype=torch.float64)
    delta = kpos[None, :] - pos[:, None]  # (N, M): n - m (keys of another sequence: cross-attention)
    num = torch.zeros(*qf.shape[:3], kf.shape[2], dtype=torch.float64)
    for i in range(r // 2):
        angle = delta * base ** (-2 * i / r)
        num += angle.cos() * (qa[..., i, None] * ka[..., None, :, i] + qb[..., i, None] * kb[..., None, :, i])
        num += angle.sin() * (qb[..., i, None] * ka[..., None, :, i] - qa[..., i, None] * kb[..., None, :, i])
    den = qf @ kf.transpose(-1, -2)
    if causal:
        tri = torch.ones(qf.shape[2], kf.shape[2], dtype=torch.bool).tril()
        num, den = num * tri, den * tri
    den = den.sum(-1, keepdim=True)
    return ((num @ v) / torch.where(den == 0, 1, den)).masked_fill(den == 0, 0)


def favor_eq19(q, k, v, W, *, causal, rope=None, positions=None, mask=None):
    """eq. 19 on exact FAVOR+ features at any activation scale (float64): each query row divided by its largest
    feature, all keys by the largest key feature (both factors cancel); RoPE ``rope`` = None, "interleaved" or
    "half" on the features, evaluated with relative rotations (``eq19_relative``)."""
    lq, lk = favor_log_features(q, W), favor_log_features(k, W)
    qf = torch.exp(lq - lq.amax(-1, keepdim=True))
    kf = torch.exp(lk - lk.amax((-1, -2), keepdim=True))
    if rope is None:
        return eq19(qf, kf, v, causal=causal, mask=mask)
    positions = torch.arange(q.shape[2]) if positions is None else positions
    return eq19_relative(qf, kf, v, causal=causal, positions=positions, interleaved=rope == "interleaved",
                         mask=mask)


def eq19(qf, kf, v, *, causal, R=None, mask=None):
    """RoFormer eq. 19 in float64 with the paper's explicit rotation matrices R (N, r, r):
    sum_n (R_m qf_m).(R_n kf_n) v_n / sum_n qf_m.kf_n, no stabilizer, no clamp; rows whose normalizer is 0 (they
    see no key) are 0. Absolute rotations: exact only while |qf| |kf| / qf.kf stays far below 1e16 (moderate
    feature ranges); ``eq19_relative`` holds at any scale."""
    N = qf.shape[2]
    tri = torch.ones(N, N, dtype=torch.float64).tril() if causal else None
    return eq19_weighted(qf, kf, v, Rq=R, Rk=R, weights=tri, mask=mask)


def eq19_weighted(qf, kf, v, *, Rq=None, Rk=None, weights=None, mask=None, rotated_normalizer=False):
    """eq. 19 in float64 with each term weighted: out_m = sum_n w_mn (Rq_m qf_m).(Rk_n kf_n) v_n /
    sum_n w_mn qf_m.kf_n, 0 where the normalizer is 0.

    Rq, Rk: explicit rotations (N, r, r), or (H, N, r, r) per head (learned angles: queries and keys turn by
    their own), None for none; ``weights`` (N, N) or (H, N, N): the causal mask, times gamma^(m-n) for a decay
    (``decay_weights``), None for all ones; ``mask`` (B, N) drops keys. ``rotated_normalizer``: the ablation that
    rotates the normalizer too, sum_n w_mn (Rq_m qf_m).(Rk_n kf_n).
    """
    qf, kf, v = qf.double(), kf.double(), v.double()
    if mask is not None:
        kf = kf * mask[:, None, :, None]
    rq = qf if Rq is None else torch.einsum("...ij,...j->...i", Rq.double(), qf)
    rk = kf if Rk is None else torch.einsum("...ij,...j->...i", Rk.double(), kf)
    num = rq @ rk.transpose(-1, -2)
    den = num if rotated_normalizer else qf @ kf.transpose(-1, -2)
    if weights is not None:
        num, den = num * weights, den * weights
    den = den.sum(-1, keepdim=True)
    return ((num @ v) / torch.where(den == 0, 1, den)).masked_fill(den == 0, 0)


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


def eq19_condition(qf, kf, v, *, causal, positions, interleaved=True, base=10000.0, mask=None,
                   rotation_rounding=0.0, self_rotated=False):
    """Per row m, how far eq. 19's row may move under float32 rounding (float64 computation):

        kappa_m = sum_n |v_n| sum_i (|Re c_i cos(theta_i (m-n))| + |Im c_i sin(theta_i (m-n))| + rho |c_i|) / den_m,

    with c_i = z_q,i conj(z_k,i) the complex product of the i-th feature pair. The first two terms are the row's
    sensitivity to a relative change of its features: a row whose rotated terms cancel (|ref_m| much smaller
    than kappa_m) is as uncertain as the rounding of its features. rho = ``rotation_rounding`` (for n != m; also
    n == m with ``self_rotated``) allows the rounding of rotating each side by its absolute angle, eps |c_i|,
    which every linear-time method pays on terms it reads from a state; at distance 0 only Re c_i counts unless
    ``self_rotated``: the unrotated product, which the causal path must reproduce.
    """
    qf, kf, v = qf.double(), kf.double(), v.double()
    r = qf.shape[-1]
    if interleaved:
        zq, zk = torch.complex(qf[..., 0::2], qf[..., 1::2]), torch.complex(kf[..., 0::2], kf[..., 1::2])
    else:
        zq, zk = torch.complex(qf[..., : r // 2], qf[..., r // 2:]), torch.complex(kf[..., : r // 2], kf[..., r // 2:])
    if mask is not None:
        zk = zk * mask[:, None, :, None]
        kf = kf * mask[:, None, :, None]
    c = zq[:, :, :, None, :] * zk[:, :, None, :, :].conj()  # (B, H, N, N, r/2)
    pos = torch.as_tensor(positions, dtype=torch.float64)
    theta = base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angle = (pos[:, None] - pos[None, :])[..., None] * theta  # (N, N, r/2)
    rho = torch.full(angle.shape[:2], float(rotation_rounding), dtype=torch.float64)
    if not self_rotated:
        rho.fill_diagonal_(0.0)
    spread = (c.real.abs() * angle.cos().abs() + c.imag.abs() * angle.sin().abs() + rho[..., None] * c.abs()).sum(-1)
    den = qf @ kf.transpose(-1, -2)
    if causal:
        tri = torch.ones(qf.shape[2], qf.shape[2], dtype=torch.bool).tril()
        spread, den = spread * tri, den * tri
    den = den.sum(-1)
    return (spread @ v.norm(dim=-1, keepdim=True)).squeeze(-1) / torch.where(den == 0, 1, den)
