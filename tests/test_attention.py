import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.models import RotatedNormalizerAttention
from linrope import LinearRotaryAttention, SoftmaxAttention, redraw_projections

MAPS = ["favor+", "hedgehog", "trig", "relu", "elu"]
ROPES = ["features", "inputs", None]


def layer(**kw):
    kw = {"dim": 32, "heads": 2, "dim_head": 16, "nb_features": 32, **kw}
    return LinearRotaryAttention(**kw).double()


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("rope", ROPES)
def test_causal_output_ignores_later_tokens(feature_map, rope):
    attn = layer(causal=True, feature_map=feature_map, rope=rope)
    x = torch.randn(2, 60, 32, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    x2[:, 31:] = 20 * torch.randn_like(x2[:, 31:])
    y2 = attn(x2)
    assert torch.allclose(y[:, :31], y2[:, :31], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("feature_map", ["favor+", "elu"])
def test_layer_streaming_token_by_token_equals_one_pass(rope, feature_map):
    attn = layer(causal=True, rope=rope, feature_map=feature_map)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = attn(x)
    state, outs = None, []
    for t in range(23):
        out, state = attn(x[:, t:t + 1], state=state, return_state=True)
        outs.append(out)
    assert torch.allclose(full, torch.cat(outs, 1), rtol=1e-10, atol=1e-12)


def test_softmax_kv_cache_decoding_equals_one_pass():
    attn = SoftmaxAttention(32, heads=2, dim_head=16, causal=True).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    full = attn(x)
    out, cache = attn(x[:, :7], return_state=True)
    outs = [out]
    for t in range(7, 19):
        out, cache = attn(x[:, t:t + 1], state=cache, return_state=True)
        outs.append(out)
    assert torch.allclose(full, torch.cat(outs, 1), rtol=1e-10, atol=1e-12)


def test_padded_keys_leave_the_output_of_the_unpadded_part_unchanged():
    for cls, kw in ((LinearRotaryAttention, {"nb_features": 32}), (SoftmaxAttention, {})):
        attn = cls(32, heads=2, dim_head=16, **kw).double()
        x = torch.randn(1, 30, 32, dtype=torch.float64)
        padded = torch.cat((x, torch.randn(1, 10, 32, dtype=torch.float64)), 1)
        mask = torch.ones(1, 40, dtype=torch.bool)
        mask[:, 30:] = False
        assert torch.allclose(attn(x), attn(padded, key_padding_mask=mask)[:, :30], rtol=1e-10, atol=1e-12)


def test_error_against_softmax_shrinks_with_more_features():
    """FAVOR+ estimates softmax attention; its error falls as nb_features grows (same weights, no RoPE)."""
    x = 0.5 * torch.randn(4, 64, 32, dtype=torch.float64)
    errors = []
    for r in (8, 64, 512):
        err = 0.0
        for seed in range(4):
            torch.manual_seed(seed)
            soft = SoftmaxAttention(32, heads=2, dim_head=16, rope=None).double()
            lin = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=r, rope=None, seed=seed).double()
            lin.to_qkv.load_state_dict(soft.to_qkv.state_dict())
            lin.to_out.load_state_dict(soft.to_out.state_dict())
            err += (lin(x) - soft(x)).pow(2).mean().sqrt().item()
        errors.append(err / 4)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.35 * errors[0], errors


def test_redraw_interval_counts_optimizer_steps_not_forwards():
    attn = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, redraw_interval=2)
    p0 = attn.feature_map.projection.clone()
    x = torch.randn(1, 8, 32)
    for training in (False, True):
        attn.train(training)
        for _ in range(5):
            attn(x)
    assert torch.equal(p0, attn.feature_map.projection) and int(attn.feature_map.redraws) == 0
    assert redraw_projections(attn, 1) == 0 and torch.equal(p0, attn.feature_map.projection)
    assert redraw_projections(attn, 2) == 1 and not torch.equal(p0, attn.feature_map.projection)


