import math

import pytest
import torch

from linrope.features import (EluFeatures, FavorPlus, FavorTrig, ReLUFeatures, favor_plus,
                              gaussian_orthogonal_matrix, make_feature_map, redraw_projections)
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


def maps_with_intervals():
    return torch.nn.ModuleDict({"every2": FavorPlus(8, 16, seed=1, redraw_interval=2),
                                "every3": ReLUFeatures(8, 16, seed=2, redraw_interval=3),
                                "never": FavorTrig(8, 16, seed=3), "elu": EluFeatures(8)})


def test_redraw_projections_redraws_exactly_at_multiples_of_the_interval():
    maps = maps_with_intervals()
    x = torch.randn(1, 1, 4, 8)
    history = {name: [maps[name].projection.clone()] for name in ("every2", "every3", "never")}
    counts = []
    for step in range(1, 13):
        maps.train()
        for m in maps.values():  # training forwards never redraw, however many
            m(x, is_query=False)
        assert all(torch.equal(history[n][-1], maps[n].projection) for n in history)
        counts.append(redraw_projections(maps, step))
        for n in history:
            history[n].append(maps[n].projection.clone())
    assert counts == [0, 1, 1, 1, 0, 2, 0, 1, 1, 1, 0, 2]
    for name, interval in (("every2", 2), ("every3", 3)):
        changed = [s for s in range(1, 13) if not torch.equal(history[name][s - 1], history[name][s])]
        assert changed == list(range(interval, 13, interval)), name
        assert int(maps[name].redraws) == 12 // interval
    assert all(torch.equal(p, history["never"][0]) for p in history["never"]) and int(maps["never"].redraws) == 0


def test_replicas_with_the_same_seed_redraw_identically():
    """DDP ranks each call redraw_projections with the same step: no communication needed to agree."""
    a, b = maps_with_intervals(), maps_with_intervals()
    for step in range(1, 7):
        redraw_projections(a, step)
        redraw_projections(b, step)
        for name in ("every2", "every3", "never"):
            assert torch.equal(a[name].projection, b[name].projection), (step, name)
    # the k-th redraw is a pure function of (seed, k): three plain redraw() calls land on the same matrix
    c = FavorPlus(8, 16, seed=1)
    for _ in range(3):
        c.redraw()
    assert torch.equal(c.projection, a["every2"].projection)
    assert not torch.equal(c.projection, FavorPlus(8, 16, seed=1).projection)


def test_state_dicts_with_the_old_forward_counter_still_load():
    fm = FavorPlus(8, 16, seed=4, redraw_interval=2)
    fm.redraw()
    old = dict(fm.state_dict(), steps=torch.tensor(7))  # what FeatureMap.training_step used to count
    fresh = FavorPlus(8, 16, seed=0, redraw_interval=2)
    fresh.load_state_dict(old)  # strict
    assert torch.equal(fresh.projection, fm.projection) and int(fresh.redraws) == 1 and "steps" in old
    assert set(fresh.state_dict()) == {"seed", "redraws", "projection"}
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "stepz"'):
        fresh.load_state_dict(dict(fm.state_dict(), stepz=torch.tensor(7)))  # other stray keys still refused


