"""The trained feature map (``Hedgehog``): its definition, its initial kernel, and eq. 19 with it exact against
float64 in every RoPE placement, in gradients and in decoding."""

import math

import pytest
import torch

from linrope import Hedgehog, LinearRotaryAttention, linear_attention
from linrope.rotary import RotaryEmbedding
from reference import assert_close, eq19_relative, eq19_weighted, rotation_matrices


def hedgehog_ref(x, W):
    """[softmax(W_h x~), softmax(-W_h x~)] per head, float64, written out."""
    u = torch.einsum("bhnd,hfd->bhnf", x.double() * x.shape[-1] ** -0.25, W.double())
    e, f = torch.exp(u - u.amax(-1, keepdim=True)), torch.exp(-u - (-u).amax(-1, keepdim=True))
    return torch.cat((e / e.sum(-1, keepdim=True), f / f.sum(-1, keepdim=True)), -1)


def test_features_are_the_two_softmaxes_per_head_and_trainable():
    fm = Hedgehog(8, 12, heads=3, seed=1).double()
    x = 3 * torch.randn(2, 3, 5, 8, dtype=torch.float64)
    for is_query in (True, False):
        f, scale = fm(x, is_query=is_query)
        assert scale is None and f.shape == (2, 3, 5, 12)
        assert_close("features", hedgehog_ref(x, fm.weight), f, rtol=1e-12)
    assert fm.weight.requires_grad and fm.weight.shape == (3, 6, 8)
    assert not torch.equal(fm.weight[0], fm.weight[1])  # a map per head


def test_initial_kernel_estimates_the_softmax_kernel():
    # With W_h FAVOR+'s orthogonal Gaussian draw, each half's softmax divides by (r/2) times an estimate of
    # exp(|x~|^2/2): phi(q).phi(k) * r/2 estimates exp(q.k/sqrt(d)) / exp(|q~|^2/2 + |k~|^2/2) ... times the
    # query's factor, which cancels in attention. Checked as attention weights: normalised over keys, the
    # initial map's weights approach softmax's as r grows.
    d, N = 8, 6
    q, k = 0.5 * torch.randn(1, 1, 1, d, dtype=torch.float64), 0.5 * torch.randn(1, 1, N, d, dtype=torch.float64)
    exact = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), -1)
    err = {}
    for r in (16, 4096):
        fm = Hedgehog(d, r, seed=2).double()
        w = fm(q, is_query=True)[0] @ fm(k, is_query=False)[0].transpose(-1, -2)
        err[r] = (w / w.sum(-1, keepdim=True) - exact).abs().max().item()
    assert err[4096] < 0.02 and err[4096] < err[16] / 3, err


@pytest.mark.parametrize("rope", ["features", "inputs", None])
def test_layer_is_exact_against_float64_with_every_rope_placement(rope):
    torch.manual_seed(1)
    layer = LinearRotaryAttention(32, heads=2, nb_features=12, feature_map="hedgehog", causal=True, rope=rope,
                                  kv_heads=1, seed=3).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 2] = False
    out = layer(x, key_padding_mask=mask)
    q, k, v = (t.detach() for t in layer.split(x, None, False))
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    if rope == "inputs":
        q, k = layer.rotary.rotate(q), layer.rotary.rotate(k)
    W = layer.feature_map.weight.detach()
    qf, kf = hedgehog_ref(q, W), hedgehog_ref(k, W)
    if rope == "features":
        ref = eq19_relative(qf, kf, v, causal=True, positions=torch.arange(9), mask=mask)
    else:
        ref = eq19_weighted(qf, kf, v, weights=torch.ones(9, 9, dtype=torch.float64).tril(), mask=mask)
    ref = layer.to_out(ref.transpose(1, 2).flatten(2))
    assert_close("hedgehog layer", ref, out, rtol=1e-9, atol=1e-12)


def test_gradients_of_the_trained_map_match_float64_autograd():
    torch.manual_seed(2)
    fm = Hedgehog(8, 10, heads=2, seed=4).double()
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    rot = RotaryEmbedding(10, interleaved=True)
    qf, _ = fm(q, is_query=True)
    kf, _ = fm(k, is_query=False)
    out = linear_attention(qf, kf, v, causal=True, rotary=rot)
    (gW,) = torch.autograd.grad((out * v.sum(-1, keepdim=True)).sum(), fm.weight)
    W = fm.weight.detach().clone().requires_grad_()
    R = rotation_matrices(torch.arange(7), 10)
    ref = eq19_weighted(hedgehog_ref(q, W), hedgehog_ref(k, W), v, Rq=R, Rk=R,
                        weights=torch.ones(7, 7, dtype=torch.float64).tril())
    (rW,) = torch.autograd.grad((ref * v.sum(-1, keepdim=True)).sum(), W)
    assert_close("d/dW", rW, gW, rtol=1e-8, atol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="nb_features"):
        Hedgehog(8, 7)
    with pytest.raises(ValueError, match="redraw_interval"):
        LinearRotaryAttention(32, heads=2, feature_map="hedgehog", redraw_interval=10)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, N, 8\)"):
        Hedgehog(8, 8, heads=3)(torch.randn(1, 2, 4, 8), is_query=True)