def test_half_precision_layer():
    attn = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, causal=True).to(torch.bfloat16)
    y = attn(torch.randn(2, 300, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def small(**kw):
    return LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, **kw)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: LinearRotaryAttention(32, feature_map="cosformer"), ValueError,
                 r"feature_map: expected one of \['elu', 'favor\+', 'hedgehog', 'relu', 'trig'\], got 'cosformer'",
                 id="unknown-feature_map"),
    pytest.param(lambda: LinearRotaryAttention(32, rope="alibi"), ValueError,
                 r"rope: expected one of \('features', 'inputs', None\), got 'alibi'", id="unknown-rope"),
    pytest.param(lambda: LinearRotaryAttention(32, nb_features=31), ValueError,
                 r"nb_features: expected an even number to be rotated with rope='features', got 31",
                 id="odd-nb_features"),
    pytest.param(lambda: LinearRotaryAttention(32, dim_head=15, rope="inputs"), ValueError,
                 r"dim_head: expected an even number to be rotated with rope='inputs', got 15", id="odd-dim_head"),
    pytest.param(lambda: LinearRotaryAttention(32, heads=0), ValueError, r"heads: expected a positive integer, got 0",
                 id="zero-heads"),
    pytest.param(lambda: LinearRotaryAttention(32, chunk_size=0), ValueError,
                 r"chunk_size: expected a positive integer, got 0", id="zero-chunk_size"),
    pytest.param(lambda: LinearRotaryAttention(32, redraw_interval=0), ValueError,
                 r"redraw_interval: expected None or an integer >= 1 \(optimizer steps\)", id="zero-redraw_interval"),
    pytest.param(lambda: SoftmaxAttention(32, rope="features"), ValueError,
                 r"rope: expected one of \('inputs', None\), got 'features'", id="softmax-rope-features"),
    pytest.param(lambda: SoftmaxAttention(32, dim_head=15), ValueError,
                 r"dim_head: expected an even number to be rotated with rope='inputs', got 15",
                 id="softmax-odd-dim_head"),
    pytest.param(lambda: small()(torch.randn(1, 5, 31)), ValueError,
                 r"x: expected shape \(B, N, 32\), got \(1, 5, 31\)", id="x-wrong-width"),
    pytest.param(lambda: small()(torch.randn(5, 32)), ValueError, r"x: expected shape \(B, N, 32\), got \(5, 32\)",
                 id="x-2d"),
    pytest.param(lambda: small()(torch.ones(1, 5, 32, dtype=torch.long)), TypeError,
                 r"x: expected a floating-point tensor \(B, N, 32\) of embeddings, got torch\.int64", id="x-integer"),
    pytest.param(lambda: small()(torch.randn(1, 5, 32), context=torch.randn(1, 4, 32, dtype=torch.float64)),
                 ValueError, r"context: expected x's dtype \(torch\.float32\) and at least one position",
                 id="context-dtype"),
    pytest.param(lambda: small()(torch.randn(1, 5, 32), return_state=True), ValueError,
                 r"return_state: expected False for a layer built with causal=False", id="return_state-not-causal"),
    pytest.param(lambda: small()(torch.randn(1, 5, 32), state=small(causal=True)(torch.randn(1, 5, 32),
                                                                                return_state=True)[1]),
                 ValueError, r"state: expected None for a layer built with causal=False", id="state-not-causal"),
    pytest.param(lambda: small(causal=True)(torch.randn(1, 5, 32), state="cache"), TypeError,
                 r"state: expected an AttentionState \(returned with return_state=True\), got str",
                 id="linear-state-wrong-type"),
    pytest.param(lambda: SoftmaxAttention(32, heads=2, dim_head=16, causal=True)(torch.randn(1, 5, 32), state="cache"),
                 TypeError, r"state: expected a KVCache, got str", id="softmax-state-wrong-type"),
    pytest.param(lambda: small()(torch.randn(1, 5, 32), key_padding_mask=torch.ones(1, 5, dtype=torch.long)),
                 TypeError, r"key_padding_mask: expected dtype torch\.bool", id="integer-key_padding_mask"),
    pytest.param(lambda: SoftmaxAttention(32, heads=2, dim_head=16)(torch.randn(1, 5, 32), positions=torch.arange(4)),
                 ValueError, r"positions: expected shape \(5,\) or \(1, 5\) to match the sequence length",
                 id="positions-too-short"),
])
def test_invalid_arguments_name_the_argument_and_what_was_expected(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------- context extension
def test_dim_head_defaults_to_dim_over_heads_in_both_layers():
    assert LinearRotaryAttention(48, heads=3).dim_head == 16 == SoftmaxAttention(48, heads=3).dim_head
    for cls in (LinearRotaryAttention, SoftmaxAttention):
        with pytest.raises(ValueError, match=r"dim_head: expected an integer when dim \(50\) is not a multiple of "
                                             r"heads \(3\), got None"):
            cls(50, heads=3)


def test_softmax_layer_with_yarn_equals_the_explicit_computation():
    """q and k scaled by YaRN's attention factor, rotated with YaRN's frequencies, then softmax (float64)."""
    torch.manual_seed(0)
    attn = SoftmaxAttention(32, heads=2, causal=True, rope_scale=4.0, rope_scaling="yarn",
                            rope_original_length=16).double()
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    q, k, v = attn.to_qkv(x).view(1, 40, 3, 2, 16).permute(2, 0, 3, 1, 4)
    f = 0.1 * math.log(4.0) + 1
    theta = attn.rotary.frequencies()
    ang = torch.arange(40, dtype=torch.float64)[:, None] * theta
    def rot(t):  # interleaved pairs (2i, 2i+1) turned by the angles, written out
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1).flatten(-2)
    s = rot(f * q) @ rot(f * k).transpose(-1, -2) / 4.0
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.to_out((s.softmax(-1) @ v).transpose(1, 2).reshape(1, 40, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs", [dict(rope_scale=4.0, rope_scaling="ntk"),
                                    dict(rope_scale=4.0, rope_scaling="yarn", rope_original_length=16),
                                    dict(rotary_fraction=0.5)], ids=["ntk", "yarn", "partial"])
