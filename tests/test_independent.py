"""Decay, learned rotations and the rotated-normalizer ablation against ``tests/reference.py``, which shares no code
with the library: FAVOR+ features from Performer's formula, explicit rotation matrices, gamma^(m-n) as a power,
RetNet's rates as numbers. (``linrope.reference`` builds its features and rotations from the library's own
functions; these tests do not use it.) Float64, outputs and gradients."""

import pytest
import torch

from lab.models import RotatedNormalizerAttention
from linrope import (LearnedRotary, LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention,
                     softmax_attention)
from linrope.attention import multiscale_decays
from reference import (assert_close, decay_weights, eq19_weighted, favor_eq19, favor_features,
                       rotation_from_angles, rotation_matrices, softmax_ref)

F64 = torch.float64
B, H, N, D, R, DV = 2, 3, 40, 8, 16, 4
# RetNet's gamma_h = 1 - 2^(-5-h), h = 0..3, as numbers
RETNET_4 = (0.96875, 0.984375, 0.9921875, 0.99609375)


def _data(seed, n=N):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, n, D, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(B, H, n, DV, generator=g, dtype=F64)
    W = torch.randn(R, D, generator=g, dtype=F64)  # any projection: FAVOR+ is exact for each draw
    return q, k, v, W


def _compare(got, ref, inputs, rtol=1e-9):
    """Outputs, and the gradients of ``inputs`` for one random cotangent."""
    assert_close("out", ref, got, rtol=rtol)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    g_got = torch.autograd.grad((got * w).sum(), inputs, retain_graph=True)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for i, (a, b) in enumerate(zip(g_got, g_ref)):
        assert_close(f"gradient {i}", b, a, rtol=rtol)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("mask", [False, True], ids=["all", "padded"])
def test_decay_is_gamma_to_the_distance_on_every_head(interleaved, mask):
    """Per-head gammas, positions far from 0, groups of two chunks: sum_n gamma_h^(m-n) (R_m fq_m).(R_n fk_n) v_n
    over sum_n gamma_h^(m-n) fq_m.fk_n."""
    q, k, v, W = _data(0)
    for t in (q, k, v):
        t.requires_grad_()
    gammas, start = (0.5, 0.9, 0.99), 1000
    keep = None
    if mask:
        keep = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) > 0.3
        keep[:, 0] = True
    got = favor_attention(q, k, v, W, causal=True, rotary=RotaryEmbedding(R, interleaved=interleaved),
                          positions=start, decay=gammas, key_padding_mask=keep, chunk_size=8, group_size=16)
    pos = torch.arange(start, start + N)
    rot = rotation_matrices(pos, R, interleaved=interleaved)
    ref = eq19_weighted(favor_features(q, W), favor_features(k, W), v, Rq=rot, Rk=rot,
                        weights=decay_weights(gammas, pos), mask=keep)
    _compare(got, ref, (q, k, v))


def _layer_qkv(layer, x):
    """q, k, v (B, heads, N, dim_head) of a layer without grouped kv heads, from its own projection."""
    b, n, _ = x.shape
    qkv = layer.to_qkv(x).view(b, n, 3, layer.heads, layer.dim_head).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _layer_out(layer, out):
    b, h, n, dh = out.shape
    return layer.to_out(out.transpose(1, 2).reshape(b, n, h * dh))


def test_multiscale_decays_are_retnets_on_every_head():
    """The rates, and the layer's output: every head at its own gamma_h = 1 - 2^(-5-h) (not only head 0)."""
    assert multiscale_decays(4) == RETNET_4
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=4, nb_features=R, causal=True, decay="multiscale", seed=3,
                                  chunk_size=8).double()
    x = torch.randn(2, N, 32, dtype=F64)
    q, k, v = _layer_qkv(layer, x)
    W, pos = layer.feature_map.projection, torch.arange(N)
    rot = rotation_matrices(pos, R)
    per_head = eq19_weighted(favor_features(q, W), favor_features(k, W), v, Rq=rot, Rk=rot,
                             weights=decay_weights(RETNET_4, pos))
    assert_close("multiscale layer", _layer_out(layer, per_head), layer(x), rtol=1e-10)


