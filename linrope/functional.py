"""Pure attention functions. Layout is that of ``torch.nn.functional.scaled_dot_product_attention``.

Shape legend: B batch, H heads, N sequence length, d query/key size, dv value size, r number of features.

* ``linear_attention``: normalized linear attention on given features, with RoFormer's eq. 19 when ``rotary``
  is given: out_m = sum_n (R_m qf_m).(R_n kf_n) v_n / sum_n qf_m.kf_n (n <= m when causal).
* ``favor_attention``: the same with FAVOR+ features computed inside from raw q, k and a projection, and
  recomputed in the backward instead of stored (O(N d) memory, like a flash kernel).
* ``softmax_attention``: the softmax baseline through ``scaled_dot_product_attention``, RoPE on q and k.

Their references (quadratic and one-position-at-a-time, float64) are in ``linrope.reference``.

Causal linear attention is chunked (``chunk_size``) and never builds an N x N or N x r x dv tensor. Streaming
passes an ``AttentionState`` in and out: a sequence fed in pieces of any sizes gives the output of one pass.
Sequence parallelism (``group=``) splits one sequence across the ranks of a ``torch.distributed`` group, which
exchange states only.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (check_group_size, check_int, check_kernel, check_mask, check_precision, check_qkv, check_tensor,
                      is_int)
from ._engine import Call, EngineConfig, Inputs, empty_state, run
from ._engine import parallel, products, step, triton_kernels, tuning
from ._engine.feature_sources import LOG_DTYPE
from .features import compute_dtype
from .rotary import MAX_POSITION, LearnedRotary, RotaryEmbedding, check_rotary, resolve_positions

__all__ = ["AttentionState", "linear_attention", "favor_attention", "softmax_attention"]


@dataclass
class AttentionState:
    """Running state of causal linear attention after ``offset`` positions (for streaming and decoding).

    Attributes:
        numerator: (B, H, r, dv) sum over past keys of exp(s_n - log_ref) (R_n kf_n) v_n^T (rotated if RoPE).
        key_sum: (B, H, r) sum over past keys of exp(s_n - log_ref) kf_n (never rotated: the normalizer).
        log_ref: (B, H) reference log-scale of both sums (the largest key log-scale seen so far).
        offset: number of positions consumed; the default position of the next token.
        signature: what the sums were made with (feature kind, rotation, decay), set by the call that returned
            the state; a call continuing it with other options refuses it. None (a state built by hand) is
            taken as it is.
        clock: (B, H) float64, the selective rotation's clock A after the last position (``clock=`` of
            ``linear_attention``): the keys in the sums are turned by theta A_n, and a continuing call's clock
            starts from it. None for states made without a clock (which a call with a clock refuses, and the
            other way round). Differentiable like the sums (it is the running sum of the clock's increments).
    """

    numerator: Tensor
    key_sum: Tensor
    log_ref: Tensor
    offset: int
    signature: tuple | None = None
    clock: Tensor | None = None

    def detach(self) -> "AttentionState":
        return AttentionState(self.numerator.detach(), self.key_sum.detach(), self.log_ref.detach(), self.offset,
                              self.signature, None if self.clock is None else self.clock.detach())

    def map(self, fn) -> "AttentionState":
        """The same state with ``fn`` applied to its tensors (e.g. selecting or repeating heads)."""
        return AttentionState(fn(self.numerator), fn(self.key_sum), fn(self.log_ref), self.offset, self.signature,
                              None if self.clock is None else fn(self.clock))


# ---------------------------------------------------------------------------------------------- linear attention
def documents(cu_seqlens, B: int, N: int) -> list[tuple[int, int]]:
    """[start, end) of each document packed in one row, from ``cu_seqlens`` (fla's convention: a 1-D integer
    tensor 0 = c_0 < c_1 < ... < c_D = N of cumulative lengths; the batch must be one packed row)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.dtype == torch.bool or cu_seqlens.numel() < 2:
        what = f"shape {tuple(cu_seqlens.shape)}, dtype {cu_seqlens.dtype}" if isinstance(cu_seqlens, Tensor) \
            else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor of cumulative lengths (0, ..., N), got {what}")
    cuts = [int(c) for c in cu_seqlens.tolist()]
    if cuts[0] != 0 or cuts[-1] != N or any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cu_seqlens: expected strictly increasing values from 0 to N = {N}, got {cuts}")
    if B != 1:
        raise ValueError(f"cu_seqlens: expected one packed row (B = 1), got B = {B}")
    return list(zip(cuts, cuts[1:]))


def document_positions(cu_seqlens, N: int, device=None) -> Tensor:
    """(N,) positions restarting at 0 at each document of ``cu_seqlens`` (see ``documents``)."""
    pos = torch.arange(N, device=device)
    for a, b in documents(cu_seqlens, 1, N):
        pos[a:b] -= a
    return pos


def _per_document(run_one, cu_seqlens, B: int, N: int, positions, key_padding_mask, streaming: bool,
                  cross: bool) -> Tensor:
    """Packed sequences: ``run_one(slice, positions, mask)`` on each document alone, outputs concatenated.
    Positions restart at each document (None), or follow the given int offset or (N,) / (B, N) tensor."""
    if cross:
        raise ValueError("cu_seqlens: expected keys at the queries' positions (no cross-attention when packed)")
    if streaming:
        raise ValueError("cu_seqlens: expected no initial_state/return_state (packed documents each start afresh)")
    if isinstance(positions, Tensor):  # checked against the whole row: a slice of a longer tensor would pass
        resolve_positions(positions, N, positions.device, B)
    check_mask(key_padding_mask, B, N)
    outs = []
    for a, b in documents(cu_seqlens, B, N):
        pos = positions[..., a:b] if isinstance(positions, Tensor) else positions
        mask = None if key_padding_mask is None else key_padding_mask[:, a:b]
        outs.append(run_one(slice(a, b), pos, mask))
    return torch.cat(outs, 2)


def _no_group(group) -> None:
    if group is not None:
        raise ValueError("cu_seqlens: expected group=None (packed documents and sequence parallelism do not mix)")


def _cross(q: Tensor, k: Tensor, causal, key_positions) -> bool:
    """Whether keys come from another sequence (cross-attention): their own length or positions. Non-causal only."""
    cross = key_positions is not None or (isinstance(k, Tensor) and isinstance(q, Tensor) and k.dim() == q.dim()
                                          and k.shape[-2] != q.shape[-2])
    if cross and causal:
        raise ValueError("key_positions: expected None and keys as long as the queries with causal=True (causal "
                         "attention reads keys at the queries' positions; cross-attention is causal=False)")
    return cross


@dataclass(frozen=True)
class _Start:
    """The state a call starts from, in the engine's terms: sums (B, H, r, dv), (B, H, r) in the compute dtype,
    their reference log-scale (B, H) in ``LOG_DTYPE`` (with a decay: of the sums as the keys' log-scales count
    them), and the number of positions before the call."""

    S0: Tensor
    z0: Tensor
    M0: Tensor
    offset: int


@torch.compiler.disable  # opaque to dynamo: a compiled model calls the eager engine (a graph break)
def _run(features, q, k, k_logscale, v, projection, r, *, causal, rotary, positions, chunk_size, group_size,
         initial_state, return_state, key_padding_mask, key_positions=None, cross=False, group=None, decay=None,
         kernel="torch", clock=None, precision="float32"):
    """The engine call behind ``linear_attention`` ('features') and ``favor_attention`` ('favor'): the argument
    checks, the state the call starts from, positions and rotations, then ``_engine.run``. ``clock``: the
    selective rotation's clock values A (B, H, N) float64 (``_clock_values``), the angles' positions per head."""
    B, H, N, dv = v.shape  # N: keys (the queries' length too, but in cross-attention)
    Nq = q.shape[2]
    _check_sizes(features, q, r, dv)
    chunk_size = check_int("chunk_size", chunk_size)
    group_size = check_group_size(group_size)
    mask = check_mask(key_padding_mask, B, N)
    if mask is not None:  # padded slots may hold anything (torch.empty, other buffers): 0 * nan would stay nan
        v = v.masked_fill(~mask[:, None, :, None], 0)
    if not causal and (initial_state is not None or return_state):
        raise ValueError("initial_state/return_state: streaming needs causal=True")
    dtype = compute_dtype(q, k, v)
    _check_kernel(kernel, chunk_size, dtype, v.device)
    _check_precision(precision, dtype, v.device, kernel)
    gammas = resolve_decay(decay, H)
    decay_rates = _decay_rates(gammas, causal, v.device)
    signature = (features, None if rotary is None else rotary.signature(), gammas)
    learned = _check_learned(rotary, causal, H, group)
    start = _start(initial_state, signature, (B, H, r, dv), dtype, decay_rates, v.device)
    if B * H == 0 or Nq == 0 or N == 0:  # nothing to attend with, or to (rows that see no key are 0)
        if group is not None:
            raise ValueError("group: expected at least one position, batch row and head on every rank")
        resolve_positions(positions if positions is not None else start.offset, Nq, v.device, B)
        out = v.new_zeros(B, H, Nq, dv)
        if not return_state:
            return out
        st = initial_state or AttentionState(start.S0, start.z0, start.M0, 0)
        return out, AttentionState(st.numerator, st.key_sum, st.log_ref, st.offset + N, signature,
                                   _clock_end(clock, initial_state))
    grads = (q, k, k_logscale, v, clock) + ((rotary.theta, rotary.phase) if learned else ()) + \
        ((initial_state.numerator, initial_state.key_sum) if initial_state is not None else ())
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grads)
    if group_size is None:  # 1 MiB work buffers, L2-sized for calls of many groups (see _engine/tuning.py)
        group_size = tuning.default_group_size(max(N, Nq), B * H, r, chunk_size, q.device)
    elif group_size == "auto":
        rotation = ("none" if rotary is None else "learned" if learned else
                    "interleaved" if rotary.interleaved else "half")
        group_size = tuning.auto_group_size(features, q, k_logscale, v, r, causal, rotation, chunk_size, dtype,
                                            cross)
    else:  # whole chunks
        group_size = -(-group_size // chunk_size) * chunk_size
    layout = None
    if group is not None:
        if cross:
            raise ValueError("group: expected self-attention (sequence parallelism splits one sequence; "
                             "cross-attention keys are not supported)")
        layout = parallel.layout(group, N, (B, H, r, dv, causal, features == "favor", k_logscale is not None,
                                            needs_grad, rotary is not None, initial_state is not None, return_state,
                                            decay_rates is not None), v.device)
    if positions is None:  # under sequence parallelism: after the earlier ranks' positions
        positions = start.offset + (0 if layout is None else layout.offset)
    rotations = _rotations(rotary, learned, positions, key_positions, cross, Nq, N, B, dtype, v.device)
    if clock is not None:  # the selective rotation: angles theta A per head (positions still weigh a decay)
        rotations["angle_positions"] = clock
    key_bias = None
    if decay_rates is not None:  # gamma^(m - n) = e^(-lam m) e^(lam n): the row factor cancels, keys get lam * n
        pos = resolve_positions(positions, Nq, v.device, B).to(LOG_DTYPE)
        key_bias = (decay_rates[:, None] * pos[..., None, :]).expand(B, H, N).reshape(B * H, N)
    call = Call(EngineConfig(causal=bool(causal), chunk_size=chunk_size, group_size=group_size, dtype=dtype,
                             needs_grad=needs_grad, kernel=kernel, precision=precision),
                features, interleaved=rotary is not None and rotary.interleaved,
                first_position=positions if learned and isinstance(positions, int) and clock is None else None,
                parallel=None if layout is None else parallel.Parallel(layout, initial_state is not None,
                                                                       return_state))
    # inputs go in as they are (half stays half: autograd keeps them); the engine casts each group
    inputs = Inputs(q=q, k=k, v=v, S0=start.S0, z0=start.z0, M0=start.M0, k_logscale=k_logscale, key_bias=key_bias,
                    projection=None if projection is None else projection.to(dtype), mask=mask, **rotations)
    # decoding: _engine/step.py, no autograd; a clock goes to the chunked engine (exact; step.py has no clocks)
    if clock is None and step.usable(causal, Nq, initial_state, needs_grad, group, kernel):
        out, S, z, M = step.run(call, inputs)
    else:
        out, S, z, M = run(call, inputs)
    if return_state:  # under sequence parallelism, every rank gets the state after the whole sequence
        st = _state_out(S, z, M, start.offset + (N if layout is None else layout.total), decay_rates, signature)
        st.clock = _clock_end(clock, initial_state)
        return out, st
    return out


# ---------------------------------------------------------------------------------------------- decoding steps
def _decoding_call(causal, initial_state, group, kernel, cross: bool, v: Tensor, inputs: tuple) -> bool:
    """Whether a call is a decoding step for ``_decode``: causal, continuing an ``AttentionState``, at most
    ``step.MAX_POSITIONS`` positions, nothing to differentiate, one process, the torch or cpp kernels, eager.
    What ``_run`` would refuse or differentiate goes to ``_run`` (the same checks, the same errors)."""
    if not (causal is True and isinstance(initial_state, AttentionState) and group is None
            and kernel in ("torch", "cpp")
            and not cross and 0 < v.shape[2] <= step.MAX_POSITIONS and v.shape[0] * v.shape[1] > 0):
        return False
    if torch.is_grad_enabled() and (any(t is not None and t.requires_grad for t in inputs)
                                    or initial_state.numerator.requires_grad or initial_state.key_sum.requires_grad):
        return False
    return not torch.compiler.is_compiling()  # under torch.compile: _run, opaque to dynamo


_RATES: dict = {}  # (gammas, device) -> lam (H,): a decay's rates, made once
_FACTORS: dict = {}  # id(rotary) -> (its signature, device, dtype, first position, (FACTOR_BLOCK, r/2) complex)
FACTOR_BLOCK = 64  # positions whose rotation factors one cos_sin call makes for the decoding steps ahead


def _step_factor(rotary: RotaryEmbedding, signature: tuple, p: int, device, dtype: torch.dtype) -> Tensor:
    """cos + i sin of ``rotary`` at position p (1, r/2), as ``rotary.cos_sin`` gives them (the same numbers),
    made FACTOR_BLOCK positions at a time: one call to cos_sin and one complex tensor per block instead of per
    token. Kept per rotary while it lives and its signature, device and dtype stay; 64 KiB at r = 256."""
    key = id(rotary)
    got = _FACTORS.get(key)
    if got is None or got[0] != signature or got[1] != device or got[2] != dtype or not got[3] <= p < got[3] + \
            got[4].shape[0]:
        n = max(1, min(FACTOR_BLOCK, MAX_POSITION - p))
        cos, sin = rotary.cos_sin(p, n, device, dtype)
        if got is None:  # forgotten with the rotary
            weakref.finalize(rotary, _FACTORS.pop, key, None)
        got = _FACTORS[key] = (signature, device, dtype, p, torch.complex(cos, sin))
    i = p - got[3]
    return got[4][i:i + 1]


def _decode(features, q, k, k_logscale, v, projection, r, rotary, positions, chunk_size, group_size, initial_state,
            return_state, key_padding_mask, decay, kernel, precision):
    """``_run`` for a call ``_decoding_call`` accepts: its argument checks, then ``step.step`` directly (no
    planning, no autograd Function). A decay is taken relative to the state's last position: its log_ref is
    kept as it is, key n weighs lam (p_n - offset + 1) more, and the returned log_ref is the step's less lam N
    (``_run`` adds lam (offset - 1) to every log-scale and subtracts it again: the same sums)."""
    B, H, N, dv = v.shape
    _check_sizes(features, q, r, dv)
    check_int("chunk_size", chunk_size)
    check_group_size(group_size)
    mask = check_mask(key_padding_mask, B, N)
    if mask is not None:  # padded slots may hold anything (torch.empty, other buffers): 0 * nan would stay nan
        v = v.masked_fill(~mask[:, None, :, None], 0)
    F64 = torch.float64
    dtype = F64 if q.dtype == F64 or k.dtype == F64 or v.dtype == F64 else torch.float32  # compute_dtype(q, k, v)
    _check_kernel(kernel, chunk_size, dtype, v.device)
    _check_precision(precision, dtype, v.device, kernel)
    gammas = resolve_decay(decay, H)
    signature = (features, None if rotary is None else rotary.signature(), gammas)
    learned = _check_learned(rotary, True, H, None)
    S0, z0, M0, offset = (initial_state.numerator, initial_state.key_sum, initial_state.log_ref,
                          initial_state.offset)
    if not (S0.shape == (B, H, r, dv) and z0.shape == (B, H, r) and M0.shape == (B, H) and S0.dtype == dtype
            and z0.dtype == dtype and initial_state.signature in (None, signature)):
        _start(initial_state, signature, (B, H, r, dv), dtype, None, v.device)  # raises, saying what differs
    if M0.dtype != LOG_DTYPE:
        M0 = M0.to(LOG_DTYPE)
    if positions is None:
        positions = offset
    pos = None  # an int offset stays one (checked as resolve_positions checks it); a tensor is resolved
    if not is_int(positions) or not -MAX_POSITION <= positions <= MAX_POSITION - N:
        pos = resolve_positions(positions, N, v.device, B)
    rot = {}
    if learned:
        p = pos if pos is not None else torch.arange(positions, positions + N, device=v.device)
        rot = dict(theta=rotary.theta, phase=rotary.phase, angle_positions=p.to(LOG_DTYPE),
                   first_position=positions if pos is None else None)
    elif rotary is not None and pos is None and N == 1:  # the next token: its factor from a block of them
        rot["factor"] = _step_factor(rotary, signature[1], positions, v.device, dtype)
    elif rotary is not None:
        rot["cos"], rot["sin"] = rotary.cos_sin(positions, N, v.device, dtype, batch=B)
    key_bias = lam = None
    if gammas is not None:
        lam = _RATES.get((gammas, v.device))
        if lam is None:
            lam = _RATES.setdefault((gammas, v.device), _decay_rates(gammas, True, v.device))
        rel = float(positions - offset + 1) if pos is None and N == 1 else \
            ((torch.arange(positions, positions + N, device=v.device) if pos is None else pos) - (offset - 1)).to(
                LOG_DTYPE)[..., None, :]  # (1, N) or (B, 1, N)
        key_bias = (lam[:, None] * rel).expand(B, H, N).reshape(B * H, N)
    out, S, z, M = step.step(features, rotary is not None and rotary.interleaved, dtype, q, k, v, S0, z0, M0,
                             k_logscale=k_logscale, key_bias=key_bias,
                             projection=None if projection is None else projection.to(dtype), mask=mask,
                             compiled=kernel == "cpp", **rot)
    if not return_state:
        return out
    return out, AttentionState(S, z, M if lam is None else M - lam * N, offset + N, signature)


def _check_sizes(features: str, q: Tensor, r: int, dv: int) -> None:
    if r < 1:
        raise ValueError("projection: expected at least one row (r >= 1 features)" if features == "favor" else
                         "qf: expected at least one feature (r >= 1)")
    if features == "favor" and q.shape[-1] < 1:
        raise ValueError(f"q: expected a head dim d >= 1, got shape {tuple(q.shape)}")
    if dv < 1:
        raise ValueError(f"v: expected a value dim dv >= 1, got dv = {dv}")


def _check_learned(rotary, causal: bool, H: int, group) -> bool:
    """Whether ``rotary`` is a ``LearnedRotary``, checked against the call."""
    if not isinstance(rotary, LearnedRotary):
        return False
    if not causal:
        raise ValueError("rotary: a LearnedRotary needs causal=True (its phase turns queries against earlier keys)")
    if rotary.heads != H:
        raise ValueError(f"rotary: a LearnedRotary of {rotary.heads} heads for H = {H} heads")
    if group is not None:
        raise ValueError("group: expected None with a LearnedRotary (sequence parallelism takes fixed rotations)")
    return True


def _start(initial_state, signature: tuple, shape: tuple, dtype: torch.dtype, decay_rates, device) -> _Start:
    """The state a call starts from: ``initial_state`` checked against the call, or the empty state."""
    B, H, r, dv = shape
    if initial_state is None:
        return _Start(*empty_state(B, H, r, dv, dtype, device), 0)
    if not isinstance(initial_state, AttentionState):
        raise TypeError(f"initial_state: expected an AttentionState, got {type(initial_state).__name__}")
    S0, z0, M0 = initial_state.numerator, initial_state.key_sum, initial_state.log_ref
    if tuple(S0.shape) != (B, H, r, dv) or tuple(z0.shape) != (B, H, r) or tuple(M0.shape) != (B, H):
        raise ValueError(f"initial_state: expected numerator (B, H, r, dv) = {(B, H, r, dv)}, key_sum "
                         f"{(B, H, r)} and log_ref {(B, H)}, got {tuple(S0.shape)}, {tuple(z0.shape)}, "
                         f"{tuple(M0.shape)}")
    if initial_state.signature is not None and initial_state.signature != signature:
        raise ValueError(f"initial_state: made by a call with {_describe(initial_state.signature)}, continued "
                         f"by one with {_describe(signature)}")
    if S0.dtype != dtype or z0.dtype != dtype:
        raise ValueError(f"initial_state: its sums are {S0.dtype}, but this call computes in {dtype} (from the "
                         f"dtypes of q, k, v): continue a state with inputs of the dtype that made it")
    offset = initial_state.offset
    M0 = M0.to(LOG_DTYPE)
    if decay_rates is not None:  # the state's log_ref is that of its sums decayed to its last position
        M0 = M0 + decay_rates * (offset - 1)
    return _Start(S0, z0, M0, offset)


def _rotations(rotary, learned: bool, positions, key_positions, cross: bool, Nq: int, N: int, B: int,
               dtype: torch.dtype, device) -> dict:
    """The engine's rotation inputs (``Inputs`` fields) at these positions: cos/sin tables (the keys' own with
    cross-attention), or the learned angles and float64 positions; positions are validated either way."""
    if learned:  # the engine turns the pairs by theta p (+ phase for queries), p in float64
        return dict(theta=rotary.theta, phase=rotary.phase,
                    angle_positions=resolve_positions(positions, Nq, device, B).to(LOG_DTYPE))
    if rotary is None:
        resolve_positions(positions, Nq, device, B)
        if cross:
            resolve_positions(key_positions, N, device, B)
        return {}
    cos, sin = rotary.cos_sin(positions, Nq, device, dtype, batch=B)
    out = dict(cos=cos, sin=sin)
    if cross:  # keys at their own positions, 0..M-1 by default
        out["key_cos"], out["key_sin"] = rotary.cos_sin(key_positions, N, device, dtype, batch=B)
    return out


def _describe(signature: tuple) -> str:
    kind, rotary, gammas = signature
    rot = "no rotary" if rotary is None else "learned rotations" if rotary[0] == "learned" else \
        f"RotaryEmbedding(dim={rotary[1]}, base={rotary[2]:g}, interleaved={rotary[3]}, scale={rotary[4]:g}, " \
        f"scaling={rotary[5]!r})"
    return f"{'favor_attention' if kind == 'favor' else 'linear_attention'}, {rot}, decay={gammas}"


def _check_precision(precision, dt: torch.dtype, device: torch.device, kernel: str) -> None:
    """``precision``: "float32" anywhere; "tf32" / "bfloat16" (tensor-core products) on a CUDA GPU that has them,
    for float32 compute and the torch kernel."""
    if check_precision(precision) == "float32":
        return
    if dt != torch.float32:
        raise ValueError(f"precision={precision!r}: lowers the products of float32 compute, but these inputs compute "
                         f'in {dt} (float64 is the reference: precision="float32")')
    if kernel != "torch":
        raise ValueError(f'precision={precision!r}: the "torch" kernel only (kernel={kernel!r} computes its products '
                         f'in float32)')
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise ValueError(f"precision={precision!r}: needs tensor cores of compute capability >= 8.0 (Ampere), "
                             f"this GPU has {torch.cuda.get_device_capability(device)}")
    elif not products.EMULATE:
        raise ValueError(f"precision={precision!r}: a CUDA tensor-core format; got {device.type} tensors (on a CPU "
                         f'use "float32": bfloat16 products measured no faster than float32 there)')


def _check_kernel(kernel, chunk_size: int, dt: torch.dtype, device: torch.device) -> None:
    """``kernel``: "torch", or "cpp" / "triton" where it can run (chosen explicitly, never as a silent fallback)."""
    if check_kernel(kernel) == "torch":
        return
    if kernel == "cpp":
        if device.type != "cpu":
            raise ValueError(f'kernel="cpp": expected CPU tensors, got {device.type} ones (kernel="torch" runs on '
                             f'any device)')
        return
    if not triton_kernels.available():
        raise RuntimeError('kernel="triton": the triton package does not import here (pip install triton, on a '
                           'machine with a CUDA GPU); kernel="torch" runs everywhere')
    if device.type != "cuda" and not triton_kernels.interpreted():
        raise ValueError(f'kernel="triton": expected CUDA tensors, got {device.type} ones (kernel="torch" runs on '
                         f'any device; Triton runs CPU tensors only under TRITON_INTERPRET=1, for tests)')
    if dt != torch.float32:
        raise ValueError(f'kernel="triton": computes in float32, but these inputs compute in {dt} (float64 '
                         f'inputs: use kernel="torch")')
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f'chunk_size: expected a power of two >= 16 with kernel="triton", got {chunk_size}')


