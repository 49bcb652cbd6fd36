"""The decoding step (linrope/_engine/step.py): a few causal positions continuing a state, without the chunked engine
and without autograd. Taken by the functions and the layer when nothing needs a gradient; its outputs and returned
states must be those of the engine's full pass and of the float64 references, for every option a state supports:
FAVOR+ and given features with log-scales, fixed RoPE (both pairings) and learned rotations, decays (one, per head,
multiscale), masks, positions per example, grouped kv heads through the layer, keys far above the running max,
NaN confined to the rows that see it. Gradients take the engine."""

import math

import pytest
import torch

from linrope import AttentionState, LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope._engine import Call, EngineConfig, Inputs, run, step
from linrope._engine.feature_sources import LOG_DTYPE, NEG
from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.reference import favor_attention_naive, favor_attention_recurrent, linear_attention_naive
from linrope.rotary import LearnedRotary

F64 = torch.float64


@pytest.fixture(autouse=True, params=["torch", "cpp"])
def one_position(request, monkeypatch):
    """Every test twice: with the eager step for one position (``step._one``), and with the compiled one
    (``kernel="cpp"``'s ``step._one_compiled``) in its place, which must meet the same references."""
    if request.param == "cpp":
        monkeypatch.setattr(step, "_one", step._one_compiled)
    return request.param


