"""Learned rotations (``LearnedRotary``: per-head frequencies theta and query phases, eq. 19 otherwise) against the
float64 quadratic reference: outputs and gradients of q, k, v, theta and phase, in pieces and token by token, at
large activations, and through the layer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linrope import LearnedRotary, LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope import softmax_attention
from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.reference import favor_attention_naive, linear_attention_naive

F64 = torch.float64
B, H, D, R, DV = 2, 3, 16, 32, 8


def _data(seed, N=70, std=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, k = (std * torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, N, DV, generator=g, dtype=dtype)
    return q, k, v, gaussian_orthogonal_matrix(R, D, generator=g).to(dtype)


def _learned(seed, dtype=F64):
    rot = LearnedRotary(R, H).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from RoPE's angles, as after training
        rot.phase.copy_(torch.randn(H, R // 2, generator=g, dtype=dtype))
        rot.theta.mul_(1 + 0.3 * torch.randn(H, R // 2, generator=g, dtype=dtype))
    return rot


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), chunk=st.sampled_from([8, 16, 64]), mask=st.booleans(),
       std=st.sampled_from([1.0, 3.0]), decay=st.sampled_from([None, 0.9]), given_features=st.booleans())
def test_learned_rotation_equals_quadratic_reference_outputs_and_all_gradients(seed, chunk, mask, std, decay,
                                                                                given_features):
    q, k, v, W = _data(seed, std=std)
    rot = _learned(seed)
    keep = (torch.rand(B, q.shape[2], generator=torch.Generator().manual_seed(seed)) > 0.3) if mask else None
    for t in (q, k, v):
        t.requires_grad_(True)
    kw = dict(causal=True, rotary=rot, key_padding_mask=keep, decay=decay)
    if given_features:
        (qf, _), (kf, ks) = favor_plus(q, W, is_query=True), favor_plus(k, W, is_query=False)
        got = linear_attention(qf, kf, v, k_logscale=ks, chunk_size=chunk, group_size=2 * chunk, **kw)
        ref = linear_attention_naive(qf, kf, v, k_logscale=ks, **kw)
    else:
        got = favor_attention(q, k, v, W, chunk_size=chunk, group_size=2 * chunk, **kw)
        ref = favor_attention_naive(q, k, v, W, **kw)
    assert _rel(got, ref) < 1e-10
    w = torch.randn_like(ref)
    wrt = (q, k, v, rot.theta, rot.phase)
    for name, a, b in zip("q k v theta phase".split(), torch.autograd.grad((got * w).sum(), wrt, retain_graph=True),
                          torch.autograd.grad((ref * w).sum(), wrt)):
        assert _rel(a, b) < 1e-9, name


def test_at_initialisation_it_is_eq19_and_float32_stays_exact_at_large_activations():
    """Phase 0 and RoPE's theta: the same attention as ``rotary=RotaryEmbedding(r)``; in float32 at std 5 every
    row holds to the float64 reference (the distance-0 term is taken as (R_phase fq) . k0, exact at phase 0)."""
    q, k, v, W = _data(3, N=96, std=5.0, dtype=torch.float32)
    init = LearnedRotary(R, H)
    a = favor_attention(q, k, v, W, causal=True, rotary=init)
    b = favor_attention(q, k, v, W, causal=True, rotary=RotaryEmbedding(R))
    ref = favor_attention_naive(q, k, v, W, causal=True, rotary=RotaryEmbedding(R))
    rows = lambda x: ((x.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max()  # noqa: E731
    assert rows(a) < 1e-4 and rows(b) < 1e-4
    trained = _learned(4, torch.float32)
    got = favor_attention(q, k, v, W, causal=True, rotary=trained)
    ref = favor_attention_naive(q, k, v, W, causal=True, rotary=trained)
    assert rows(got) < 1e-4


@pytest.mark.parametrize("pieces", [[1] * 40, [7, 20, 13]])
def test_streaming_with_learned_rotations_equals_one_pass(pieces):
    q, k, v, W = _data(5, N=40)
    rot = _learned(5)
    pos = torch.stack((torch.arange(40), 3 * torch.arange(40) + 7))  # per example
    full = favor_attention(q, k, v, W, causal=True, rotary=rot, positions=pos)
    assert _rel(full, favor_attention_naive(q, k, v, W, causal=True, rotary=rot, positions=pos)) < 1e-10
    outs, state, a = [], None, 0
    for n in pieces:
        out, state = favor_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], W, causal=True,
                                     rotary=rot, positions=pos[:, a:a + n], initial_state=state, return_state=True)
        outs.append(out)
        a += n
    assert _rel(torch.cat(outs, 2), full) < 1e-10


@pytest.mark.parametrize("start", [0, 5, 10**7])
def test_consecutive_positions_build_the_same_rotations_as_any_positions(start):
    """Positions start, start + 1, ... (an int, or None) take the factors as one offset times a table of steps;
    a position tensor takes them from each angle's own cos and sin. float64: the same outputs and gradients, at
    10^7 too, and streamed in pieces. float32: both as close to float64 (not the gradient of theta at 10^7,
    ill-conditioned there, d angle / d theta being the position: both paths lose most digits)."""
    data, rot64 = _data(7, N=70, std=2.0), _learned(7)
    pos = torch.arange(start, start + 70).expand(B, 70)  # a tensor: the per-angle path
    kw = dict(causal=True, chunk_size=16, group_size=32)
    w = torch.randn(B, H, 70, DV, generator=torch.Generator().manual_seed(8), dtype=F64)
    run = {}
    for dtype in (F64, torch.float32):
        q, k, v, W = (t.to(dtype).requires_grad_(t.dim() == 4) for t in data)
        rot = _learned(7).to(dtype)
        for name, p in (("int", start), ("tensor", pos)):
            out = favor_attention(q, k, v, W, positions=p, rotary=rot, **kw)
            run[dtype, name] = (out, *torch.autograd.grad((out * w.to(dtype)).sum(), (q, k, v, rot.theta, rot.phase)))
    for i, (a, b) in enumerate(zip(run[F64, "int"], run[F64, "tensor"])):  # theta's gradient at 10^7: float64
        assert _rel(a, b) < (1e-8 if i == 4 and start > 10**6 else 1e-10)  # angles differ by 1e-9 rad there
    for i, name in enumerate("out q k v theta phase".split()):
        if name == "theta" and start > 10**5:
            continue  # float32 at 10^7: 20-60% off float64 on either path (the digits dang * position loses)
        err_int, err_tensor = (_rel(run[torch.float32, m][i], run[F64, "tensor"][i]) for m in ("int", "tensor"))
        assert err_int <= 1.5 * err_tensor + 2e-6, (name, err_int, err_tensor)
    q, k, v, W = data
    with torch.no_grad():
        outs, state = [], None
        for lo, hi in ((0, 9), (9, 10), (10, 70)):
            out, state = favor_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], W, causal=True, rotary=rot64,
                                         positions=start + lo, initial_state=state, return_state=True)
            outs.append(out)
        assert _rel(torch.cat(outs, 2), run[F64, "tensor"][0]) < 1e-10


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_learns_its_rotations_and_decodes_token_by_token(kv_heads):
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=4, nb_features=R, causal=True, rope_learned=True, seed=1, chunk_size=8,
                                  kv_heads=kv_heads).double()
    assert isinstance(layer.rotary, LearnedRotary)
    assert {"rotary.theta", "rotary.phase"} <= set(layer.state_dict())
    x = torch.randn(2, 30, 32, dtype=F64)
    full = layer(x)
    full.square().sum().backward()
    assert layer.rotary.theta.grad.abs().max() > 0 and layer.rotary.phase.grad.abs().max() > 0
    with torch.no_grad():
        layer.rotary.phase.normal_()
        full = layer(x)
        state, outs = None, []
        for t in range(30):
            y, state = layer(x[:, t:t + 1], state=state, return_state=True)
            outs.append(y)
    assert state.numerator.shape[1] == 4  # learned rotations differ per query head: every head's state
    assert _rel(torch.cat(outs, 1), full) < 1e-10


def test_learned_rotation_errors_are_clear():
    q, k, v, W = _data(6, N=8)
    with pytest.raises(ValueError, match="rotary: a LearnedRotary needs causal=True"):
        favor_attention(q, k, v, W, rotary=LearnedRotary(R, H))
    with pytest.raises(ValueError, match="rotary: a LearnedRotary of 2 heads for H = 3 heads"):
        favor_attention(q, k, v, W, causal=True, rotary=LearnedRotary(R, 2))
    with pytest.raises(ValueError, match=r"rotary: its dim \(16\) must equal the number of features r "
                                         r"\(projection rows\) \(32\)"):
        favor_attention(q, k, v, W, causal=True, rotary=LearnedRotary(16, H))
    with pytest.raises(TypeError, match="rotary: expected a linrope.RotaryEmbedding or None, got LearnedRotary"):
        softmax_attention(q, k, v, rotary=LearnedRotary(D, H))
    with pytest.raises(ValueError, match="group: expected None with a LearnedRotary"):
        favor_attention(q, k, v, W, causal=True, rotary=LearnedRotary(R, H), group=object())
    with pytest.raises(ValueError, match="rope_learned: expected False unless rope='features' and causal=True"):
        LinearRotaryAttention(32, heads=4, causal=True, rope="inputs", rope_learned=True)
    with pytest.raises(ValueError, match="rope_learned: expected False unless"):
        LinearRotaryAttention(32, heads=4, rope_learned=True)