def _state_out(S, z, M, offset: int, lam, signature: tuple) -> AttentionState:
    """The state after ``offset`` positions; with a decay, its log_ref refers to the sums as they stand at the last
    position (offset - 1), not to the engine's keys weighted by e^(lam n), whose log-scales grow with n."""
    return AttentionState(S, z, M if lam is None else M - lam * (offset - 1), offset, signature)


def multiscale_decays(heads: int) -> tuple[float, ...]:
    """RetNet's per-head decay rates gamma_h = 1 - 2^(-5-h): half-lives from ~22 positions to ~2^(4+heads)."""
    return tuple(1.0 - 2.0 ** (-5 - h) for h in range(heads))


def resolve_decay(decay, heads: int) -> tuple[float, ...] | None:
    """The ``decay`` argument of the functions and the layer as one gamma per head in (0, 1], or None: None,
    'multiscale' (``multiscale_decays``), one float for every head, or ``heads`` floats (a sequence or tensor)."""
    if decay is None:
        return None
    what = f"decay: expected None, 'multiscale', a float or {heads} floats in (0, 1] (gamma per head), got"
    if isinstance(decay, str):
        if decay != "multiscale":
            raise ValueError(f"{what} {decay!r}")
        return multiscale_decays(heads)
    items = decay.flatten().tolist() if isinstance(decay, Tensor) else \
        list(decay) if isinstance(decay, (tuple, list)) else [decay]
    if isinstance(decay, Tensor) and decay.dtype == torch.bool or any(isinstance(g, bool) for g in items):
        raise ValueError(f"{what} {decay!r} (a bool is not a rate)")
    try:
        gammas = tuple(float(g) for g in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {decay!r}") from None
    if len(gammas) == 1:
        gammas = gammas * heads
    if len(gammas) != heads or not all(0 < g <= 1 for g in gammas):
        raise ValueError(f"{what} {gammas if len(gammas) <= 16 else f'{len(gammas)} values'}")
    return gammas


def _decay_rates(gammas: tuple[float, ...] | None, causal: bool, device) -> Tensor | None:
    """lam = -log(gamma) (H,) in ``LOG_DTYPE`` from ``resolve_decay``'s rates (None: no decay)."""
    if gammas is None:
        return None
    if not causal:
        raise ValueError("decay: expected causal=True (a decay gamma^(m - n) weighs the past; bidirectional "
                         "attention has no direction to decay along)")
    # from floats on the CPU, copied without a host sync
    return (-torch.tensor(gammas, dtype=LOG_DTYPE).log()).to(device, non_blocking=True)


def _check_gates(log_gates, shape, causal) -> None:
    check_tensor("log_gates", log_gates, dims=3)
    if tuple(log_gates.shape) != tuple(shape):
        raise ValueError(f"log_gates: expected shape (B, H, N) = {tuple(shape)} (one log gate per key), got "
                         f"{tuple(log_gates.shape)}")
    if causal is not True:
        raise ValueError("log_gates: expected causal=True (a gate g_t forgets the past; bidirectional attention "
                         "has no past)")


def _gated(attend, log_gates: Tensor, k_logscale: Tensor | None, group, return_state: bool):
    """``attend(k_logscale)`` with the gates folded into the keys' log-scales: key n gets -G_n, G the running sum
    of log_gates in float64 (after the earlier ranks' totals under ``group``); a returned state is moved to the
    last position's reference (its log_ref gains G at the end, the product of every gate so far)."""
    G = torch.cumsum(log_gates.to(LOG_DTYPE), dim=-1)
    if group is not None:  # earlier ranks' products reach this rank's keys (and their gradients go back)
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather
        totals = torch.stack(all_gather(G[..., -1].contiguous(), group=group))  # (ranks, B, H)
        rank = dist.get_rank(group)
        G = G + totals[:rank].sum(0)[..., None]
        end = totals.sum(0)
    else:
        end = G[..., -1] if G.shape[-1] else G.new_zeros(G.shape[:-1])
    ks = -G if k_logscale is None else k_logscale.to(LOG_DTYPE) - G
    out = attend(ks)
    if not return_state:
        return out
    out, st = out
    return out, AttentionState(st.numerator, st.key_sum, st.log_ref + end.to(st.log_ref.dtype), st.offset,
                               st.signature, st.clock)


def _check_clock(clock, shape, rotary, causal, group, initial_state) -> None:
    """``clock`` (None or (B, H, N) increments) against the call, and a state's clock against it (both ways)."""
    has = isinstance(initial_state, AttentionState) and initial_state.clock is not None
    if clock is None:
        if has:
            raise ValueError("initial_state: made by a call with a clock (a selective rotation), continued without "
                             "one: pass clock= (the increments of the new positions)")
        return
    check_tensor("clock", clock, dims=3)
    if tuple(clock.shape) != tuple(shape):
        raise ValueError(f"clock: expected shape (B, H, N) = {tuple(shape)} (one increment per position and head), "
                         f"got {tuple(clock.shape)}")
    if not isinstance(rotary, LearnedRotary):
        raise ValueError(f"clock: expected a LearnedRotary rotary (the clock turns its learned angles), got "
                         f"{type(rotary).__name__ if rotary is not None else None}")
    if causal is not True:
        raise ValueError("clock: expected causal=True (the clock runs forward: A_n sums the increments up to n)")
    if group is not None:
        raise ValueError("clock: expected group=None (sequence parallelism does not carry a clock across ranks)")
    if isinstance(initial_state, AttentionState) and not has:
        raise ValueError("clock: the initial_state was made without a clock (its keys turned by positions, or a "
                         "hand-made state: set its clock, (B, H) float64)")


def _clock_values(clock: Tensor | None, sl: slice, initial_state) -> Tensor | None:
    """A = the state's clock + the running sum of ``clock``'s increments over ``sl``, (B, H, N) float64."""
    if clock is None:
        return None
    A = torch.cumsum(clock[:, :, sl].to(LOG_DTYPE), dim=-1)
    return A if initial_state is None else A + initial_state.clock.to(LOG_DTYPE)[..., None]


def _clock_end(A: Tensor | None, initial_state) -> Tensor | None:
    """The clock after a call's last position (the state's unchanged for an empty call); None without a clock."""
    if A is None:
        return None
    if A.shape[-1]:
        return A[..., -1]
    return A.new_zeros(A.shape[:-1]) if initial_state is None else initial_state.clock.to(LOG_DTYPE)


def linear_attention(qf: Tensor, kf: Tensor, v: Tensor, *, causal: bool = False, rotary: RotaryEmbedding | None = None,
                     positions: int | Tensor | None = None, chunk_size: int = 64,
                     initial_state: AttentionState | None = None, return_state: bool = False,
                     key_padding_mask: Tensor | None = None, k_logscale: Tensor | None = None,
                     group_size: int | str | None = None, key_positions: int | Tensor | None = None,
                     cu_seqlens: Tensor | None = None, group=None, decay: float | Tensor | None = None,
                     kernel: str = "torch", log_gates: Tensor | None = None, clock: Tensor | None = None,
                     precision: str = "float32"):
    """Normalized linear attention on features; RoFormer eq. 19 when ``rotary`` is given.

    out_m = sum_n (R_m qf_m).(R_n kf'_n) v_n / sum_n qf_m.kf'_n, with kf'_n = kf_n exp(k_logscale_n), n over all
    positions (``causal=False``) or n <= m (``causal=True``). The normalizer is never rotated, and never clamped:
    a row whose normalizer is 0 (it sees no key: all padded, or features orthogonal to every key) returns 0.

    Args:
        qf: (B, H, N, r) query features (non-negative for a positive normalizer).
        kf: (B, H, N, r) key features; (B, H, M, r) for cross-attention (``causal=False``): keys and values of
            another sequence, at ``key_positions`` (default 0..M-1).
        v: (B, H, N, dv) values; (B, H, M, dv) for cross-attention.
        causal: restrict to n <= m; computed in chunks of ``chunk_size`` with a running state.
        rotary: a ``RotaryEmbedding`` of dim r rotating the features (eq. 19), a ``LearnedRotary`` (causal:
            learned frequencies and phases per head; gradients reach them), or None.
        positions: positions of the N rows (None: 0..N-1, or continuing ``initial_state.offset``; an int
            offset; an integer tensor (N,); or (B, N) for positions per example, e.g. left-padded batches).
        chunk_size: positions per chunk of the causal path.
        initial_state / return_state: streaming (causal only): start from and/or return an ``AttentionState``.
        key_padding_mask: (B, N) bool, True = keep; padded keys leave numerator and normalizer alike.
        k_logscale: (B, H, N) optional log-magnitudes of the keys (as returned by exp-type feature maps), so
            that exp-type features never overflow; None means 0.
        group_size: positions whose features are processed at once (rounded up to whole chunks). None sizes
            each (B*H, group, r) work buffer to 1 MiB of float32, or to the CPU's L2 per core (at most 4 MiB)
            where that is larger and 1 MiB would take more than 8 groups; ``"auto"``
            measures a few sizes on a probe of this call's shape class the first time (seconds), keeps
            the fastest in ``$LINROPE_CACHE_DIR`` or ``~/.cache/linrope`` per machine, and reuses it. Sizes
            change outputs by float rounding only.
        cu_seqlens: packed variable-length sequences (B = 1): a 1-D integer tensor of cumulative lengths
            (0, ..., N), fla's convention. Documents do not see each other, positions restart at each document
            (unless ``positions`` is given), the causal state starts afresh. Each document runs as its own call.
        group: sequence parallelism: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``) whose
            ranks each hold a contiguous slice of one sequence, in rank order (lengths may differ, each >= 1):
            qf, kf, v, k_logscale, key_padding_mask are this rank's slice, positions default to the global ones
            (the earlier ranks' lengths plus the local index), and the result is this rank's slice of the output
            of the whole sequence; gradients reach every rank's inputs as in one process. Ranks exchange states
            only (one all-gather of (r, dv) states per head, an all-reduce of them in the backward). Every rank
            makes the same call and runs the backward. An ``initial_state`` (the same on every rank) precedes
            rank 0; ``return_state`` gives every rank the state after the whole sequence.
        decay: causal only: gamma in (0, 1], one float or one per head (H,): every term of the numerator *and*
            the normalizer of row m is weighted by gamma^(p_m - p_n) (p the positions), as in RetNet: the state
            decays as it is carried (streaming and decoding included). Computed exactly as a key log-scale
            log(1/gamma) p_n, kept in float64: the row's factor gamma^(p_m) cancels between the two sums.
        kernel: what computes the causal path's chunk products (the scores within chunks, the state entering
            each chunk, their gradients): ``"torch"`` (batched matrix products; any device and dtype; the default;
            on a GPU the one to use) or ``"triton"``, experimental: fused Triton kernels
            (``linrope._engine.triton_kernels``: CUDA, float32 compute, ``chunk_size`` a power of two >= 16; needs
            the ``triton`` package), checked against float64 in Triton's CPU interpreter but slower than "torch"
            on the one GPU measured, and not re-run on a GPU since their last change (see BENCHMARKS.md). The
            normalizer, features and rotations are the same code either way; the bidirectional path ignores it.
            ``"cpp"`` (CPU tensors): compiled C++ built on first use with the machine's C++ compiler and ninja
            (``pip install "linrope[cpp]"``; a minute the first time, cached after), or an error saying what is
            missing. It runs two kinds of call: the causal pass of ``favor_attention`` computing in float32
            (forward and backward; RoPE tables or none, masks, decay, gates, streaming states, per-example
            positions), as one loop per (batch, head) over its chunks, the rows shared out between the threads
            (``linrope._engine.causal_cpu.cpp``: features, rotation and normalizer never leave the core's
            cache; the fastest CPU path measured); and a decoding step of one position (continuing
            ``initial_state``, nothing to differentiate; ``step_cpu.cpp``). Every other call (given features,
            learned or selective angles, float64, sequence parallelism, the bidirectional path) runs the
            "torch" engine. Same results to float32 rounding.
        log_gates: causal only: (B, H, N) log forget gates log g_t (a data-dependent decay, GLA's gate with one
            value per head): every term of row m, numerator and normalizer alike, is weighted by
            prod_{n < t <= m} g_t = exp(G_m - G_n), G the running sum of ``log_gates`` (float64). Exact as the
            fixed decay is: G_n enters as the key's log-scale (row m's factor exp(G_m) cancels), so gradients
            reach the gates through ``k_logscale``'s; a returned state is referred to its last position, so
            streaming and decoding continue the product; per document with ``cu_seqlens``; across ranks with
            ``group`` (each rank's running sum starts after the earlier ranks' totals). Values > 0 (g > 1) are
            allowed and computed as exactly; the layers keep g in (0, 1].
        clock: a selective (data-dependent) rotation, with a ``LearnedRotary`` and causal only: (B, H, N) the
            clock's increments a_t (the layer's are softplus(w . x_t + b) > 0; any real values are computed as
            exactly). Query pair i of head h at position n turns by theta_hi A_n + phase_hi and key pair i by
            theta_hi A_n, A_n = sum_{t <= n} a_t (float64, continuing ``initial_state.clock``) in place of the
            position n; the normalizer stays unrotated. Eq. 19's relative property becomes: the score of rows m
            and n depends on the clock advanced between them, A_m - A_n. Gradients reach the increments (and
            the initial state's clock). A returned state carries the clock (``AttentionState.clock``); a state
            with a clock is continued only with one, and the other way round. Decoding steps go through the
            chunked engine (exact; the one-position fast path has no clock). Per document with ``cu_seqlens``
            (the clock restarts); not with ``group`` (it raises). Combines with ``decay`` and ``log_gates``.
        precision: of the attention products (the chunk scores, the values they weigh, the state's product with
            the queries and its update, and their gradients; ``linrope._engine.products``): ``"float32"`` (the
            default, exact against float64 eq. 19 to float32 rounding), or, on a CUDA GPU of compute capability
            >= 8.0 with the "torch" kernel and float32 compute, ``"tf32"`` or ``"bfloat16"``: tensor-core products
            of inputs rounded to 10 or 8 mantissa bits, summed in float32. Features, their log-scale references,
            the normalizer, the distance-0 terms and every running sum stay float32, so a row moves by the rounding
            of its numerator's products only (tests/test_precision.py holds each row to 4 u times its condition,
            u = 2^-11 or 2^-8): measured against float64 eq. 19 (emulated on a CPU, q, k of std 1 to 5, N = 200),
            the median row is off by 3.5e-4 (tf32) or 3e-3 (bfloat16), as without RoPE; with RoPE, rows whose
            rotated terms cancel lose more, up to 4e-2 (tf32) and 0.6 (bfloat16) at std 5, where "float32" stays
            within 1e-5. Elsewhere (a CPU, float64, kernel="cpp" or "triton") anything but "float32" raises.
            Decoding steps of one position compute in float32 whatever the precision.

    Returns:
        (B, H, N, dv) in v's dtype; with ``return_state``, also the ``AttentionState`` after the last row.
        Features, states and the normalizer are computed in float32 (float64 for float64 inputs), whatever
        autocast says; half-precision inputs are kept (for the backward) in half precision. The backward
        recomputes features group by group; double backward is not supported (it raises).
    """
    cross = _cross(qf, kf, causal, key_positions)
    check_qkv(("qf", "kf"), qf, kf, v, cross)
    r = qf.shape[-1]
    check_rotary(rotary, r, "the number of features r", learned=True)
    if k_logscale is not None:
        check_tensor("k_logscale", k_logscale, dims=3)
        if k_logscale.shape != kf.shape[:3]:
            raise ValueError(f"k_logscale: expected shape (B, H, N) = {tuple(kf.shape[:3])}, "
                             f"got {tuple(k_logscale.shape)}")
    _check_clock(clock, kf.shape[:3], rotary, causal, group, initial_state)
    return _attend("features", qf, kf, k_logscale, v, None, r, causal=causal, rotary=rotary, positions=positions,
                   chunk_size=chunk_size, group_size=group_size, initial_state=initial_state,
                   return_state=return_state, key_padding_mask=key_padding_mask, key_positions=key_positions,
                   cross=cross, cu_seqlens=cu_seqlens, group=group, decay=decay, kernel=kernel, log_gates=log_gates,
                   clock=clock, precision=precision)


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool = False,
                    rotary: RotaryEmbedding | None = None, positions: int | Tensor | None = None,
                    chunk_size: int = 64, initial_state: AttentionState | None = None, return_state: bool = False,
                    key_padding_mask: Tensor | None = None, group_size: int | str | None = None,
                    key_positions: int | Tensor | None = None, cu_seqlens: Tensor | None = None, group=None,
                    decay: float | Tensor | None = None, kernel: str = "torch", log_gates: Tensor | None = None,
                    clock: Tensor | None = None, precision: str = "float32"):
    """FAVOR+ attention from raw q, k, v; eq. 19 with ``rotary``. Features are recomputed in the backward.

    Equal to ``linear_attention(*favor features of q and k*, v, ...)`` with features ``favor_plus(x, projection)``
    (exp(W x~ - |x~|^2/2), x~ = x d^(-1/4)): an estimate of softmax attention with scale 1/sqrt(d). Exact at any
    scale of q and k that float32 can hold: key magnitudes travel as log-scales and nothing is clamped.

    Args:
        q, k: (B, H, N, d); v: (B, H, N, dv). Cross-attention (``causal=False``): k (B, H, M, d), v (B, H, M, dv)
            from another sequence, at ``key_positions`` (default 0..M-1).
        projection: (r, d) random projection, e.g. ``FavorPlus.projection``. It is not differentiated, so it
            must not require grad (to learn it, compute features with ``favor_plus`` and use ``linear_attention``).
        rotary: a ``RotaryEmbedding`` of dim r (it rotates the features), a ``LearnedRotary``, or None.
        Other arguments as in ``linear_attention``.

    Returns:
        (B, H, N, dv) in v's dtype (and the ``AttentionState`` with ``return_state``).
    """
    cross = _cross(q, k, causal, key_positions)
    check_qkv(("q", "k"), q, k, v, cross)
    check_tensor("projection", projection, dims=2)
    if projection.shape[1] != q.shape[-1]:
        raise ValueError(f"projection: expected shape (r, d) with d = {q.shape[-1]}, got {tuple(projection.shape)}")
    if projection.requires_grad and torch.is_grad_enabled():
        raise ValueError("projection: expected a tensor that does not require grad (favor_attention does not "
                         "differentiate it; detach it, or use favor_plus features with linear_attention)")
    r = projection.shape[0]
    check_rotary(rotary, r, "the number of features r (projection rows)", learned=True)
    _check_clock(clock, k.shape[:3], rotary, causal, group, initial_state)
    return _attend("favor", q, k, None, v, projection, r, causal=causal, rotary=rotary, positions=positions,
                   chunk_size=chunk_size, group_size=group_size, initial_state=initial_state,
                   return_state=return_state, key_padding_mask=key_padding_mask, key_positions=key_positions,
                   cross=cross, cu_seqlens=cu_seqlens, group=group, decay=decay, kernel=kernel, log_gates=log_gates,
                   clock=clock, precision=precision)