@pytest.fixture
def steps(monkeypatch):
    """Counts the calls that took the step path."""
    calls = []
    original = step.step

    def counted(*args, **kwargs):
        calls.append(args[3].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(step, "step", counted)
    return calls


def _rel(got, ref):
    """Largest error relative to the largest reference value (float64)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max())


def _data(seed, B=2, H=3, N=40, d=16, dv=8, std=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k = (std * torch.randn(B, H, N, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g)
    return q, k, v, gaussian_orthogonal_matrix(32, d, generator=g).float()


def _pieces(N, prompt, seed):
    """[0, prompt) for the engine, then pieces of 1 (mostly) to step.MAX_POSITIONS positions."""
    g = torch.Generator().manual_seed(seed)
    sizes = (1, 1, 1, 2, 3, 5, step.MAX_POSITIONS)
    cuts, a = [(0, prompt)], prompt
    while a < N:
        b = min(N, a + sizes[int(torch.randint(len(sizes), (1,), generator=g))])
        cuts.append((a, b))
        a = b
    return cuts


def _decode(fn, n, cuts, mask=None, positions=None, dim=2, **kw):
    """``fn(sl, mask=..., positions=..., initial_state=..., return_state=True)`` over the pieces, no grad; outputs
    concatenated along ``dim``."""
    outs, state = [], None
    with torch.no_grad():
        for a, b in cuts:
            extra = {}
            if mask is not None:
                extra["key_padding_mask"] = mask[:, a:b]
            if positions is not None:
                extra["positions"] = positions[..., a:b]
            out, state = fn(slice(a, b), initial_state=state, return_state=True, **extra, **kw)
            outs.append(out)
    return torch.cat(outs, dim), state


def _same_state(got: AttentionState, ref: AttentionState, tol: float):
    """Two states of the same sums, each relative to its own log_ref."""
    shift = torch.exp(got.log_ref.double() - ref.log_ref.double())
    assert _rel(got.numerator.double() * shift[..., None, None], ref.numerator) < tol
    assert _rel(got.key_sum.double() * shift[..., None], ref.key_sum) < tol
    assert got.offset == ref.offset


# ---------------------------------------------------------------------------------------------- the step alone
def _engine_inputs(features, rope, N, seed, std=1.0, decay=False, mask=False, per_example=False, empty=False):
    """Inputs of one engine call continuing a state made by the float64 reference over a prompt of 20 keys."""
    B, H, d, r, dv = 2, 3, 16, 32, 8
    g = torch.Generator().manual_seed(seed)
    P = 20
    q, k = (std * torch.randn(B, H, P + N, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, P + N, dv, generator=g)
    W = gaussian_orthogonal_matrix(r, d, generator=g).float()
    ks = None
    if features == "features":
        q, _ = favor_plus(q, W, is_query=True)
        k, ks = favor_plus(k, W, is_query=False)
    pos = torch.arange(P + N).expand(B, P + N) + (torch.tensor([[0], [7]]) if per_example else 0)
    if not per_example:
        pos = pos[0]
    lam = torch.tensor([0.1, 0.01, 0.0], dtype=LOG_DTYPE) if decay else None
    bias = None if lam is None else (lam[:, None] * pos.to(LOG_DTYPE)[..., None, :]).expand(B, H, P + N).reshape(
        B * H, P + N)
    keep = (torch.rand(B, P + N, generator=g) > 0.3) if mask else None
    rot = {}
    if rope == "learned":
        lr = LearnedRotary(r, H)
        lr.phase.data.normal_(generator=g)
        rot = dict(theta=lr.theta.detach(), phase=lr.phase.detach(), angle_positions=pos.to(LOG_DTYPE))
    elif rope is not None:
        cos, sin = RotaryEmbedding(r, interleaved=rope == "interleaved").cos_sin(pos, P + N, "cpu", batch=B)
        rot = dict(cos=cos, sin=sin)
    x = dict(q=q, k=k, v=v if keep is None else v.masked_fill(~keep[:, None, :, None], 0), k_logscale=ks,
             key_bias=bias, projection=W if features == "favor" else None, mask=keep, **rot)
    along = dict(q=-2, k=-2, v=-2, cos=-2, sin=-2, k_logscale=-1, key_bias=-1, mask=-1, angle_positions=-1)

    def part(sl):  # the inputs of positions sl
        return {n: t if t is None or n not in along else t.narrow(along[n] % t.dim(), sl.start, sl.stop - sl.start)
                for n, t in x.items()}

    S0 = torch.zeros(B, H, r, dv, dtype=F64)
    z0, M0 = torch.zeros(B, H, r, dtype=F64), torch.full((B, H), NEG, dtype=F64)
    interleaved = rope != "half"
    if not empty:
        _, S0, z0, M0 = step.reference(features, interleaved, S0=S0, z0=z0, M0=M0, **part(slice(0, P)))
    state = dict(S0=S0.float(), z0=z0.float(), M0=M0)
    return interleaved, dict(part(slice(P, P + N)), **state), (S0, z0, M0)


@pytest.mark.parametrize("features", ["favor", "features"])
@pytest.mark.parametrize("rope", [None, "interleaved", "half", "learned"])
@pytest.mark.parametrize("N", [1, 2, 5, step.MAX_POSITIONS])
@pytest.mark.parametrize("std", [1.0, 5.0, 10.0])
def test_step_equals_the_float64_reference_and_the_engine(features, rope, N, std):
    for i, (decay, mask, per_example, empty) in enumerate([(False, False, False, False), (True, True, False, False),
                                                          (True, False, True, False), (False, True, True, True)]):
        interleaved, x, (S64, z64, M64) = _engine_inputs(features, rope, N, 10 * N + i, std, decay, mask,
                                                         per_example, empty)
        first = None if rope != "learned" or per_example else 20
        got = step.step(features, interleaved, torch.float32, **x, first_position=first)
        state64 = dict(S0=S64, z0=z64, M0=M64)
        ref = step.reference(features, interleaved, **dict(x, **state64))
        cfg = EngineConfig(causal=True, chunk_size=2, group_size=4, dtype=torch.float32, needs_grad=False)
        eng = run(Call(cfg, features, interleaved=interleaved, first_position=first), Inputs(**x))
        for name, a, b, e in zip(("out", "S", "z"), got[:3], ref[:3], eng[:3]):
            if name != "out":  # states relative to their own log_ref
                shape = (-1,) + (1,) * (a.dim() - 2)
                a = a.double() * torch.exp(got[3] - ref[3]).view(*a.shape[:2], *shape[1:])
                e = e.double() * torch.exp(eng[3] - ref[3]).view(*e.shape[:2], *shape[1:])
            tol = 2e-6 if std == 1 else 3e-5
            assert _rel(a, b) < tol, (name, decay, mask, per_example, _rel(a, b))
            assert _rel(a, b) < 4 * _rel(e, b) + tol / 4, (name, decay, mask, per_example, _rel(a, b), _rel(e, b))
        assert torch.allclose(got[3], eng[3], rtol=1e-6, atol=1e-5)  # float32 log-scales, rounded alike
        assert torch.allclose(got[3], ref[3], rtol=1e-6, atol=1e-4)
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_a_key_far_above_the_running_max_splits_nothing_and_underflows_no_earlier_row():
    """A key 300 nats above the others inside a piece (the engine's JUMP_LIMIT case): the rows before it keep their
    own reference; the row at it and after are referred to it."""
    interleaved, x, (S64, z64, M64) = _engine_inputs("features", "interleaved", 4, 3)
    x["k_logscale"] = x["k_logscale"].clone()
    x["k_logscale"][:, :, 2] += 300.0
    got = step.step("features", interleaved, torch.float32, **x)
    ref = step.reference("features", interleaved, **dict(x, S0=S64, z0=z64, M0=M64))
    assert _rel(got[0], ref[0]) < 2e-6
    assert torch.all(got[0][:, :, :2].norm(dim=-1) > 0)
    assert torch.equal(got[3], ref[3].to(got[3].dtype)) and (got[3] > 290).all()


def test_a_non_finite_key_or_value_reaches_its_row_and_the_later_ones_only():
    interleaved, x, (S64, z64, M64) = _engine_inputs("favor", "interleaved", 4, 5)
    clean = step.step("favor", interleaved, torch.float32, **x)
    x["v"] = x["v"].clone()
    x["v"][0, 1, 2, 3] = math.nan
    x["k"] = x["k"].clone()
    x["k"][1, 0, 1, 0] = math.inf
    out, S, z, M = step.step("favor", interleaved, torch.float32, **x)
    nan = torch.zeros(2, 3, 4, dtype=torch.bool)
    nan[0, 1, 2:] = nan[1, 0, 1:] = True
    assert torch.equal(out.isnan().any(-1), nan) and torch.equal(out.isnan().all(-1), nan)
    assert torch.equal(out[~nan], clean[0][~nan])  # the earlier rows, and the other heads, as if it were absent
    hit = nan[..., -1]
    assert S[hit].isnan().all() and z[hit].isnan().all() and torch.isfinite(S[~hit]).all()
    assert torch.equal(S[~hit], clean[1][~hit]) and torch.equal(z[~hit], clean[2][~hit])
    one = {n: t[..., 2:3, :] if n in ("q", "k", "v") else t for n, t in x.items()}  # the same as a step of one
    assert step.step("favor", interleaved, torch.float32, **dict(one, cos=x["cos"][2:3], sin=x["sin"][2:3]))[
        0][0, 1].isnan().all()


def test_a_row_that_sees_no_key_returns_zero():
    """An empty state and padded keys: rows before the first key are 0, and the state stays empty."""
    interleaved, x, _ = _engine_inputs("favor", "half", 3, 7, empty=True)
    x["mask"] = torch.tensor([[False, False, True], [False, False, False]])
    x["v"] = x["v"].masked_fill(~x["mask"][:, None, :, None], 0)
    out, S, z, M = step.step("favor", interleaved, torch.float32, **x)
    assert (out[0, :, :2] == 0).all() and (out[0, :, 2].norm(dim=-1) > 0).all() and (out[1] == 0).all()
    assert (S[1] == 0).all() and (z[1] == 0).all() and (M[1] == NEG).all()


def test_padded_keys_before_the_first_key_of_an_empty_state_and_log_scales_far_below_zero():
    """Rows before any key refer to a stand-in 0; a later real key whose log-scale is far below it (std 8, or
    given features with log-scales of -500) must not weigh those padded keys by exp(500) (0 * inf = NaN)."""
    interleaved, x, (S64, z64, M64) = _engine_inputs("features", "interleaved", 3, 7, empty=True)
    x["k_logscale"] = x["k_logscale"] - 500
    x["mask"] = torch.tensor([[False, True, True], [False, False, True]])
    x["v"] = x["v"].masked_fill(~x["mask"][:, None, :, None], 0)
    got = step.step("features", interleaved, torch.float32, **x)
    ref = step.reference("features", interleaved, **dict(x, S0=S64, z0=z64, M0=M64))
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert _rel(got[0], ref[0]) < 2e-6 and (got[0][:, :, 0] == 0).all()
    assert torch.equal(got[3], ref[3].to(got[3].dtype))


# ---------------------------------------------------------------------------------------------- through the functions
@pytest.mark.parametrize("std", [1.0, 5.0])
@pytest.mark.parametrize("rope", [None, "interleaved", "half"])
@pytest.mark.parametrize("decay", [None, 0.9, "multiscale"])
def test_favor_decoding_equals_the_full_pass_and_the_recurrent_reference(steps, std, rope, decay):
    q, k, v, W = _data(1, std=std)
    N = q.shape[2]
    rot = None if rope is None else RotaryEmbedding(32, interleaved=rope == "interleaved")
    mask = torch.rand(2, N, generator=torch.Generator().manual_seed(2)) > 0.25
    kw = dict(causal=True, rotary=rot, decay=decay)
    with torch.no_grad():
        full, full_state = favor_attention(q, k, v, W, key_padding_mask=mask, return_state=True, **kw)
    got, state = _decode(lambda sl, **a: favor_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], W, **kw, **a), N,
                         _pieces(N, 6, 3), mask=mask)
    assert len(steps) == len(_pieces(N, 6, 3)) - 1 and max(steps) > 1
    gammas = None if decay is None else [1 - 2 ** (-5 - h) for h in range(3)] if decay == "multiscale" else decay
    ref, ref_state = favor_attention_recurrent(q, k, v, W, rotary=rot, key_padding_mask=mask, decay=gammas)
    tol = 1e-5 if std == 1 else 1e-4
    assert _rel(got, ref) < tol and _rel(got, full) < tol
    _same_state(state, ref_state, tol)
    _same_state(state, full_state, tol)


@pytest.mark.parametrize("std", [1.0, 5.0])
def test_given_features_with_log_scales_positions_per_example_and_masks(steps, std):
    q, k, v, W = _data(4, std=std)
    qf, _ = favor_plus(q, W, is_query=True)
    kf, ks = favor_plus(k, W, is_query=False)
    N = q.shape[2]
    pos = torch.stack((torch.arange(N), torch.arange(N) + 1000))
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 8:11] = mask[1, :9] = False
    rot = RotaryEmbedding(32)
    got, state = _decode(lambda sl, **a: linear_attention(qf[:, :, sl], kf[:, :, sl], v[:, :, sl],
                                                          k_logscale=ks[:, :, sl], causal=True, rotary=rot, decay=0.95,
                                                          **a), N, _pieces(N, 5, 6), mask=mask, positions=pos)
    assert steps
    ref = linear_attention_naive(qf, kf, v, causal=True, rotary=rot, positions=pos, key_padding_mask=mask,
                                 k_logscale=ks, decay=0.95)
    with torch.no_grad():
        full = linear_attention(qf, kf, v, k_logscale=ks, causal=True, rotary=rot, decay=0.95, positions=pos,
                                key_padding_mask=mask)
    tol = 1e-5 if std == 1 else 1e-4
    assert _rel(got, ref) < tol and _rel(got, full) < tol
    assert (got[1, :, :9] == 0).all()  # rows before the first key of the second example


@pytest.mark.parametrize("std", [1.0, 5.0])
def test_learned_rotations_decode_as_the_quadratic_reference(steps, std):
    q, k, v, W = _data(7, std=std)
    N = q.shape[2]
    lr = LearnedRotary(32, 3)
    with torch.no_grad():
        lr.theta.mul_(1.0 + 0.1 * torch.randn(3, 16))
        lr.phase.normal_()
    got, state = _decode(lambda sl, **a: favor_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], W, causal=True,
                                                         rotary=lr, decay="multiscale", **a), N, _pieces(N, 3, 8))
    assert steps
    ref = favor_attention_naive(q, k, v, W, causal=True, rotary=lr, decay=[1 - 2 ** (-5 - h) for h in range(3)])
    assert _rel(got, ref) < (1e-5 if std == 1 else 1e-4)


def test_fixed_rope_far_from_position_zero_and_in_float64(steps):
    q, k, v, W = _data(9, N=10)
    q, k, v, W = q.double(), k.double(), v.double(), W.double()
    rot = RotaryEmbedding(32, max_cached=4)
    pos = torch.arange(10) + 10**7
    got, _ = _decode(lambda sl, **a: favor_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], W, causal=True,
                                                     rotary=rot, **a), 10, _pieces(10, 2, 1), positions=pos)
    assert steps and got.dtype == F64
    ref, _ = favor_attention_recurrent(q, k, v, W, rotary=rot, positions=pos)
    assert _rel(got, ref) < 1e-12


def test_gradients_and_long_pieces_take_the_engine(steps):
    q, k, v, W = _data(11, N=4 + step.MAX_POSITIONS)
    with torch.no_grad():
        _, state = favor_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], W, causal=True, return_state=True)
    n = step.MAX_POSITIONS + 1
    with torch.no_grad():
        favor_attention(q[:, :, 3:3 + n], k[:, :, 3:3 + n], v[:, :, 3:3 + n], W, causal=True, initial_state=state)
    assert steps == []
    qg = q[:, :, 3:4].clone().requires_grad_()
    out = favor_attention(qg, k[:, :, 3:4], v[:, :, 3:4], W, causal=True, initial_state=state)
    assert steps == [] and out.requires_grad
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with torch.inference_mode():  # grad mode off: whatever requires grad, the step
        got = favor_attention(qg, k[:, :, 3:4], v[:, :, 3:4], W, causal=True, initial_state=state)
    assert steps == [1]
    torch.testing.assert_close(got, out.detach(), rtol=1e-5, atol=1e-6)
    assert not step.usable(True, 1, state, False, object(), "torch")
    assert not step.usable(True, 1, state, False, None, "triton")
    assert not step.usable(True, 1, None, False, None, "torch")
    assert not step.usable(False, 1, state, False, None, "torch")
    assert step.usable(True, step.MAX_POSITIONS, state, False, None, "torch")


def test_the_caller_state_is_left_as_it_was_and_half_inputs_keep_their_dtype(steps):
    q, k, v, W = _data(12, N=6)
    with torch.no_grad():
        _, state = favor_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], W, causal=True, return_state=True,
                                   rotary=RotaryEmbedding(32), decay=0.9)
        kept = [t.clone() for t in (state.numerator, state.key_sum, state.log_ref)]
        h = [t[:, :, 4:6].half() for t in (q, k, v)]
        out, new = favor_attention(*h, W, causal=True, rotary=RotaryEmbedding(32), decay=0.9, initial_state=state,
                                   return_state=True)
        ref = favor_attention(*(t[:, :, 4:6].half().float() for t in (q, k, v)), W, causal=True,
                              rotary=RotaryEmbedding(32), decay=0.9, initial_state=state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = favor_attention(q[:, :, 4:6], k[:, :, 4:6], v[:, :, 4:6], W, causal=True,
                                   rotary=RotaryEmbedding(32), decay=0.9, initial_state=state)
        plain = favor_attention(q[:, :, 4:6], k[:, :, 4:6], v[:, :, 4:6], W, causal=True,
                                rotary=RotaryEmbedding(32), decay=0.9, initial_state=state)
    assert steps == [2, 2, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(kept, (state.numerator, state.key_sum, state.log_ref)))
    assert out.dtype == torch.float16 and new.numerator.dtype == torch.float32 and new.offset == 6
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(auto, plain)  # autocast does not reach inside


# ---------------------------------------------------------------------------------------------- through the layer
@pytest.mark.parametrize("options", [dict(kv_heads=2), dict(kv_heads=2, decay="multiscale"),
                                     dict(kv_heads=2, rope_learned=True), dict(feature_map="relu"),
                                     dict(feature_map="relu", decay=0.9),
                                     dict(rope="inputs", interleaved=False), dict(interleaved=False, decay=0.8)])
@pytest.mark.parametrize("std", [1.0, 5.0])
def test_layer_decoding_equals_its_full_pass(steps, options, std):
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=4, dim_head=8, nb_features=16, causal=True, **options).eval()
    x = std * torch.randn(2, 40, 32)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 3:6] = False
    with torch.no_grad():
        full = layer(x, key_padding_mask=mask)
    got, _ = _decode(lambda sl, **a: layer(x[:, sl], **{"state" if n == "initial_state" else n: t
                                                        for n, t in a.items()}),
                     40, _pieces(40, 4, 13), mask=mask, dim=1)
    assert len(steps) == len(_pieces(40, 4, 13)) - 1
    assert _rel(got, full) < (1e-5 if std == 1 else 1e-4)


# ---------------------------------------------------------------------------------------------- one position
def test_one_position_takes_no_planning_and_leaves_the_caller_state(steps, monkeypatch):
    """A decoding call of one position goes from the function's checks to the step (no ``_run``: no planning, no
    autograd Function) and writes nothing into the state it continues."""
    import linrope.functional as functional

    q, k, v, W = _data(21, N=8)
    rot = RotaryEmbedding(32)
    with torch.no_grad():
        full = favor_attention(q, k, v, W, causal=True, rotary=rot, decay=0.9)
        _, state = favor_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], W, causal=True, rotary=rot, decay=0.9,
                                   return_state=True)
        kept = [t.clone() for t in (state.numerator, state.key_sum, state.log_ref)]

        def refuse(*args, **kwargs):
            raise AssertionError("a decoding step went through _run")

        monkeypatch.setattr(functional, "_run", refuse)
        out, new = favor_attention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], W, causal=True, rotary=rot, decay=0.9,
                                   initial_state=state, return_state=True)
    assert steps == [1] and new.offset == 8
    assert all(torch.equal(a, b) for a, b in zip(kept, (state.numerator, state.key_sum, state.log_ref)))
    assert _rel(out, full[:, :, 7:]) < 1e-5


def test_the_one_pass_update_equals_the_two_pass_one(monkeypatch):
    """Where every e is 1 the state update is S0 + k v^T in one pass: bit for bit the (S0 * 1) + k v^T of the
    general update (forced here by a ones tensor that never compares equal)."""
    for features, rope in (("favor", "interleaved"), ("features", "half"), ("favor", None)):
        interleaved, x, _ = _engine_inputs(features, rope, 1, 31)
        one = step.step(features, interleaved, torch.float32, **x)
        monkeypatch.setattr(step, "_ones", lambda e: torch.zeros_like(e))
        two = step.step(features, interleaved, torch.float32, **x)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_step_factors_are_the_rotary_tables():
    """The factors of the decoding step, made a block of positions at a time, are cos + i sin as ``cos_sin``
    gives them, in and past the rotary's cached tables, for both dtypes; a block follows its rotary."""
    import linrope.functional as functional

    rot = RotaryEmbedding(32, max_cached=100)
    sig = rot.signature()
    for dt in (torch.float32, F64):
        for p in (0, 1, 63, 64, 65, 99, 100, 130, 10**7, -5):
            got = functional._step_factor(rot, sig, p, torch.device("cpu"), dt)
            cos, sin = rot.cos_sin(p, 1, "cpu", dt)
            assert torch.equal(got, torch.complex(cos, sin)), (p, dt)
    other = RotaryEmbedding(32, base=500.0)
    assert not torch.equal(functional._step_factor(other, other.signature(), 5, torch.device("cpu"), torch.float32),
                           functional._step_factor(rot, sig, 5, torch.device("cpu"), torch.float32))
    key = id(other)
    del other
    assert key not in functional._FACTORS


@pytest.mark.parametrize("options", [dict(), dict(decay="multiscale"), dict(rope_learned=True),
                                     dict(interleaved=False), dict(kv_heads=2), dict(feature_map="relu")])
def test_token_by_token_decoding_equals_the_full_pass_past_the_cached_tables(steps, options):
    """One token at a time from an empty state over 150 positions (factor blocks of 64, the rotary's table of
    100), with a padded token: the full pass's outputs."""
    torch.manual_seed(1)
    layer = LinearRotaryAttention(32, heads=4, dim_head=8, nb_features=16, causal=True, **options).eval()
    if layer.rotary is not None and not options.get("rope_learned"):
        layer.rotary.max_cached = 100
    x = torch.randn(2, 150, 32)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[0, 70] = mask[1, :3] = False
    with torch.no_grad():
        full = layer(x, key_padding_mask=mask)
    cuts = [(0, 1)] + [(a, a + 1) for a in range(1, 150)]
    got, state = _decode(lambda sl, **a: layer(x[:, sl], **{"state" if n == "initial_state" else n: t
                                                            for n, t in a.items()}), 150, cuts, mask=mask, dim=1)
    assert steps == [1] * 149 and state.offset == 150
    assert _rel(got, full) < 1e-5


@pytest.mark.parametrize("features", ["favor", "features"])
@pytest.mark.parametrize("what", ["k-inf", "k-nan", "k-minus-inf", "v-inf", "v-nan", "k-huge"])
def test_one_position_confines_a_non_finite_key_or_value_to_its_head(features, what):
    """One position: a non-finite key (raw FAVOR+ input, or given feature) or value makes that (batch, head)'s row
    and returned state NaN, and nothing else; a huge finite FAVOR+ key (|k~|^2 overflows) weighs 0, as in the
    engine; a given feature of 1e20 is a large finite key."""
    interleaved, x, _ = _engine_inputs(features, "interleaved", 1, 41)
    clean = step.step(features, interleaved, torch.float32, **x)
    name, value = what.split("-", 1)
    x[name] = x[name].clone()
    x[name][1, 2, 0, 3] = {"inf": math.inf, "nan": math.nan, "minus-inf": -math.inf, "huge": 1e20}[value]
    got = step.step(features, interleaved, torch.float32, **x)
    eng = run(Call(EngineConfig(causal=True, chunk_size=2, group_size=4, dtype=torch.float32, needs_grad=False),
                   features, interleaved=interleaved), Inputs(**x))
    head = torch.zeros(2, 3, dtype=torch.bool)
    head[1, 2] = True
    nan = what != "k-huge"  # 1e20: a large finite given feature; a FAVOR+ key whose |k~|^2 overflows weighs 0
    for a, c, e in zip(got[:3], clean[:3], eng[:3]):
        assert a[head].isnan().all() if nan else torch.isfinite(a).all()
        assert torch.equal(a[~head], c[~head])
        assert torch.equal(a.isnan(), e.isnan())
    if not nan:
        assert _rel(got[0], eng[0]) < 1e-5