def test_eq19_with_context_extension_stays_exactly_relative(kwargs):
    """Whatever the frequencies, rotating the features keeps eq. 19 a function of relative positions only:
    the same input at positions shifted by 1000 gives the same output (the layer scales q, k by YaRN's factor)."""
    torch.manual_seed(1)
    attn = layer(causal=True, **kwargs)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), attn(x, positions=1000), rtol=1e-9, atol=1e-10)
    if kwargs.get("rope_scaling") == "yarn":
        assert attn.rotary.attention_factor > 1


CAUSAL_LAYERS = [("linear", "features"), ("linear", "inputs"), ("softmax", "inputs")]


def causal_layer(kind, rope):
    return (layer(causal=True, rope=rope) if kind == "linear"
            else SoftmaxAttention(32, heads=2, causal=True, rope=rope).double())


@pytest.mark.parametrize("kind, rope", CAUSAL_LAYERS)
def test_layers_take_positions_per_example(kind, rope):
    torch.manual_seed(2)
    attn = causal_layer(kind, rope)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.stack((torch.arange(9), torch.arange(9) + 40))
    both = attn(x, positions=pos)
    alone = torch.cat([attn(x[i:i + 1], positions=pos[i]) for i in range(2)])
    torch.testing.assert_close(both, alone, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- cross-attention
@pytest.mark.parametrize("rope", ["features", "inputs", None])
def test_linear_layer_cross_attention_equals_the_explicit_computation(rope):
    """q from x, k and v from the context with the same projection weights; queries at ``positions``, keys at
    ``context_positions``; equal to linrope.reference on the projected features (float64)."""
    from linrope.features import favor_plus
    from linrope.reference import linear_attention_naive
    torch.manual_seed(3)
    attn = layer(causal=False, rope=rope)
    x, ctx = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 14, 32, dtype=torch.float64)
    cmask = torch.rand(2, 14) > 0.2
    got = attn(x, positions=50, context=ctx, context_mask=cmask, context_positions=torch.arange(14) * 3)
    W = attn.to_qkv.weight
    q = (x @ W[:32].t()).view(2, 9, 2, 16).transpose(1, 2)
    k = (ctx @ W[32:64].t()).view(2, 14, 2, 16).transpose(1, 2)
    v = (ctx @ W[64:].t()).view(2, 14, 2, 16).transpose(1, 2)
    kpos = torch.arange(14) * 3
    if rope == "inputs":
        q, k = attn.rotary.rotate(q, 50), attn.rotary.rotate(k, kpos)
    qf, _ = favor_plus(q, attn.feature_map.projection.double(), is_query=True)
    kf, ks = favor_plus(k, attn.feature_map.projection.double(), is_query=False)
    out = linear_attention_naive(qf, kf, v, rotary=attn.rotary if rope == "features" else None, positions=50,
                                 key_positions=kpos, key_padding_mask=cmask, k_logscale=ks)
    ref = attn.to_out(out.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def test_softmax_layer_cross_attention_equals_the_explicit_computation():
    torch.manual_seed(4)
    attn = SoftmaxAttention(32, heads=2).double()
    x, ctx = torch.randn(1, 6, 32, dtype=torch.float64), torch.randn(1, 11, 32, dtype=torch.float64)
    got = attn(x, context=ctx, positions=7)
    W = attn.to_qkv.weight
    q = attn.rotary.rotate((x @ W[:32].t()).view(1, 6, 2, 16).transpose(1, 2), 7)
    k = attn.rotary.rotate((ctx @ W[32:64].t()).view(1, 11, 2, 16).transpose(1, 2), 0)
    v = (ctx @ W[64:].t()).view(1, 11, 2, 16).transpose(1, 2)
    ref = attn.to_out(((q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, call, phrase", [
    pytest.param(lambda: layer(causal=True), dict(context=torch.randn(1, 4, 32, dtype=torch.float64)),
                 r"context: expected None for a layer built with causal=True", id="causal-layer"),
    pytest.param(lambda: layer(), dict(context=torch.randn(1, 4, 31, dtype=torch.float64)),
                 r"context: expected shape \(B, M, 32\) with B = 1 like x", id="context-width"),
    pytest.param(lambda: layer(), dict(context=torch.randn(1, 4, 32, dtype=torch.float64),
                                       key_padding_mask=torch.ones(1, 5, dtype=torch.bool)),
                 r"key_padding_mask: expected None with a context", id="self-mask-with-context"),
    pytest.param(lambda: SoftmaxAttention(32, heads=2).double(), dict(context_mask=torch.ones(1, 4, dtype=torch.bool)),
                 r"context_mask: expected None without a context", id="context-mask-alone"),
])
def test_cross_attention_arguments_are_checked(make, call, phrase):
    with pytest.raises(ValueError, match=phrase):
        make()(torch.randn(1, 5, 32, dtype=torch.float64), **call)


# ---------------------------------------------------------------------------------------------- grouped-query attention
def _repeated(gqa, full):
    """Load into ``full`` (kv_heads = heads) the weights of ``gqa`` with each kv head repeated for its group."""
    H, Hkv, d = gqa.heads, gqa.kv_heads, gqa.dim_head
    W = gqa.to_qkv.weight
    Wq, Wk, Wv = W[:H * d], W[H * d:(H + Hkv) * d], W[(H + Hkv) * d:]
    rep = lambda w: w.view(Hkv, d, -1).repeat_interleave(H // Hkv, 0).reshape(H * d, -1)  # noqa: E731
    state = dict(gqa.state_dict(), **{"to_qkv.weight": torch.cat((Wq, rep(Wk), rep(Wv)))})
    full.load_state_dict(state)
    return full


@pytest.mark.parametrize("kind, rope", [("linear", "features"), ("linear", "inputs"), ("linear", None),
                                        ("softmax", "inputs")])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_grouped_query_attention_equals_the_explicit_repeat(kind, rope, causal):
    torch.manual_seed(5)
    make = ((lambda kv: LinearRotaryAttention(32, heads=4, nb_features=16, causal=causal, rope=rope, seed=1,
                                              kv_heads=kv))
            if kind == "linear" else (lambda kv: SoftmaxAttention(32, heads=4, causal=causal, kv_heads=kv)))
    gqa = make(2).double()
    full = _repeated(gqa, make(4).double())
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), full(x), rtol=1e-10, atol=1e-12)
    if causal:  # decoding keeps kv_heads in the state, and equals the full pass token by token
        state, outs = None, []
        for t in range(13):
            o, state = gqa(x[:, t:t + 1], state=state, return_state=True)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), gqa(x), rtol=1e-9, atol=1e-11)
        held = state.numerator if kind == "linear" else state.k
        assert held.shape[1] == 2