def _learned(seed):
    rot = LearnedRotary(R, H).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from RoPE's angles, as after training
        rot.phase.copy_(torch.randn(H, R // 2, generator=g, dtype=F64))
        rot.theta.mul_(1 + 0.3 * torch.randn(H, R // 2, generator=g, dtype=F64))
    return rot


@pytest.mark.parametrize("positions", ["offset", "tensor"])
@pytest.mark.parametrize("decay", [None, 0.9])
def test_learned_rotations_are_rotation_matrices_of_theta_p_plus_phase(positions, decay):
    """Query pair i of head h at position m turns by theta_hi m + phase_hi, key pair i at n by theta_hi n, as
    explicit matrices: outputs, and the gradients of q, k, v, theta and phase."""
    q, k, v, W = _data(4)
    for t in (q, k, v):
        t.requires_grad_()
    rot = _learned(5)
    p = torch.arange(7, 7 + N) if positions == "offset" else 3 * torch.arange(N) + 2
    got = favor_attention(q, k, v, W, causal=True, rotary=rot, positions=7 if positions == "offset" else p,
                          decay=decay, chunk_size=8, group_size=16)
    angle = rot.theta[:, None, :] * p.double()[None, :, None]  # (H, N, r/2)
    weights = decay_weights((1.0 if decay is None else decay,) * H, p)
    ref = eq19_weighted(favor_features(q, W), favor_features(k, W), v,
                        Rq=rotation_from_angles(angle + rot.phase[:, None]), Rk=rotation_from_angles(angle),
                        weights=weights)
    _compare(got, ref, (q, k, v, rot.theta, rot.phase))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_rotated_normalizer_ablation_rotates_features_once_for_both_sums(causal):
    """The experiments' rotated-normalizer ablation (``lab.models.RotatedNormalizerAttention``): sum_n (R_m fq_m).(R_n fk_n) v_n / sum_n (R_m fq_m).(R_n fk_n), both sums from the
    same once-rotated features."""
    torch.manual_seed(0)
    layer = RotatedNormalizerAttention(32, heads=2, nb_features=R, causal=causal, seed=5, chunk_size=8).double()
    x = torch.randn(2, 24, 32, dtype=F64)
    q, k, v = _layer_qkv(layer, x)
    W = layer.feature_map.projection
    rot = rotation_matrices(torch.arange(24), R)
    tri = torch.ones(24, 24, dtype=F64).tril() if causal else None
    ablation = eq19_weighted(favor_features(q, W), favor_features(k, W), v, Rq=rot, Rk=rot, weights=tri,
                             rotated_normalizer=True)
    assert_close("rotated normalizer", _layer_out(layer, ablation), layer(x), rtol=1e-9)


def _row_error(got, ref):
    """The largest |got_m - ref_m| / |ref_m| over rows (float32 against the float64 reference)."""
    return float(((got.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


@pytest.mark.parametrize("rope", [None, "interleaved"])
def test_float32_holds_a_key_150_nats_above_the_earlier_ones(rope):
    """One key's log-scale 150 nats above every earlier key, mid-chunk and mid-group (position 21 of the group
    [16, 32)): exp(150) overflows float32 unless the key starts a group of its own at its own reference, and the
    rows before it must stay referred to keys they see (a reference taken from it would underflow them to 0)."""
    g = torch.Generator().manual_seed(6)
    q, k = (0.5 * torch.randn(1, 2, N, D, generator=g) for _ in range(2))
    v = torch.randn(1, 2, N, DV, generator=g)
    W = torch.randn(R, D, generator=g)
    W[3] *= 150 ** 0.5 * 2 ** 0.5 / W[3].norm()  # |w|^2 / 2 = 150: the key x~ = w has log-scale 150
    k[:, :, 21] = W[3] * D ** 0.25
    rot = None if rope is None else RotaryEmbedding(R)
    got = favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=8, group_size=16)
    assert _row_error(got, favor_eq19(q, k, v, W, causal=True, rope=rope)) < 1e-4


def test_float32_holds_queries_whose_features_exceed_exp_range():
    """Queries of std 30: W q~ reaches ~200, past float32's exp (88); their features are taken relative to the
    row's largest (a factor that cancels), so every row still matches the float64 reference."""
    g = torch.Generator().manual_seed(7)
    q = 30 * torch.randn(1, 2, N, D, generator=g)
    k, v = torch.randn(1, 2, N, D, generator=g), torch.randn(1, 2, N, DV, generator=g)
    W = torch.randn(R, D, generator=g)
    for causal in (True, False):
        got = favor_attention(q, k, v, W, causal=causal, chunk_size=8, group_size=16)
        assert _row_error(got, favor_eq19(q, k, v, W, causal=causal)) < 1e-4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("kind", ["favor", "features", "softmax"])
def test_padded_positions_may_hold_nan_and_inf(kind, causal):
    """What a padded key, value or key feature holds (an uninitialised buffer: NaN, inf) reaches no row: the outputs
    are eq. 19 (softmax) over the kept keys of clean inputs."""
    q, k, v, W = _data(8)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, 5:9] = keep[1, 30:] = False
    pad = ~keep[:, None, :, None]
    k_bad, v_bad = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))
    fq, fk = favor_features(q, W), favor_features(k, W)
    rot = rotation_matrices(torch.arange(N), R)
    tri = torch.ones(N, N, dtype=F64).tril() if causal else None
    ref = eq19_weighted(fq, fk, v, Rq=rot, Rk=rot, weights=tri, mask=keep)
    kw = dict(causal=causal, key_padding_mask=keep)
    if kind == "favor":
        got = favor_attention(q, k_bad, v_bad, W, rotary=RotaryEmbedding(R), chunk_size=8, **kw)
    elif kind == "features":
        got = linear_attention(fq, fk.masked_fill(pad, float("inf")), v_bad, rotary=RotaryEmbedding(R), chunk_size=8,
                               **kw)
    else:
        got = softmax_attention(q, k_bad, v_bad, **kw)
        ref = softmax_ref(q, k, v, causal=causal, mask=keep)
    assert_close(kind, ref, got, rtol=1e-9)