def _attend(features, q, k, k_logscale, v, projection, r, *, causal, rotary, positions, chunk_size, group_size,
            initial_state, return_state, key_padding_mask, key_positions, cross, cu_seqlens, group, decay, kernel,
            log_gates, clock, precision):
    """What ``linear_attention`` ('features') and ``favor_attention`` ('favor') do once their arguments are
    checked: a decoding step (``_decode``) or the engine (``_run``), with the gates folded into the keys'
    log-scales (``_gated``; with FAVOR+ they are a log-bias of the keys), document by document with
    ``cu_seqlens``."""
    if log_gates is not None:
        _check_gates(log_gates, k.shape[:3], causal)
    decoding = clock is None and cu_seqlens is None and _decoding_call(causal, initial_state, group, kernel, cross,
                                                                       v, (q, k, k_logscale, v, log_gates))

    def attend(sl, pos, mask, ks):  # ks: the keys' log-scales of positions sl (the gates' included)
        if decoding:
            return _decode(features, q, k, ks, v, projection, r, rotary, pos, chunk_size, group_size, initial_state,
                           return_state, mask, decay, kernel, precision)
        return _run(features, q[:, :, sl], k[:, :, sl], ks, v[:, :, sl], projection, r, causal=causal,
                    rotary=rotary, positions=pos, chunk_size=chunk_size, group_size=group_size,
                    initial_state=initial_state, return_state=return_state, key_padding_mask=mask,
                    key_positions=key_positions, cross=cross, group=group, decay=decay, kernel=kernel,
                    clock=_clock_values(clock, sl, initial_state), precision=precision)

    def call(sl, pos, mask):
        ks = None if k_logscale is None else k_logscale[:, :, sl]
        if log_gates is None:
            return attend(sl, pos, mask, ks)
        return _gated(lambda gated: attend(sl, pos, mask, gated), log_gates[:, :, sl], ks, group, return_state)

    if cu_seqlens is not None:
        _no_group(group)
        return _per_document(call, cu_seqlens, v.shape[0], v.shape[2], positions, key_padding_mask,
                             initial_state is not None or return_state, cross)
    return call(slice(None), positions, key_padding_mask)