@pytest.mark.parametrize("decay, held", [("multiscale", 4), ((0.8, 0.9, 0.95, 0.99), 4), ((0.9, 0.9, 0.8, 0.8), 2),
                                         (0.9, 2)])
def test_grouped_query_decoding_with_per_head_decays(decay, held):
    """Heads of a kv group that decay differently sum the same keys differently: the decoding state keeps one head
    per query head then (it used to keep one per kv group, and decoding drifted from the full pass by 1e-2)."""
    torch.manual_seed(6)
    make = lambda kv: LinearRotaryAttention(32, heads=4, nb_features=16, causal=True, seed=1,  # noqa: E731
                                            kv_heads=kv, decay=decay)
    gqa = make(2).double()
    full = _repeated(gqa, make(4).double())
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), full(x), rtol=1e-10, atol=1e-12)
    assert gqa.state_group == 4 // held
    state, outs = None, []
    for a, b in ((0, 5), (5, 6), (6, 13)):
        o, state = gqa(x[:, a:b], state=state, return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full(x), rtol=1e-9, atol=1e-11)
    assert state.numerator.shape[1] == held


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"kv_heads: expected a divisor of heads \(4\), got 3"):
        LinearRotaryAttention(32, heads=4, kv_heads=3)


@pytest.mark.parametrize("kind, rope", CAUSAL_LAYERS)
def test_layers_run_packed_documents_as_if_alone(kind, rope):
    torch.manual_seed(7)
    attn = causal_layer(kind, rope)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    cuts = [0, 6, 13, 20]
    packed = attn(x, cu_seqlens=torch.tensor(cuts))
    alone = torch.cat([attn(x[:, a:b]) for a, b in zip(cuts, cuts[1:])], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- any options, any pieces
@settings(max_examples=60, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]),
       feature_map=st.sampled_from(MAPS), rope=st.sampled_from(ROPES),
       options=st.sampled_from(["plain", "decay", "multiscale", "learned", "learned+multiscale", "rotate_normalizer",
                                "gate", "selective+gate"]),
       pieces=st.lists(st.integers(1, 9), min_size=1, max_size=5), mask=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_decoding_in_any_pieces_equals_its_full_pass(heads_kv, feature_map, rope, options, pieces, mask, seed):
    """Every causal option combined (grouped heads, decays, learned rotations, feature maps, masks): the state
    carried across calls of any sizes gives the full pass's outputs, float64. (Found by a differential fuzz of the
    layer: kv groups whose heads decay differently had their states merged.)"""
    heads, kv = heads_kv
    kw = dict(dim=8 * heads, heads=heads, dim_head=8, nb_features=16, causal=True, feature_map=feature_map,
              rope=rope, kv_heads=kv, seed=seed % 97, chunk_size=4, group_size=8)
    if options in ("decay", "multiscale", "learned+multiscale"):
        kw["decay"] = 0.9 if options == "decay" else "multiscale"
    if "learned" in options or options == "rotate_normalizer":  # options of eq. 19 on FAVOR+ features only
        kw.update(rope="features", feature_map="favor+")
        kw["rope_learned"] = "learned" in options
    kw["gate"] = "gate" in options
    if "selective" in options:  # the clock turns learned rotations of the features
        kw.update(rope="features", selective=True)
    torch.manual_seed(seed)
    # the experiments' rotated-normalizer ablation: the layer with its own attend()
    cls = RotatedNormalizerAttention if options == "rotate_normalizer" else LinearRotaryAttention
    attn = cls(**kw).double()
    n = sum(pieces)
    x = torch.randn(2, n, 8 * heads, dtype=torch.float64)
    m = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) > 0.3 if mask else None
    full = attn(x, key_padding_mask=m)
    state, outs, a = None, [], 0
    for p in pieces:
        o, state = attn(x[:, a:a + p], key_padding_mask=None if m is None else m[:, a:a + p], state=state,
                        return_state=True)
        outs.append(o)
        a += p
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-11)
    assert state.numerator.shape[1] == heads // attn.state_group
