"""lab.longterm: the paper's bound, the feature-space kernel, and attention weights by distance."""

import math

import numpy as np
import pytest
import torch

from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.functional import softmax_attention
from lab import longterm as L
from lab.mechanism import rope_frequencies
from lab.models import ByteLM, ModelConfig
from linrope.reference import favor_attention_naive
from linrope.rotary import RotaryEmbedding

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("pairs", [1, 4, 32, 128])
def test_bound_at_zero_is_its_closed_form(pairs):
    theta = rope_frequencies(2 * pairs)
    assert L.relative_upper_bound(theta, [0])[0] == pytest.approx(L.bound_at_zero(pairs), rel=1e-14)
    assert L.bound_at_zero(pairs) == (pairs + 1) / 2


def test_bound_matches_a_direct_sum_and_decays_for_d64():
    theta = rope_frequencies(64)
    for delta in (1, 7, 100, 333):
        direct = sum(abs(sum(complex(math.cos(delta * t), math.sin(delta * t)) for t in theta[:i]))
                     for i in range(1, 33)) / 32
        assert L.relative_upper_bound(theta, [delta])[0] == pytest.approx(direct, rel=1e-12)
    b = L.relative_upper_bound(theta, np.arange(1025))
    assert (b <= b[0] + 1e-12).all()  # |S_i| <= i
    assert b[1] < b[0] and b[10] < 0.6 * b[0]
    assert b[200:257].mean() < 0.3 * b[0] and b[900:].mean() < 0.3 * b[0]  # the paper's Fig. 2: it decays
    rows = L.bound_rows(64, (64, 256), max_delta=50)
    by = {(r["design"], r["delta"]): r["bound"] for r in rows}
    assert all(by[("RoPE on q, k (d=64)", t)] == by[("eq. 19 on features (r=64)", t)] for t in range(51))


# --------------------------------------------------------------------------------------------------- the kernel
def test_eq19_kernel_is_the_library_rotation_and_equals_d_at_zero():
    g = torch.Generator().manual_seed(1)
    r, deltas = 16, [0, 1, 5, 40, 1000]
    W = gaussian_orthogonal_matrix(r, 8, generator=g)
    qf, _ = favor_plus(torch.randn(3, 8, generator=g, dtype=F64), W, is_query=True)
    kf, _ = favor_plus(torch.randn(3, 8, generator=g, dtype=F64), W, is_query=True)
    K = L.eq19_kernel(qf, kf, deltas)  # (3, 5)
    assert torch.allclose(K[:, 0], (qf * kf).sum(-1), rtol=1e-14, atol=0)  # K(0) = D
    rot = RotaryEmbedding(r)
    for j, t in enumerate(deltas):
        lib = (rot.rotate(qf[:, None, :], t)[:, 0] * kf).sum(-1)  # query at position t, key at 0
        assert torch.allclose(K[:, j], lib, rtol=1e-12, atol=1e-14)


def test_feature_kernel_ratios():
    deltas = L.kernel_deltas(200, dense=8, points=6)
    assert deltas[0] == 0 and {1, 10, 100}.issubset(set(deltas.tolist()))
    for content in ("independent", "aligned"):
        out = L.feature_kernel(16, deltas, d=8, draws=40, content=content)
        for key, ratio in out.items():
            assert ratio.shape == (40, len(deltas))
            assert torch.allclose(ratio[:, 0], torch.ones(40, dtype=F64), rtol=1e-12), key  # K(0) = D
    aligned = L.feature_kernel(16, deltas, d=8, draws=40, content="aligned")
    # k = q: c_i = |z_i|^2 is real and >= 0, so |K(Delta)| <= K(0); and (R q).q <= |q|^2 for the exact kernel
    assert (aligned["eq19"].abs() <= 1 + 1e-12).all()
    assert (aligned["inputs_exact"] <= 1 + 1e-12).all()
    assert aligned["inputs_exact"][:, -3:].mean() < 0.8  # and it decays
    with pytest.raises(ValueError, match="deltas"):
        L.feature_kernel(16, [1, 2], d=8, draws=2)


# ----------------------------------------------------------------------------------------- trained weights
def _direct_profile(a):
    """The per-distance sums of a (B, H, N, N), by loops."""
    B, H, N, _ = a.shape
    out = {k: torch.zeros(N, dtype=F64) for k in ("abs", "signed", "rel_abs", "rel", "count")}
    for m in range(N):
        for n in range(m + 1):
            w = a[:, :, m, n].to(F64)
            out["abs"][m - n] += w.abs().sum()
            out["signed"][m - n] += w.sum()
            out["rel_abs"][m - n] += (w.abs() * (m + 1)).sum()
            out["rel"][m - n] += (w * (m + 1)).sum()
            out["count"][m - n] += B * H
    return out