# ---------------------------------------------------------------------------------------------- softmax baseline
def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      rotary: RotaryEmbedding | None = None, positions: int | Tensor | None = None,
                      key_padding_mask: Tensor | None = None, key_positions: int | Tensor | None = None,
                      cu_seqlens: Tensor | None = None) -> Tensor:
    """Softmax attention softmax(q k^T / sqrt(d)) v through ``scaled_dot_product_attention``.

    Args:
        q: (B, H, Nq, d); k: (B, H, Nk, d); v: (B, H, Nk, dv).
        causal: query i attends keys j <= i + Nk - Nq (aligned at the end, as when decoding with a cache).
        rotary: a ``RotaryEmbedding`` of dim d applied to q at ``positions`` and to k at ``key_positions``
            (default: ``positions`` when Nq == Nk; 0..Nk-1 for cross-attention, ``causal=False``).
        key_padding_mask: (B, Nk) bool, True = keep. Rows that see no key return 0 (SDPA would give NaN).
        cu_seqlens: packed documents in one row, as in ``linear_attention`` (each runs alone).

    Returns:
        (B, H, Nq, dv) in q's dtype.
    """
    if cu_seqlens is not None:
        check_qkv(("q", "k"), q, k, v, cross=True)
        return _per_document(lambda sl, pos, mask: softmax_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=causal, rotary=rotary, positions=pos,
            key_padding_mask=mask), cu_seqlens, q.shape[0], q.shape[2], positions, key_padding_mask, False,
            k.shape[2] != q.shape[2] or key_positions is not None)
    check_qkv(("q", "k"), q, k, v, cross=True)  # keys of their own length: a cache, or another sequence
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if causal and Nq > Nk:
        raise ValueError(f"q: more queries ({Nq}) than keys ({Nk}) with causal=True")
    if causal and key_positions is not None:  # causal keys sit at the end of the queries' own sequence (a cache)
        raise ValueError("key_positions: expected None with causal=True (cross-attention is causal=False)")
    cross = key_positions is not None or (Nq != Nk and not causal)
    mask = check_mask(key_padding_mask, B, Nk)
    if rotary is not None:
        check_rotary(rotary, d, "the head dim d")
        if Nq != Nk and causal:
            raise ValueError("rotary: needs as many queries as keys with causal=True; rotate cached keys when "
                             "caching them")
        q, k = rotary.rotate(q, positions), rotary.rotate(k, key_positions if cross else positions)
    else:
        resolve_positions(positions, Nq, q.device, B)
        if cross:
            resolve_positions(key_positions, Nk, q.device, B)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if B * H * Nq * Nk == 0:  # nothing to attend with, or to (rows that see no key are 0)
        return q.new_zeros(B, H, Nq, v.shape[-1])
    if mask is not None:  # a padded key or value must not reach any row, whatever it holds (nan - inf is nan)
        k, v = (x.masked_fill(~mask[:, None, :, None], 0) for x in (k, v))
    # a non-finite value reaches, through SDPA's 0 * nan, rows whose weight on it is 0 (causal: earlier rows):
    # computed without it, then the rows that see it are NaN, as the definition gives them (no host sync)
    bad = ~torch.isfinite(v).all(-1)  # (B, H, Nk)
    v = torch.where(bad.unsqueeze(-1), 0, v)
    if mask is None and (not causal or Nq == Nk):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and Nq > 1)
        has_key = None
    else:
        keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool, device=q.device) if mask is None else mask[:, None, None, :]
        if causal:
            keep = keep & torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
        has_key = keep.any(-1, keepdim=True)  # (B, 1, Nq or 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~has_key).masked_fill(~has_key, 0)
    first = torch.where(bad, torch.arange(Nk, device=q.device), Nk).amin(-1, keepdim=True)  # (B, H, 1)
    sees = torch.arange(Nq, device=q.device) + (Nk - Nq) >= first if causal else first < Nk  # (B, H, Nq or 1)
    if has_key is not None:
        sees = sees & has_key[..., 0]
    return out.masked_fill(sees.unsqueeze(-1), math.nan)
