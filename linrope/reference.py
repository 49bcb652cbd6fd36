"""Plain references of the fast paths, in float64 (for tests, the accuracy experiment and small N).

* ``linear_attention_naive`` / ``favor_attention_naive``: quadratic, builds the N x N weights.
* ``linear_attention_recurrent`` / ``favor_attention_recurrent``: causal, one position at a time with a running
  state (numerator sum, unrotated key sum, log-scale reference), the way decoding sees it; the chunked engine
  must agree with it for outputs, gradients and the final state.

Both compute eq. 19 exactly as written, with no floor on the normalizer: a row whose normalizer is 0 (it sees
no key) returns 0. Key log-scales (exp-type features) are handled by referring every visible key to the row's
largest log-scale, which changes nothing mathematically (the factor cancels) and keeps float64 finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_mask, check_qkv
from .features import favor_plus
from .functional import AttentionState
from .rotary import LearnedRotary, RotaryEmbedding, apply_rotary, check_rotary, resolve_positions

__all__ = ["linear_attention_naive", "favor_attention_naive", "linear_attention_recurrent",
           "favor_attention_recurrent"]

F64 = torch.float64


def _rotation(rotary: RotaryEmbedding | None, r: int, positions, N: int, device, batch: int | None = None):
    if rotary is None:
        return None
    check_rotary(rotary, r, "the number of features r")
    cos, sin = rotary.cos_sin(positions, N, device, F64, batch=batch)
    return lambda x: apply_rotary(x, cos, sin, interleaved=rotary.interleaved)


def _log_gamma(decay, H: int) -> Tensor:
    """log gamma per head (H,) from a float or H floats."""
    return torch.as_tensor(decay, dtype=F64).flatten().expand(H).log()


def _pairs(x: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    r = x.shape[-1]
    return (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : r // 2], x[..., r // 2:])


def _relative_scores(qf: Tensor, kf: Tensor, rotary: RotaryEmbedding | LearnedRotary, positions: Tensor,
                     key_positions: Tensor | None = None) -> Tensor:
    """(R_m qf_m).(R_n kf_n) for all m, n (B, H, N, M) as qf_m . (R_{n-m} kf_n), pair by pair; keys at
    ``key_positions`` (default: the queries' ``positions``).

    Rotating each side by its absolute angle rounds every product to eps |qf| |kf|, which exceeds qf . kf by up
    to 1e16 when FAVOR+ features at large activations weigh on different members of a pair: even float64 then
    gets the distance-0 term wrong. The relative angle is exactly 0 there, and each term is rounded to its size.
    """
    qa, qb = _pairs(qf, rotary.interleaved)
    ka, kb = _pairs(kf, rotary.interleaved)
    kpos = positions if key_positions is None else key_positions
    delta = kpos[..., None, :] - positions[..., :, None]  # (N, M) integer distances n - m, or (B, N, M)
    if delta.dim() == 3:
        delta = delta[:, None]  # (B, 1, N, N): the heads of an example share its positions
    if isinstance(rotary, LearnedRotary):  # per head (H, r/2); the query's phase: R'_m = R_(theta m + phase)
        angles, phase = rotary.theta.to(F64)[:, None, None, :], rotary.phase.to(F64)[:, None, None, :]
    else:  # theta_i per pair after scaling, (r/2,)
        angles, phase = rotary.frequencies(qf.device), None
    out = qf.new_zeros(*qf.shape[:3], kf.shape[2])
    for i in range(angles.shape[-1]):
        angle = delta.to(F64) * angles[..., i]
        if phase is not None:  # qf_m . R_(theta (n - m) - phase) kf_n
            angle = angle - phase[..., i]
        out += angle.cos() * (qa[..., i, None] * ka[..., None, :, i] + qb[..., i, None] * kb[..., None, :, i])
        out += angle.sin() * (qb[..., i, None] * ka[..., None, :, i] - qa[..., i, None] * kb[..., None, :, i])
    return out


def linear_attention_naive(qf: Tensor, kf: Tensor, v: Tensor, *, causal: bool = False,
                           rotary: RotaryEmbedding | None = None, positions: int | Tensor | None = None,
                           key_padding_mask: Tensor | None = None, k_logscale: Tensor | None = None,
                           key_positions: int | Tensor | None = None, decay=None) -> Tensor:
    """Quadratic eq. 19 in float64: out_m = sum_n (R_m qf_m).(R_n kf'_n) v_n / sum_n qf_m.kf'_n over visible n,
    each term of both sums times gamma_h^(p_m - p_n) with ``decay`` (causal: gamma (H,) per head, p the positions).

    Shapes as ``linear_attention``: qf, kf (B, H, N, r), v (B, H, N, dv), k_logscale (B, H, N); cross-attention
    (``causal=False``): kf (B, H, M, r), v (B, H, M, dv) at ``key_positions`` (default 0..M-1). Returns
    (B, H, N, dv) in float64. Rotations are applied as relative ones (``_relative_scores``): exact at any scale.
    """
    cross = key_positions is not None or kf.shape[2] != qf.shape[2]
    if cross and causal:
        raise ValueError("key_positions: expected None and keys as long as the queries with causal=True")
    check_qkv(("qf", "kf"), qf, kf, v, cross)
    B, H, N, r = qf.shape
    M = kf.shape[2]
    qf, kf, vv = qf.to(F64), kf.to(F64), v.to(F64)
    keep = torch.ones(B, 1, N, M, dtype=torch.bool, device=qf.device)
    if causal:
        keep = keep & torch.ones(N, N, dtype=torch.bool, device=qf.device).tril()
    if key_padding_mask is not None:
        keep = keep & check_mask(key_padding_mask, B, M)[:, None, None, :]
    weight = keep.to(F64)  # (B, 1 or H, N, N): exp(s_n - max visible s) on visible keys, 0 elsewhere
    pos = resolve_positions(positions, N, qf.device, B)
    if k_logscale is not None or decay is not None:
        s = qf.new_zeros(B, H, 1, M) if k_logscale is None else k_logscale.to(F64)[:, :, None, :]
        if decay is not None:  # log gamma^(p_m - p_n), per head
            if not causal:
                raise ValueError("decay: expected causal=True")
            dist_ = (pos[..., :, None] - pos[..., None, :]).to(F64)  # (N, N) or (B, N, N)
            if dist_.dim() == 3:
                dist_ = dist_[:, None]
            s = s + _log_gamma(decay, H).view(1, H, 1, 1) * dist_
        s = s.masked_fill(~keep, -math.inf)  # (B, H, N, N)
        top = s.amax(-1, keepdim=True)
        weight = torch.exp(s - torch.where(torch.isfinite(top), top, 0))
    kpos = resolve_positions(key_positions, M, qf.device, B) if cross else None
    den = ((qf @ kf.transpose(-1, -2)) * weight).sum(-1, keepdim=True)
    if rotary is None:
        num = qf @ kf.transpose(-1, -2)
    else:
        check_rotary(rotary, r, "the number of features r", learned=True)
        num = _relative_scores(qf, kf, rotary, pos, kpos)
    out = ((num * weight) @ vv) / torch.where(den == 0, 1, den)
    return out.masked_fill(den == 0, 0)


def _favor_features(q: Tensor, k: Tensor, projection: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 FAVOR+ features of q and of k, and the keys' log-scales."""
    W = projection.to(F64)
    qf, _ = favor_plus(q.to(F64), W, is_query=True)
    kf, ks = favor_plus(k.to(F64), W, is_query=False)
    return qf, kf, ks


def favor_attention_naive(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, **kwargs) -> Tensor:
    """Quadratic reference of ``favor_attention`` in float64 (``linear_attention_naive`` on FAVOR+ features)."""
    qf, kf, ks = _favor_features(q, k, projection)
    return linear_attention_naive(qf, kf, v, k_logscale=ks, **kwargs)


def linear_attention_recurrent(qf: Tensor, kf: Tensor, v: Tensor, *, rotary: RotaryEmbedding | None = None,
                               positions: int | Tensor | None = None, key_padding_mask: Tensor | None = None,
                               k_logscale: Tensor | None = None, initial_state: AttentionState | None = None,
                               decay=None) -> tuple[Tensor, AttentionState]:
    """Causal eq. 19 one position at a time, in float64: the loop that decoding runs, written plainly.

    For t = 0..N-1: M = max(M, s_t); S = S e^(M_old - M) + R_t kf_t e^(s_t - M) v_t^T;
    z = z e^(M_old - M) + kf_t e^(s_t - M); out_t = (R_t qf_t) S / (qf_t . z), 0 if qf_t . z == 0.
    With ``decay`` (gamma (H,) per head), S and z are first multiplied by gamma^(p_t - p_(t-1)) (positions p
    consecutive: by gamma), so a key at distance m - n weighs gamma^(m - n): the state decays as it is carried.
    The log-scale reference then lives in the log of the *decayed* sums: M drops by the same log gamma.
    Returns (out (B, H, N, dv) float64, the ``AttentionState`` after the last position, in the order of
    ``linear_attention``'s state).
    """
    check_qkv(("qf", "kf"), qf, kf, v)
    B, H, N, r = qf.shape
    dv = v.shape[-1]
    qf, kf, v = qf.to(F64), kf.to(F64), v.to(F64)
    if initial_state is None:
        S, z = qf.new_zeros(B, H, r, dv), qf.new_zeros(B, H, r)
        M, offset = qf.new_full((B, H), -math.inf), 0
    else:
        S, z, offset = initial_state.numerator.to(F64), initial_state.key_sum.to(F64), initial_state.offset
        M = torch.where(initial_state.log_ref > -1e29, initial_state.log_ref.to(F64), -math.inf)
    rot = _rotation(rotary, r, offset if positions is None else positions, N, qf.device, B)
    rq, rk = (qf, kf) if rot is None else (rot(qf), rot(kf))
    s = qf.new_zeros(B, H, N) if k_logscale is None else k_logscale.to(F64)
    if key_padding_mask is not None:
        s = s.masked_fill(~check_mask(key_padding_mask, B, N)[:, None, :], -math.inf)
    pos = resolve_positions(offset if positions is None else positions, N, qf.device, B).to(F64)
    pos = pos.expand(B, N) if pos.dim() == 1 else pos
    log_gamma = None if decay is None else _log_gamma(decay, H).view(1, H)
    outs = []
    for t in range(N):
        if log_gamma is not None and t > 0:  # carry the state one step: it decays with the distance travelled
            M = M + log_gamma * (pos[:, t] - pos[:, t - 1])[:, None]
        elif log_gamma is not None and initial_state is not None:  # from the state's offset to the first position
            M = M + log_gamma * (pos[:, 0] - (initial_state.offset - 1))[:, None]
        M_new = torch.maximum(M, s[:, :, t])
        ref = torch.where(torch.isfinite(M_new), M_new, 0)
        decay = torch.exp(torch.where(torch.isfinite(M), M, ref) - ref)  # old sums are 0 while M is -inf
        w = torch.exp(s[:, :, t] - ref)  # 0 for a padded key
        S = S * decay[..., None, None]
        z = z * decay[..., None] + w[..., None] * kf[:, :, t]
        M = M_new
        den = (qf[:, :, t] * z).sum(-1, keepdim=True)
        # the key at t enters unrotated (distance 0: the rotations cancel, and R_t qf . R_t kf would be rounded
        # to eps |qf| |kf|, see _relative_scores); the state holds the rotated earlier keys
        self_term = (w * (qf[:, :, t] * kf[:, :, t]).sum(-1))[..., None] * v[:, :, t]
        num = (rq[:, :, t, :, None] * S).sum(-2) + self_term
        S = S + (w[..., None] * rk[:, :, t])[..., None] * v[:, :, t, None, :]
        outs.append((num / torch.where(den == 0, 1, den)).masked_fill(den == 0, 0))
    M_out = torch.where(torch.isfinite(M), M, torch.full_like(M, -1e30))
    return torch.stack(outs, 2), AttentionState(S, z, M_out, offset + N)


def favor_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, **kwargs
                              ) -> tuple[Tensor, AttentionState]:
    """One-position-at-a-time reference of causal ``favor_attention`` (float64 FAVOR+ features)."""
    qf, kf, ks = _favor_features(q, k, projection)
    return linear_attention_recurrent(qf, kf, v, k_logscale=ks, **kwargs)