@pytest.mark.parametrize("variant", ["linear-rope", "linear-rope-inputs", "linear-nope", "softmax-rope",
                                     "softmax-t5", "linear-rope-rotden"])
def test_weights_by_distance_on_a_tiny_model(variant):
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(attention=variant, n_layer=2, dim=16, heads=2, nb_features=8, init_std=0.5))
    x = torch.randint(0, 256, (2, 12))
    inputs = L.capture_attention_inputs(model, x)
    assert len(inputs) == 2 and inputs[0].shape == (2, 12, 16)
    for block, h in zip(model.blocks, inputs):
        attn = block.attn
        a, v = L.attention_weights(attn, h)
        assert a.dtype == F64 and a.shape == (2, 2, 12, 12)
        assert (a.triu(1) == 0).all()
        # the weights reproduce the layer (float32) ...
        inner = attn.inner if hasattr(attn, "inner") else attn
        assert torch.allclose(inner.merge((a @ v).float()), attn(h), atol=1e-5, rtol=1e-4)
        # ... and a direct float64 computation
        q, k, vv = (t.to(F64) for t in inner.split(h, None, False))
        if variant.startswith("linear") and variant != "linear-rope-rotden":
            rot = inner.rotary
            if inner.rope == "inputs":
                q, k = rot.rotate(q), rot.rotate(k)
            ref = favor_attention_naive(q, k, vv, inner.feature_map.projection, causal=True,
                                        rotary=rot if inner.rope == "features" else None)
            assert torch.allclose(a @ v, ref, rtol=1e-10, atol=1e-12)
        elif variant == "softmax-rope":
            q, k = inner.rotary.rotate(q), inner.rotary.rotate(k)
            assert torch.allclose(a @ v, softmax_attention(q, k, vv, causal=True), rtol=1e-10, atol=1e-12)
        if variant in ("linear-rope", "linear-rope-rotden"):
            assert (a < 0).any()  # eq. 19's weights are signed: the test would not test signs otherwise
        else:
            assert (a >= 0).all() and torch.allclose(a.sum(-1), torch.ones(2, 2, 12, dtype=F64))
        # the distance profile against loops, and the row sums against a.sum(-1)
        got, direct = L.distance_profile(a), _direct_profile(a)
        rs = L.row_sums(got)
        assert rs["signed"] == pytest.approx(float(a.sum(-1).mean()), rel=1e-12)
        assert rs["abs"] == pytest.approx(float(a.abs().sum(-1).mean()), rel=1e-12)
        for key in direct:
            assert torch.allclose(got[key], direct[key], rtol=1e-12, atol=1e-14), key
    sums = L.measure_model(model, x, batch=1)
    direct = [_direct_profile(L.attention_weights(b.attn, h)[0]) for b, h in zip(model.blocks, inputs)]
    for s, d in zip(sums, direct):
        for key in d:
            assert torch.allclose(s[key], d[key], rtol=1e-10, atol=1e-12), key
    means = L.profile_means(sums[0])
    assert means["mean_abs"].shape == (12,)
    b = L.binned(sums[0], 0, 0)
    assert b["rel_abs"] == pytest.approx(float(sums[0]["rel_abs"][0] / sums[0]["count"][0]))


def test_uniform_weights_are_one_relative_to_uniform():
    N = 10
    a = torch.tril(torch.ones(N, N, dtype=F64)) / torch.arange(1, N + 1, dtype=F64)[:, None]
    means = L.profile_means(L.distance_profile(a[None, None]))
    assert torch.allclose(means["rel_abs"], torch.ones(N, dtype=F64))
    assert (means["mean_abs"].diff() < 0).all()  # the raw mean falls with distance even for uniform weights


def test_run_without_models(tmp_path):
    cfg = L.LongtermConfig(out=str(tmp_path), d=8, rs=(8, 16), max_delta=64, draws=16, skip_models=True)
    summary = L.run(cfg, log=lambda *_: None)
    assert summary["bound"]["RoPE on q, k (d=8)"][0] == pytest.approx(L.bound_at_zero(4))
    for name in ("bound.csv", "kernel.csv", "kernel_summary.csv", "bound.png", "kernel.png", "summary.json",
                 "stdout.txt"):
        assert (tmp_path / name).exists(), name
    with pytest.raises(ValueError, match="variants"):
        L.run(L.LongtermConfig(out=str(tmp_path), variants=("nope",)), log=lambda *_: None)
