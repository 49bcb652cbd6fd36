import math

import pytest
import torch

from linrope.features import (EluFeatures, FavorPlus, FavorTrig, ReLUFeatures, favor_plus,
                              gaussian_orthogonal_matrix, make_feature_map)
from reference import assert_close, favor_features


def test_favor_plus_is_performer_features_up_to_the_documented_factors():
    fm = FavorPlus(16, 32, seed=3).double()
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    ref = favor_features(x, fm.projection)
    fk, ks = fm(x, is_query=False)
    assert_close("keys", ref, fk * torch.exp(ks)[..., None] / math.sqrt(32), rtol=1e-12)
    fq, none = fm(x, is_query=True)
    assert none is None
    ratio = ref / fq  # one positive factor per row
    assert_close("query row factor", ratio[..., :1].expand_as(ratio), ratio, rtol=1e-10)
    assert fq.amax(-1).eq(1).all() and fk.amax(-1).eq(1).all()


@pytest.mark.parametrize("orthogonal", [True, False])
def test_favor_plus_is_unbiased_for_the_softmax_kernel(orthogonal):
    d, r, draws = 8, 16, 4000
    q, k = 0.6 * torch.randn(d, dtype=torch.float64), 0.6 * torch.randn(d, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    est = torch.empty(draws, dtype=torch.float64)
    for i in range(draws):
        W = gaussian_orthogonal_matrix(r, d, orthogonal=orthogonal, generator=g)
        fq, sq = favor_plus(q[None], W, is_query=False)
        fk, sk = favor_plus(k[None], W, is_query=False)
        est[i] = ((fq * fk).sum() * torch.exp(sq + sk) / r).squeeze()
    exact = torch.exp(q @ k / math.sqrt(d))
    se = est.std() / math.sqrt(draws)
    assert abs(est.mean() - exact) < 4 * se, f"mean {est.mean():.4f} vs exact {exact:.4f} (se {se:.4f})"


def test_orthogonal_matrix_rows_are_orthogonal_within_blocks_and_gaussian_in_norm():
    W = gaussian_orthogonal_matrix(2000, 8, generator=torch.Generator().manual_seed(1))
    block = W[:8] / W[:8].norm(dim=1, keepdim=True)
    assert_close("orthonormal block", torch.eye(8, dtype=torch.float64), block @ block.t(), atol=1e-12)
    sq = (W * W).sum(1)  # chi-square with 8 degrees of freedom
    assert abs(sq.mean().item() - 8) < 0.5 and abs(sq.var().item() - 16) < 3
    # directions uniform: no coordinate has a preferred sign (QR sign correction)
    assert W[:, 0].gt(0).double().mean().sub(0.5).abs() < 0.05


def test_seed_reproducibility_state_dict_and_redraw():
    a, b = FavorPlus(16, 32, seed=7), FavorPlus(16, 32, seed=7)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, FavorPlus(16, 32, seed=8).projection)
    torch.manual_seed(5)
    c = FavorPlus(16, 32)
    torch.manual_seed(5)
    assert torch.equal(c.projection, FavorPlus(16, 32).projection)
    old = a.projection.clone()
    a.redraw()
    b.redraw()
    assert not torch.equal(old, a.projection) and torch.equal(a.projection, b.projection)
    fresh = FavorPlus(16, 32, seed=0)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.projection, a.projection) and int(fresh.redraws) == 1


def test_automatic_redraw_counts_training_steps_only():
    fm = FavorPlus(8, 16, seed=1, redraw_interval=3)
    p0 = fm.projection.clone()
    fm.eval()
    for _ in range(5):
        fm.training_step()
    assert torch.equal(p0, fm.projection)
    fm.train()
    fm.training_step()
    fm.training_step()
    assert torch.equal(p0, fm.projection)
    fm.training_step()
    assert not torch.equal(p0, fm.projection) and int(fm.redraws) == 1


def test_other_feature_maps_follow_their_definitions():
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    trig = FavorTrig(8, 16, seed=1).double()
    xs = x * 8 ** -0.25
    u = xs @ trig.projection.t()
    f, s = trig(x, is_query=False)
    assert_close("trig", torch.cat((u.sin(), u.cos()), -1) * torch.exp(0.5 * (xs * xs).sum(-1, keepdim=True)),
                 f * torch.exp(s)[..., None], rtol=1e-12)
    relu = ReLUFeatures(8, 16, seed=1).double()
    assert_close("relu", torch.relu(xs @ relu.projection.t()) + 1e-3, relu(x, is_query=True)[0], rtol=1e-12)
    assert_close("elu", torch.nn.functional.elu(x) + 1, EluFeatures(8)(x, is_query=False)[0], rtol=1e-12)


def test_low_precision_inputs_give_float32_features():
    f, s = FavorPlus(8, 16, seed=0)(torch.randn(1, 1, 4, 8, dtype=torch.bfloat16), is_query=False)
    assert f.dtype == torch.float32 and s.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (lambda: FavorPlus(8, 0), "nb_features"),
    (lambda: FavorTrig(8, 15), "nb_features"),
    (lambda: FavorPlus(8, 16, redraw_interval=0), "redraw_interval"),
    (lambda: FavorPlus(8, 16, seed=1.5), "seed"),
    (lambda: FavorPlus(8, 16)(torch.randn(1, 1, 3, 7), is_query=True), "x"),
    (lambda: make_feature_map("softmax", 8), "feature_map"),
    (lambda: ReLUFeatures(8, 16, kernel_eps=0), "kernel_eps"),
])
def test_invalid_arguments_name_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
