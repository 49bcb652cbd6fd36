"""A few causal positions continuing a state, without the chunked engine (private; ``linrope.functional`` picks
it for decoding).

A decoding step is one position (or a few) read against an ``AttentionState``: some 0.3 MFLOP at r = 256, dv = 64,
8 heads, where the chunked engine (``chunked.py``) spends about a millisecond planning groups, chunks, scans and
workspaces. Here the same sums are a handful of tensor operations on (BH, N, .) tensors, N <= ``MAX_POSITIONS``:

    out_t = [e_t (R_t fq_t) S0 + sum_{n<=t} w_tn a_tn v_n] / [e_t fq_t . z0 + sum_{n<=t} w_tn fq_t . k0_n]

with a_tn = (R_t fq_t) . (R_n k0_n) for n < t and the distance-0 term a_tt = fq_t . k0_t taken unrotated (with a
learned phase, (R_phase fq_t) . k0_t), as ``chunked._distance0`` takes it: rotating both sides would round it to
eps |fq_t| |k0_t|. It is the engine's arithmetic, with the engine's rules:

* Key magnitudes are log-scales (float64) relative to a reference. Every key n gets its own, the running max
  m_n = max(M0, s_0, ..., s_n) of the state's ``log_ref`` and the keys up to it, so its feature k0_n carries
  exp(s_n - m_n) <= 1 and is exactly 1 when it raises the max; row t reads key n with w_tn = exp(m_n - m_t) <= 1
  and the state with e_t = exp(M0 - m_t) <= 1. No row refers to a later key, so a key far above the others (the
  engine's ``JUMP_LIMIT`` case) needs no split: it underflows nothing an earlier row sees. The returned state is
  relative to the last m, which is what the engine returns (M follows real keys; 0 stands in while there is none).
* Nothing is clamped: a row divides by what it sums (``chunked._divide``), and a row that sees no key returns 0.
* A non-finite key feature or value reaches the rows from its position on and no earlier one; those rows, and
  the returned state of that (batch, head), are NaN (``chunked._confine``'s rule). Padded keys contribute 0
  whatever they hold (the feature sources zero them; ``functional`` zeroes padded values).
* Features come from the engine's feature sources (``FavorFeatures``, ``GivenFeatures``), rotations from its
  ``Rotation`` (interleaved pairs) and ``AngleRotation`` (learned angles); half-split pairs are turned in place by
  one complex multiply of the halves instead of permuting the features and the state (two state copies a step).

No autograd: the caller takes this path only when nothing needs a gradient (``functional._run``), so the step
runs outside any graph. ``reference`` beside it is the same computation in float64, one position at a time.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import _distance0, _divide
from .feature_sources import LOG_DTYPE, NEG, AngleRotation, FavorFeatures, GivenFeatures, Rotation, group_rows

MAX_POSITIONS = 16  # the most positions a call takes this path with: on the Zen 4 it took 0.35-0.6 of the
# engine's time from 1 to 16 positions (H = 8, r = 256), 0.8 at 32 (BENCHMARKS.md, "Decoding step")


def usable(causal: bool, positions: int, initial_state, needs_grad: bool, group, kernel: str) -> bool:
    """Whether a call runs here: causal, a few positions continuing a state, nothing to differentiate, one
    process, the torch kernels (or "cpp": the compiled step for one position). Anything else (gradients included)
    goes through the chunked engine."""
    return (causal and 0 < positions <= MAX_POSITIONS and initial_state is not None and not needs_grad
            and group is None and kernel in ("torch", "cpp"))


def run(call, x) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``chunked.run``'s twin for a call that is ``usable`` here: the same ``Call`` and ``Inputs``, the same
    results (out, S, z, M), without autograd."""
    return step(call.features, call.interleaved, call.cfg.dtype, x.q, x.k, x.v, x.S0, x.z0, x.M0,
                k_logscale=x.k_logscale, key_bias=x.key_bias, projection=x.projection, mask=x.mask, cos=x.cos,
                sin=x.sin, theta=x.theta, phase=x.phase, angle_positions=x.angle_positions,
                first_position=call.first_position, compiled=call.cfg.kernel == "cpp")


