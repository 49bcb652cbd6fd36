"""Decay (``decay=`` gamma per head): out_m = sum_n gamma^(m-n) (R_m qf_m).(R_n kf_n) v_n / sum_n gamma^(m-n)
qf_m.kf_n, against the float64 quadratic and one-position-at-a-time references, in pieces and token by token, far
from position 0, and through the layer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linrope import LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope.attention import multiscale_decays
from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.reference import favor_attention_naive, favor_attention_recurrent, linear_attention_naive

# every test twice: the torch engine, and the compiled causal pass where it covers the call (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_kernel")

F64 = torch.float64


def _data(seed, B=2, H=3, N=80, d=16, dv=8, std=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, k = (std * torch.randn(B, H, N, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g, dtype=dtype)
    return q, k, v, gaussian_orthogonal_matrix(32, d, generator=g).to(dtype)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), gamma=st.sampled_from([0.3, 0.8, 0.97, 1.0]), chunk=st.sampled_from([8, 16, 64]),
       rope=st.booleans(), mask=st.booleans(), std=st.sampled_from([1.0, 3.0]))
def test_favor_decay_equals_quadratic_reference_outputs_and_gradients(seed, gamma, chunk, rope, mask, std):
    q, k, v, W = _data(seed, std=std)
    B, H, N = q.shape[:3]
    decay = torch.tensor([gamma, gamma ** 0.5, 0.9])[:H]
    rot = RotaryEmbedding(32) if rope else None
    keep = None
    if mask:
        keep = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) > 0.3
    for t in (q, k, v):
        t.requires_grad_(True)
    got = favor_attention(q, k, v, W, causal=True, rotary=rot, decay=decay, chunk_size=chunk, group_size=2 * chunk,
                          key_padding_mask=keep)
    ref = favor_attention_naive(q, k, v, W, causal=True, rotary=rot, decay=decay, key_padding_mask=keep)
    assert _rel(got, ref) < 1e-10
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((got * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-9


def test_strong_decay_float32_rows_match_the_reference():
    """gamma = 0.3: keys 40 nats apart within a group split it (JUMP_LIMIT); float32 rows stay exact."""
    q, k, v, W = _data(1, N=200, dtype=torch.float32)
    got = favor_attention(q, k, v, W, causal=True, rotary=RotaryEmbedding(32), decay=0.3)
    ref = favor_attention_naive(q, k, v, W, causal=True, rotary=RotaryEmbedding(32), decay=0.3)
    err = ((got.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max()
    assert err < 1e-5


def test_decay_is_relative_far_from_position_zero():
    """Only m - n matters: the same call at positions 10^7.. equals it at 0.. in float32 (the keys' log-scales
    grow like 0.1 * 10^7 nats there: kept in float64, their differences stay exact)."""
    q, k, v, W = _data(2, N=96, dtype=torch.float32)
    near = favor_attention(q, k, v, W, causal=True, decay=0.9, chunk_size=16)
    far = favor_attention(q, k, v, W, causal=True, decay=0.9, chunk_size=16, positions=10**7)
    assert _rel(far, near) < 1e-6


@pytest.mark.parametrize("pieces", [[80], [1] * 80, [7, 30, 1, 42]])
def test_streaming_with_decay_equals_one_pass_and_the_recurrent_state(pieces):
    q, k, v, W = _data(3)
    decay = (0.5, 0.9, 0.99)
    rot = RotaryEmbedding(32, interleaved=False)
    ref, ref_state = favor_attention_recurrent(q, k, v, W, rotary=rot, decay=decay)
    full = favor_attention(q, k, v, W, causal=True, rotary=rot, decay=decay)
    assert _rel(full, ref) < 1e-10
    outs, state, a = [], None, 0
    for n in pieces:
        out, state = favor_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], W, causal=True,
                                     rotary=rot, decay=decay, initial_state=state, return_state=True)
        outs.append(out)
        a += n
    assert _rel(torch.cat(outs, 2), ref) < 1e-10
    # the state's sums at its reference: compare the decayed sums themselves, numerator e^log_ref
    for got_t, ref_t in ((state.numerator, ref_state.numerator), (state.key_sum, ref_state.key_sum)):
        scale = (state.log_ref - ref_state.log_ref).exp()
        assert _rel(got_t * scale.view(*scale.shape, *[1] * (got_t.dim() - 2)), ref_t) < 1e-10
    assert state.offset == ref_state.offset == 80


def test_given_features_with_decay_and_per_example_positions():
    q, k, v, W = _data(4)
    qf, _ = favor_plus(q, W, is_query=True)
    kf, ks = favor_plus(k, W, is_query=False)
    pos = torch.stack((torch.arange(80), torch.arange(80) * 2 + 5))  # (B, N): the distance counts positions
    for logscale in (ks, None):
        got = linear_attention(qf, kf, v, causal=True, rotary=RotaryEmbedding(32), positions=pos, decay=0.8,
                               k_logscale=logscale)
        ref = linear_attention_naive(qf, kf, v, causal=True, rotary=RotaryEmbedding(32), positions=pos, decay=[0.8] * 3,
                                     k_logscale=logscale)
        assert _rel(got, ref) < 1e-10


def test_recurrent_and_quadratic_references_agree_with_decay():
    q, k, v, W = _data(5, N=40)
    a, _ = favor_attention_recurrent(q, k, v, W, rotary=RotaryEmbedding(32), decay=(0.6, 0.9, 1.0))
    b = favor_attention_naive(q, k, v, W, causal=True, rotary=RotaryEmbedding(32), decay=(0.6, 0.9, 1.0))
    assert _rel(a, b) < 1e-12


def test_decay_one_is_no_decay():
    q, k, v, W = _data(6)
    a = favor_attention(q, k, v, W, causal=True, rotary=RotaryEmbedding(32), decay=1.0)
    b = favor_attention(q, k, v, W, causal=True, rotary=RotaryEmbedding(32))
    assert _rel(a, b) < 1e-12


def test_layer_with_multiscale_decay_decodes_token_by_token():
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=4, nb_features=32, causal=True, decay="multiscale", seed=1,
                                  chunk_size=8).double()
    assert layer.decay == multiscale_decays(4) and layer.decay[0] == 1 - 2 ** -5
    x = torch.randn(2, 30, 32, dtype=F64)
    full = layer(x)
    state, outs = None, []
    for t in range(30):
        y, state = layer(x[:, t:t + 1], state=state, return_state=True)
        outs.append(y)
    assert _rel(torch.cat(outs, 1), full) < 1e-10
    plain = LinearRotaryAttention(32, heads=4, nb_features=32, causal=True, seed=1, chunk_size=8).double()
    with pytest.raises(ValueError, match=r"state_dict: saved from a LinearRotaryAttention with another "
                                         r"configuration: decay=\[0\.96875, .*\] there, None here"):
        plain.load_state_dict(layer.state_dict())  # same tensors, but they were trained for the decays
    with pytest.raises(ValueError, match=r"initial_state: made by a call with .*decay=\(0\.96875.* continued by "
                                         r"one with .*decay=None"):
        plain(x[:, :1], state=state)


def test_bad_decay_raises_clearly():
    q, k, v, W = _data(7, N=8)
    with pytest.raises(ValueError, match="decay: expected causal=True"):
        favor_attention(q, k, v, W, decay=0.9)
    with pytest.raises(ValueError, match=r"decay: expected None, 'multiscale', a float or 3 floats in \(0, 1\]"):
        favor_attention(q, k, v, W, causal=True, decay=(0.9, 0.8))
    for bad in (True, False, (0.9, True, 0.8)):
        with pytest.raises(ValueError, match="a bool is not a rate"):
            favor_attention(q, k, v, W, causal=True, decay=bad)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay: expected"):
            favor_attention(q, k, v, W, causal=True, decay=bad)
    with pytest.raises(ValueError, match="decay: expected"):
        favor_attention(q, k, v, W, causal=True, decay="fast")
    with pytest.raises(ValueError, match="decay: expected None for a layer built with causal=False"):
        LinearRotaryAttention(32, heads=4, decay=0.9)
    with pytest.raises(ValueError, match="decay: expected None, 'multiscale'"):
        LinearRotaryAttention(32, heads=4, causal=True, decay="retnet")
    with pytest.raises(ValueError, match="decay: expected None, 'multiscale', a float or 4 floats"):
        LinearRotaryAttention(32, heads=4, causal=True, decay=(0.9, 0.9))