def feature_calls():
    fp, trig, relu, elu = FavorPlus(16, 32, seed=1), FavorTrig(16, 32, seed=2), ReLUFeatures(16, 32, seed=3), \
        EluFeatures(16)
    return [("favor_plus keys", lambda x: favor_plus(x, fp.projection, is_query=False)),
            ("favor_plus queries", lambda x: favor_plus(x, fp.projection, is_query=True)),
            ("FavorPlus", lambda x: fp(x, is_query=False)), ("FavorTrig", lambda x: trig(x, is_query=False)),
            ("ReLUFeatures", lambda x: relu(x, is_query=True)), ("EluFeatures", lambda x: elu(x, is_query=True))]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_features_ignore_bfloat16_autocast(input_dtype):
    # activations of size ~3 make exp(W x~) sensitive: a bfloat16 matmul would move features by several percent
    x = (3 * torch.randn(2, 2, 20, 16)).to(input_dtype)
    for name, call in feature_calls():
        eager = call(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = call(x)
        for e, c in zip(eager, cast):
            if e is None:
                assert c is None, name
                continue
            assert e.dtype == c.dtype == torch.float32, name
            assert torch.equal(e, c), f"{name}: max difference {(e - c).abs().max():.3e} under autocast"
    # and bfloat16 inputs are computed in float32, from their exact values
    fp = FavorPlus(16, 32, seed=1).double()
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, s = fp.float()(xb, is_query=False)
    ref = favor_features(xb.double(), fp.projection.double())
    assert_close("bf16 input keys", ref, f.double() * torch.exp(s.double())[..., None] / math.sqrt(32), rtol=1e-5)


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


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: FavorPlus(0, 16), ValueError, r"dim: expected an integer >= 1, got 0", id="zero-dim"),
    pytest.param(lambda: FavorPlus(8, 0), ValueError, r"nb_features: expected an integer >= 1, got 0",
                 id="zero-nb_features"),
    pytest.param(lambda: FavorTrig(8, 15), ValueError, r"nb_features: expected an even integer >= 2 \(FavorTrig",
                 id="trig-odd-nb_features"),
    pytest.param(lambda: FavorPlus(8, 16, redraw_interval=0), ValueError,
                 r"redraw_interval: expected None or an integer >= 1 \(optimizer steps\), got 0", id="zero-interval"),
    pytest.param(lambda: FavorPlus(8, 16, redraw_interval=True), ValueError,
                 r"redraw_interval: expected None or an integer >= 1", id="bool-interval"),
    pytest.param(lambda: FavorPlus(8, 16, seed=1.5), TypeError, r"seed: expected an int or None, got float",
                 id="float-seed"),
    pytest.param(lambda: FavorPlus(8, 16)(torch.randn(1, 1, 3, 7), is_query=True), ValueError,
                 r"x: expected last dimension 8 \(the feature map's dim\)", id="x-wrong-dim"),
    pytest.param(lambda: EluFeatures(8)(torch.randn(1, 1, 3, 7), is_query=True), ValueError,
                 r"x: expected last dimension 8 \(the feature map's dim\)", id="elu-x-wrong-dim"),
    pytest.param(lambda: FavorPlus(8, 16)(torch.ones(1, 1, 3, 8, dtype=torch.long), is_query=True), TypeError,
                 r"x: expected a floating-point tensor, got dtype torch\.int64", id="x-integer"),
    pytest.param(lambda: make_feature_map("softmax", 8), ValueError,
                 r"feature_map: expected one of \['elu', 'favor\+', 'hedgehog', 'relu', 'trig'\], got 'softmax'",
                 id="unknown-feature_map"),
    pytest.param(lambda: ReLUFeatures(8, 16, kernel_eps=0), ValueError,
                 r"kernel_eps: expected a finite number > 0, got 0", id="zero-kernel_eps"),
    pytest.param(lambda: ReLUFeatures(8, 16, kernel_eps="1e-3"), ValueError,
                 r"kernel_eps: expected a finite number > 0, got '1e-3'", id="string-kernel_eps"),
    pytest.param(lambda: redraw_projections(FavorPlus(8, 16), 0), ValueError,
                 r"step: expected an integer >= 1 \(optimizer steps done\), got 0", id="zero-step"),
    pytest.param(lambda: redraw_projections(FavorPlus(8, 16), 2.0), ValueError,
                 r"step: expected an integer >= 1 \(optimizer steps done\), got 2\.0", id="float-step"),
    pytest.param(lambda: redraw_projections([FavorPlus(8, 16)], 2), TypeError,
                 r"module: expected a torch\.nn\.Module, got list", id="list-module"),
])
def test_invalid_arguments_name_the_argument_and_what_was_expected(call, error, match):
    with pytest.raises(error, match=match):
        call()