def _no_autocast(device: torch.device):
    """Autocast off, as in the engine (features, state and normalizer in the compute dtype); free when it is off."""
    return torch.autocast(device.type, enabled=False) if _autocast_on(device) else nullcontext()


def _rotate(pair: Tensor, B: int, cos, sin, interleaved: bool, theta, phase, angle_positions, first_position):
    """(R fq, R k0, R_phase fq or None) from pair (2, BH, N, r) = (fq, k0): both by the same cos/sin tables (one
    complex multiply; half-split pairs (i, i + r/2) turned where they are, where the engine permutes features and
    states), or by learned angles (queries theta p + phase, keys theta p: ``AngleRotation``)."""
    _, BH, N, r = pair.shape
    if theta is not None:
        H = BH // B
        rq = AngleRotation(theta, phase, angle_positions, H, pair.dtype, first_position)
        rk = AngleRotation(theta, None, angle_positions, H, pair.dtype, first_position)
        fq, k0 = pair
        pq = None if phase is None else rq.phase_only(fq, torch.empty_like(fq))
        return rq(fq, 0, N, torch.empty_like(fq)), rk(k0, 0, N, torch.empty_like(k0)), pq
    f = Rotation(cos, sin).factor(0, N)  # (N, r/2), or (B, N, r/2): the heads of an example share it
    x = pair.view(2, B, -1, N, r)
    f = f[:, None] if f.dim() == 3 else f
    if interleaved:
        out = torch.view_as_real(torch.view_as_complex(x.view(*x.shape[:-1], -1, 2)) * f).view(pair.shape)
    else:
        c = torch.complex(x[..., :r // 2], x[..., r // 2:]) * f
        out = torch.cat((c.real, c.imag), -1).view(pair.shape)
    return out[0], out[1], None


def step(features: str, interleaved: bool, dtype: torch.dtype, q: Tensor, k: Tensor, v: Tensor, S0: Tensor,
         z0: Tensor, M0: Tensor, k_logscale: Tensor | None = None, key_bias: Tensor | None = None,
         projection: Tensor | None = None, mask: Tensor | None = None, cos: Tensor | None = None,
         sin: Tensor | None = None, theta: Tensor | None = None, phase: Tensor | None = None,
         angle_positions: Tensor | None = None, first_position: int | None = None, factor: Tensor | None = None,
         compiled: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Causal eq. 19 over N positions continuing the state (S0, z0, M0); what the engine's causal pass returns.

    Arguments as the engine takes them: features 'favor' (q, k raw (B, H, N, d), ``projection`` (r, d), and
    ``k_logscale`` (B, H, N) a log-bias of the keys or None) or 'features' (q, k features (B, H, N, r),
    ``k_logscale`` (B, H, N) or None); v (B, H, N, dv) (padded values
    already 0); S0 (B, H, r, dv), z0 (B, H, r) in ``dtype``, M0 (B, H) ``LOG_DTYPE`` (a decay's bias included);
    key_bias (B*H, N) ``LOG_DTYPE`` (a decay); mask (B, N) bool, True = keep; cos, sin (N, r/2) or (B, N, r/2) of
    the pairing ``interleaved``, or learned theta, phase (H, r/2) at ``angle_positions`` ((N,) or (B, N) float64,
    ``first_position`` their first when consecutive); for N = 1 the fixed rotation may come as ``factor`` instead
    of cos, sin: cos + i sin as one complex tensor (1, r/2) or (B, 1, r/2). Nothing is written into the inputs.
    ``compiled``: one position goes through the compiled step (``_one_compiled``; CPU tensors).

    Returns out (B, H, N, dv) in v's dtype, S (B, H, r, dv), z (B, H, r) in ``dtype`` and M (B, H) ``LOG_DTYPE``.
    """
    B, H, N, dv = v.shape
    if N == 1:
        one = _one_compiled if compiled else _one
        args = (features, interleaved, dtype, q, k, v, S0, z0, M0, k_logscale, key_bias, projection, mask, cos, sin,
                theta, phase, angle_positions, factor)
        with _no_autocast(v.device):  # features, state and normalizer in the compute dtype, as in the engine
            return one(*args)
    BH, r = B * H, S0.shape[2]
    with _no_autocast(v.device):
        if features == "favor":
            src = FavorFeatures(q, k, projection, mask, dtype, key_bias, k_logscale)
        else:
            src = GivenFeatures(q, k, k_logscale, mask, None, dtype, key_bias)
        buf = torch.empty(2, BH, N, r, dtype=dtype, device=v.device)
        fq, u, logscale = src.pair(0, N, buf)  # FAVOR+: one product for queries and keys, into buf
        S0, z0, M0 = S0.reshape(BH, r, dv), z0.reshape(BH, r), M0.reshape(BH)
        W = None  # (BH, N, N) or (N, N): row t's weight of key n (N > 1)
        if logscale is None:  # keys carry no magnitudes: no references, the state is as it was summed
            k0, M, e = src.key_finish(0, N, u, None, None, buf[1]), M0, fq.new_ones(BH, N)
            if N > 1:
                W = fq.new_ones(N, N).tril_()
        else:
            # m_n = max(M0, s_0..s_n): key n's reference and row n's (NaN from a NaN log-scale on); 0 stands in
            # while no key is seen. M follows real keys (padded ones are NEG): the last m.
            M = torch.maximum(logscale if N == 1 else logscale.cummax(1).values, M0[:, None])
            refs = M.masked_fill(M <= NEG / 2, 0)
            M = M[:, -1]
            k0 = src.key_finish(0, N, u, logscale, refs, buf[1])
            e = torch.exp(M0[:, None] - refs).to(dtype)  # (BH, N): the state at each row's reference
            if N > 1:  # exp(m_n - m_t) <= 1 for n <= t; a later key's may be inf: masked, never multiplied. The
                # stand-in 0 of a key before any real one (padded: its features are 0) may exceed a later real m_t
                # (e.g. every log-scale below -88): capped at exp(0), or 0 * inf would be NaN
                W = torch.exp((refs[:, None, :] - refs[:, :, None]).clamp_max_(0)).to(dtype).masked_fill_(
                    ~torch.ones(N, N, dtype=torch.bool, device=v.device).tril_(), 0)
        V = group_rows(v, 0, N, dtype=dtype)
        rope = cos is not None or theta is not None
        pq = None
        if rope:
            pair = buf if features == "favor" else torch.stack((fq, k0))  # FAVOR+'s are in buf already
            qr, kr, pq = _rotate(pair, B, cos, sin, interleaved, theta, phase, angle_positions, first_position)
        else:
            qr, kr = fq, k0
        # a non-finite key feature or value: its row and the later ones (their e) become NaN, with the state;
        # x * 0 is 0 unless x is not finite (a sum of x could overflow)
        bad = (torch.cat((k0, kr, V) if rope else (k0, V), -1) * 0).sum(-1) != 0
        if N > 1:  # the earlier rows compute without it (0 * nan would stay nan)
            k0, kr, V = (x.masked_fill(bad.unsqueeze(-1), 0) for x in (k0, kr, V))
            bad = bad.cummax(1).values
        e = e.masked_fill(bad, math.nan)
        ev = e.unsqueeze(-1)
        num = torch.bmm(qr * ev, S0)
        if N == 1:  # the row's one new key is at distance 0: unrotated; the new z is what its normalizer reads
            z = torch.addcmul(k0.view(BH, r), z0, e)
            num.addcmul_(torch.linalg.vecdot(fq if pq is None else pq, k0).unsqueeze(-1), V)
            den = torch.linalg.vecdot(fq.view(BH, r), z)
            S = (S0 * ev).addcmul_(kr.transpose(1, 2), V)
        else:
            D = torch.bmm(fq, k0.transpose(1, 2)).mul_(W)  # the unrotated products: the normalizer's terms
            A = D if not rope else torch.bmm(qr, kr.transpose(1, 2)).mul_(W)
            if rope:  # distance 0 unrotated (W's diagonal is 1)
                A.diagonal(0, 1, 2).copy_(_distance0(D, pq, k0))
            num.baddbmm_(A, V)
            den = torch.baddbmm(D.sum(-1, keepdim=True), fq * ev, z0.unsqueeze(-1))
            last, f = W[..., -1, :].unsqueeze(-1), e[:, -1]  # the state after the last position, at its reference
            S = (S0 * f[:, None, None]).baddbmm_((kr * last).transpose(1, 2), V)
            z = torch.addcmul((k0 * last).sum(1), z0, f.unsqueeze(-1))
        out = v.new_empty(B, H, N, dv)
        _divide(num, den.view(BH, N), out.view(BH, N, dv))
    return out, S.view(B, H, r, dv), z.view(B, H, r), M.view(B, H)


def _one(features, interleaved, dtype, q, k, v, S0, z0, M0, k_logscale=None, key_bias=None, projection=None,
         mask=None, cos=None, sin=None, theta=None, phase=None, angle_positions=None, factor=None):
    """``step`` for one position, the token-by-token decoding step, in as few tensor operations as its arithmetic
    allows: at these sizes each operation costs a microsecond or two of dispatch, more than its arithmetic, so the
    query and the key travel as one (2, B, H, 1, .) pair, per-head scalars as (B, H, 1, 1) that broadcast without
    views, and nothing is computed that one position does not need (no intra-step scores, no cumulative maxima).

    The same sums as ``step`` with N = 1. The row's one new key is its own, at distance 0 (unrotated). With the
    key's log-scale s and the state's M0, m = max(M0, s) and the weights e = exp(M0 - m) of the state and
    w = exp(s - m) of the key come from the pair (M0, s) at once, each <= 1 and one of them exactly 1 (both 1
    when neither holds a key: the state is empty and the key padded, whose features are zeroed). FAVOR+ keys are
    exp(u - max u) * w (the engine subtracts the log-scale inside the exponent and scales W, not x, by d^(-1/4):
    the same values to float32 rounding), with s = max u - |k~|^2/2 formed in float32 and carried in float64.
    A non-finite key feature or value turns e into NaN through one sum of x * 0 (rotated key features: a pair
    turned by a unit factor is non-finite when it was; FAVOR+ keys make w NaN themselves), so the row and the
    state of its (batch, head) are NaN.
    The state is read twice, for the row's product and for the update; where e is exactly 1 on every head (a
    key below the running max, or keys without magnitudes: the common case without a decay) the update is one
    pass, S0 + k v^T, the value of (S0 * 1) + k v^T; that test reads e on the host, so it is made on CPUs only.

    ``factor``: the fixed rotation as complex numbers cos + i sin, (1, r/2) or (B, 1, r/2), instead of cos, sin.
    """
    B, H, _, dv = v.shape
    r = S0.shape[2]
    M0 = M0.view(B, H, 1, 1)
    if features == "favor":  # u = x~ W^T for the query and the key at once, exp(u - max u) in place
        x = torch.stack((q, k))  # (2, B, H, 1, d)
        x = (x if x.dtype == dtype else x.to(dtype)).mul_(q.shape[-1] ** -0.25)  # x~
        u = F.linear(x, projection if projection.dtype == dtype else projection.to(dtype))  # (2, B, H, 1, r)
        top = u.amax(-1, keepdim=True)
        u.sub_(top).exp_()
        s = torch.sub(top, x.square().sum(-1, keepdim=True), alpha=0.5)  # the key's log-scale in row 1 (float32)
        if key_bias is not None:
            s = s + key_bias.view(B, H, 1, 1)  # float64
        if k_logscale is not None:  # a log-bias of the key (a gate's -G)
            s = s + k_logscale.view(B, H, 1, 1).to(LOG_DTYPE)
        ms = torch.where(_first_row(v.device), M0, s)  # (2, B, H, 1, 1) in LOG_DTYPE: the state's, the key's
        fq, kb = u.unbind(0)  # (B, H, 1, r) each: views of u, k0 written in place below
    else:
        fq, kb = (x if x.dtype == dtype else x.to(dtype) for x in (q, k))  # maybe the inputs: never written
        s = None if k_logscale is None else k_logscale.view(B, H, 1, 1)
        if key_bias is not None:
            bias = key_bias.view(B, H, 1, 1)
            s = bias if s is None else s + bias  # float64
        ms = None if s is None else torch.stack((M0, s.to(LOG_DTYPE)))
    if mask is not None:
        keep = mask.view(B, 1, 1, 1)
        if ms is not None:
            ms[1].masked_fill_(~keep, NEG)
    if ms is None:  # keys carry no magnitudes: the state is as it was summed
        e, M = None, M0
        k0 = kb if mask is None else kb.masked_fill(~keep, 0)
    else:
        M = ms.amax(0)  # (B, H, 1, 1); NaN from a NaN log-scale
        e, w = ms.sub_(M).exp_().to(dtype).unbind(0)  # (B, H, 1, 1) each
        k0 = kb.mul_(w) if features == "favor" else kb * w
        if mask is not None:  # whatever a padded key holds (inf * 0 = nan), it contributes 0
            k0 = k0.masked_fill_(~keep, 0)
    V = v if v.dtype == dtype else v.to(dtype)
    pq = None
    if factor is None and cos is not None:
        factor = torch.complex(cos, sin)
    if factor is not None or theta is not None:
        pair = u if features == "favor" else torch.stack((fq, k0))  # (2, B, H, 1, r): FAVOR+'s k0 is in u
        if theta is None:
            f = factor if factor.dim() == 2 else factor.unsqueeze(1)  # the heads of an example share it
        else:  # learned: queries turn by theta p + phase, keys by theta p; pq = R_phase fq
            f, pf = _angle_factors(theta, phase, angle_positions, dtype)
            if pf is not None:
                pq = torch.view_as_real(_as_complex(pair[0]) * pf).view(B, H, 1, r)  # pair[0]: fq, contiguous
        if interleaved or theta is not None:
            turned = torch.view_as_real(_as_complex(pair) * f).view(2, B, H, 1, r)
        else:  # half-split pairs (i, i + r/2) turned where they are
            c = torch.complex(pair[..., :r // 2], pair[..., r // 2:]) * f
            turned = torch.cat((c.real, c.imag), -1)
        qr, kr = turned.unbind(0)
    else:
        qr, kr = fq, k0
    # 0, or NaN where a key feature or value is not finite (x * 0 is 0 unless x is not finite). FAVOR+ keys need
    # no look: a non-finite k makes s NaN or +inf (|k~|^2 overflows before any u does), so w is NaN and k0 too
    checked = V if features == "favor" else torch.cat((kr, V), -1)
    bad = (checked * 0).sum(-1, keepdim=True)
    e = bad.add_(1) if e is None else bad.add_(e)  # (B, H, 1, 1)
    one = S0.device.type == "cpu" and torch.equal(e, _ones(e))  # every e is 1: x * e is x
    num = torch.matmul(qr if one else qr * e, S0)  # (B, H, 1, dv)
    num.addcmul_((fq if pq is None else pq).mul(k0).sum(-1, keepdim=True), V)  # distance 0: unrotated
    z = torch.addcmul(k0, z0.unsqueeze(2), e)  # (B, H, 1, r)
    den = fq.mul(z).sum(-1, keepdim=True)
    krt = kr.transpose(2, 3)
    S = torch.addcmul(S0, krt, V) if one else (S0 * e).addcmul_(krt, V)  # one pass where every e is 1
    empty = den == 0  # a row that sees no key returns 0
    out = num.div_(den).masked_fill_(empty, 0)
    if out.dtype != v.dtype:
        out = out.to(v.dtype)
    return out, S, z.view(B, H, r), M.view(B, H)


def _one_compiled(features, interleaved, dtype, q, k, v, S0, z0, M0, k_logscale=None, key_bias=None, projection=None,
                  mask=None, cos=None, sin=None, theta=None, phase=None, angle_positions=None, factor=None):
    """``_one`` through the compiled step (``step_cpu.cpp``, built by ``compiled.module``): the same arguments and
    results. Here the inputs are cast and laid out as (B*H, .) rows and the rotation factors made as ``_one`` makes
    them (as real (cos, sin) pairs); the features, weights, rotation, state pass and division are one call."""
    from . import compiled

    B, H, _, dv = v.shape
    BH, r = B * H, S0.shape[2]

    def rows(x, *shape, dt=dtype):  # (B, H, ...) -> (BH, ...) in dt, contiguous (no copy where it is already)
        return x.to(dt).reshape(BH, *shape).contiguous()

    qf = kf = pf = None
    if theta is not None:  # learned: queries by theta p + phase, keys by theta p (always interleaved pairs)
        f, p = _angle_factors(theta, phase, angle_positions, dtype)  # (2, 1 or B, H, 1, r/2), (H, 1, r/2)
        qf, kf = (torch.view_as_real(x).flatten(2, 3) for x in f.unbind(0))  # (1 or B, H, r/2, 2)
        pf = None if p is None else torch.view_as_real(p).flatten(1, 2)
        interleaved = True
    else:
        if factor is None and cos is not None:
            factor = torch.complex(cos, sin)
        if factor is not None:  # (1, r/2) or (B, 1, r/2): the heads of an example share it
            qf = kf = torch.view_as_real(factor.reshape(-1, 1, r // 2))
    d = q.shape[-1]
    out, S, z, M = compiled.module().step_one(
        rows(q, d), rows(k, d), rows(v, dv), rows(S0, r, dv), rows(z0, r), rows(M0, dt=LOG_DTYPE),
        None if projection is None else projection.to(dtype).contiguous(),
        None if k_logscale is None else rows(k_logscale, dt=LOG_DTYPE),
        None if key_bias is None else rows(key_bias, dt=LOG_DTYPE),
        None if mask is None else mask.reshape(B).contiguous(), qf, kf, pf, interleaved, H)
    return out.view(B, H, 1, dv).to(v.dtype), S.view(B, H, r, dv), z.view(B, H, r), M.view(B, H)


_AUTOCAST: dict = {}  # device type -> whether autocast exists there
_CONSTANTS: dict = {}  # (what, device, ...) -> a small constant tensor


def _autocast_on(device: torch.device) -> bool:
    kind = device.type
    there = _AUTOCAST.get(kind)
    if there is None:
        there = _AUTOCAST[kind] = torch.amp.is_autocast_available(kind)
    return there and torch.is_autocast_enabled(kind)


def _first_row(device: torch.device) -> Tensor:
    """(2, 1, 1, 1, 1) bool, True in row 0: the query's row of a (2, B, H, 1, 1) pair."""
    key = ("first", device)
    got = _CONSTANTS.get(key)
    if got is None:
        got = _CONSTANTS[key] = torch.tensor([True, False], device=device).view(2, 1, 1, 1, 1)
    return got


def _ones(e: Tensor) -> Tensor:
    """Ones of e's shape, dtype and device (kept: compared against on every step)."""
    key = ("ones", e.device, e.dtype, e.shape)
    got = _CONSTANTS.get(key)
    if got is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        got = _CONSTANTS[key] = torch.ones(e.shape, dtype=e.dtype, device=e.device)
    return got


def _as_complex(x: Tensor) -> Tensor:
    """(..., r) real, contiguous in its last dim, as (..., r/2) complex pairs (2i, 2i+1)."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def _angle_factors(theta: Tensor, phase: Tensor | None, angle_positions: Tensor, dtype: torch.dtype):
    """Learned rotations at one position p ((1,) or (B, 1) float64): the factors (2, 1 or B, H, 1, r/2) of the
    query (theta p + phase) and of the key (theta p), and the phase's own (H, 1, r/2) (None without a phase), from
    float64 angles as ``AngleRotation`` makes them (its factor for one position is the same number)."""
    theta = theta.detach().to(torch.float64)
    ang = angle_positions.view(-1, 1, 1) * theta  # (1 or B, H, r/2)
    ph = None if phase is None else phase.detach().to(torch.float64)
    angs = torch.stack((ang if ph is None else ang + ph, ang)).unsqueeze(-2)
    f = torch.complex(angs.cos().to(dtype), angs.sin().to(dtype))
    pf = None if ph is None else torch.complex(ph.cos().to(dtype), ph.sin().to(dtype)).unsqueeze(1)
    return f, pf


# ---------------------------------------------------------------------------------------------- float64 reference
def reference(features: str, interleaved: bool, q: Tensor, k: Tensor, v: Tensor, S0: Tensor, z0: Tensor,
              M0: Tensor, k_logscale: Tensor | None = None, key_bias: Tensor | None = None,
              projection: Tensor | None = None, mask: Tensor | None = None, cos: Tensor | None = None,
              sin: Tensor | None = None, theta: Tensor | None = None, phase: Tensor | None = None,
              angle_positions: Tensor | None = None, first_position: int | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``step`` in float64, one position at a time, written plainly (for tests): the state is carried to the new
    key's magnitude, the key is added, the row reads the state with its own key unrotated. Same arguments; returns
    (out, S, z, M), all float64. Rotations: the given cos/sin (cast up), or theta p + phase in float64."""
    F64 = torch.float64
    B, H, N, dv = v.shape
    if features == "favor":  # phi(x) = exp(u - |x~|^2 / 2), u = x~ W^T, x~ = x d^(-1/4): a bounded part, a log-scale
        xq, xk = (x.to(F64) * x.shape[-1] ** -0.25 for x in (q, k))
        uq, uk = xq @ projection.to(F64).t(), xk @ projection.to(F64).t()
        qf = torch.exp(uq - uq.amax(-1, keepdim=True))
        kf = torch.exp(uk - uk.amax(-1, keepdim=True))
        s = uk.amax(-1) - 0.5 * xk.square().sum(-1)
        if k_logscale is not None:  # a log-bias of each key (a gate's -G)
            s = s + k_logscale.to(F64)
    else:
        qf, kf = q.to(F64), k.to(F64)
        s = None if k_logscale is None else k_logscale.to(F64)
    if key_bias is not None:
        s = (0 if s is None else s) + key_bias.view(B, H, N)
    keep = torch.ones(B, 1, N, dtype=torch.bool, device=v.device) if mask is None else mask[:, None, :]
    vv = v.to(F64).masked_fill(~keep[..., None], 0)
    kf = kf.masked_fill(~keep[..., None], 0)

    def turn(x, f, pairs_interleaved=True):  # the pairs of x as complex numbers, times f
        h = x.shape[-1] // 2
        a, b = (x[..., 0::2], x[..., 1::2]) if pairs_interleaved else (x[..., :h], x[..., h:])
        c = torch.complex(a, b) * f
        return torch.stack((c.real, c.imag), -1).flatten(-2) if pairs_interleaved else torch.cat((c.real, c.imag), -1)

    if cos is not None:  # (N, r/2), or (B, N, r/2): the heads of an example share it
        f = torch.complex(cos.to(F64), sin.to(F64))
        f = f[:, None] if f.dim() == 3 else f
        rq, rk, self_q = turn(qf, f, interleaved), turn(kf, f, interleaved), qf
    elif theta is not None:  # (H, N, r/2), or (B, H, N, r/2) for positions per example
        ang = angle_positions.to(F64)[..., None, :, None] * theta.to(F64)[:, None, :]
        ph = phase.to(F64)[:, None, :]
        unit = lambda a: torch.polar(torch.ones_like(a), a)  # noqa: E731
        rq, rk, self_q = turn(qf, unit(ang + ph)), turn(kf, unit(ang)), turn(qf, unit(ph))
    else:
        rq, rk, self_q = qf, kf, qf
    S, z, M = S0.to(F64).clone(), z0.to(F64).clone(), M0.to(F64).clone()
    outs = []
    for t in range(N):
        if s is not None:  # carry the state to this key's magnitude if it is the larger
            st = s[:, :, t].masked_fill(~keep[:, :, t], -math.inf)
            M_new = torch.maximum(M, st)
            ref = torch.where(M_new > NEG / 2, M_new, 0)
            S, z = S * torch.exp(M - ref)[..., None, None], z * torch.exp(M - ref)[..., None]
            w = torch.exp(st - ref)
            M = M_new
        else:
            w = keep[:, :, t].to(F64).expand(B, H)
        z = z + w[..., None] * kf[:, :, t]
        den = (qf[:, :, t] * z).sum(-1)
        own = w * (self_q[:, :, t] * kf[:, :, t]).sum(-1)  # distance 0: unrotated
        num = (rq[:, :, t, :, None] * S).sum(-2) + own[..., None] * vv[:, :, t]
        S = S + (w[..., None] * rk[:, :, t])[..., None] * vv[:, :, t, None, :]
        outs.append(torch.where(den[..., None] == 0, 0, num / torch.where(den == 0, 1, den)[..., None]))
    return torch.stack(outs, 2), S, z, M
