"""What a fuzz of the public API found, held: non-finite inputs reach only the rows that see them, padded slots
contribute nothing whatever they hold, packed lengths are checked against the whole N, empty batches, heads and
sequences give empty outputs, and states and caches refuse a configuration they were not made with."""

import math

import pytest
import torch

from linrope import (LinearRotaryAttention, RotaryEmbedding, SoftmaxAttention, favor_attention, linear_attention,
                     softmax_attention)

# every test twice: the torch engine, and the compiled causal pass where it covers the call (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_kernel")

F64 = torch.float64


def attend(kind, q, k, v, **kw):
    """One of the three attention functions on raw q, k, v (features for linear_attention: exp of a projection)."""
    if kind == "favor":
        W = torch.randn(16, q.shape[-1], generator=torch.Generator().manual_seed(1), dtype=q.dtype)
        return favor_attention(q, k, v, W, rotary=RotaryEmbedding(16), **kw)
    if kind == "linear":
        W = torch.randn(16, q.shape[-1], generator=torch.Generator().manual_seed(1), dtype=q.dtype) * 0.3
        return linear_attention((q @ W.T).exp(), (k @ W.T).exp(), v, rotary=RotaryEmbedding(16), **kw)
    return softmax_attention(q, k, v, rotary=RotaryEmbedding(q.shape[-1]), **kw)


def inputs(B=2, H=2, N=150, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=gen) for _ in range(3)]


# ---------------------------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("kind", ["favor", "linear", "softmax"])
@pytest.mark.parametrize("where, value", [("k", math.nan), ("v", math.nan), ("k", math.inf), ("v", -math.inf)])
@pytest.mark.parametrize("p", [0, 63, 64, 100, 149])
def test_a_non_finite_key_or_value_reaches_only_the_causal_rows_after_it(kind, where, value, p):
    """A NaN or inf key/value at position p of one (batch, head): causal rows before p are what they are without
    it (the engine's chunk products would spread 0 * nan to the whole chunk), rows from p on are not finite, and
    every other (batch, head) is untouched."""
    q, k, v = inputs()
    clean = attend(kind, q, k, v, causal=True)
    (k if where == "k" else v)[0, 1, p, 3] = value
    got = attend(kind, q, k, v, causal=True)
    assert torch.equal(got[1], clean[1]) and torch.equal(got[0, 0], clean[0, 0])
    torch.testing.assert_close(got[0, 1, :p], clean[0, 1, :p], rtol=1e-5, atol=1e-6)
    if not (where == "k" and value == math.inf):  # an inf key may weigh 0 exactly (softmax: q . k = -inf)
        assert not torch.isfinite(got[0, 1, p:]).any(-1).any(), "a row that sees a non-finite value came out finite"


@pytest.mark.parametrize("kind", ["favor", "linear", "softmax"])
def test_a_non_finite_value_spoils_its_own_head_only_bidirectionally(kind):
    q, k, v = inputs(N=70)
    clean = attend(kind, q, k, v, causal=False)
    v[1, 0, 33, 0] = math.nan
    got = attend(kind, q, k, v, causal=False)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1, 1], clean[1, 1])
    assert not torch.isfinite(got[1, 0]).all(-1).any()


def test_a_nan_token_in_the_layer_reaches_its_own_and_later_positions_only():
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=2, causal=True)
    x = torch.randn(2, 64, 32)
    clean = layer(x)
    x[0, 5] = math.nan
    got = layer(x)
    assert torch.equal(got[1], clean[1])
    torch.testing.assert_close(got[0, :5], clean[0, :5])
    assert not torch.isfinite(got[0, 5:]).all(-1).any()


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", ["favor", "linear", "softmax"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padded_slots_contribute_nothing_whatever_they_hold(kind, causal):
    """Garbage under the mask (NaN, inf, huge) in keys and values gives the output of zeros there."""
    q, k, v = inputs(N=90)
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[0, 10:14] = False
    mask[1, 60:] = False
    zk, zv = k.masked_fill(~mask[:, None, :, None], 0), v.masked_fill(~mask[:, None, :, None], 0)
    clean = attend(kind, q, zk, zv, causal=causal, key_padding_mask=mask)
    k[0, :, 10], v[0, :, 11], v[0, 1, 12, 2], k[1, 0, 70] = math.nan, math.inf, -math.inf, 1e30
    v[1, :, 60:] = math.nan
    got = attend(kind, q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean)


def test_padded_values_in_the_layers_contribute_nothing():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 32)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    for layer in (LinearRotaryAttention(32, heads=2, causal=False), SoftmaxAttention(32, heads=2, causal=False)):
        clean = layer(x.masked_fill(~mask[..., None], 0), key_padding_mask=mask)
        dirty = x.clone()
        dirty[1, 25:] = math.nan
        got = layer(dirty, key_padding_mask=mask)  # a padded row's own query is garbage: only kept rows count
        torch.testing.assert_close(got[mask], clean[mask])


# ---------------------------------------------------------------------------------------------- packed lengths
@pytest.mark.parametrize("what", ["positions-long", "positions-short", "mask-long", "mask-short"])
def test_packed_documents_check_positions_and_masks_against_the_whole_row(what):
    """A positions or mask tensor of the wrong length was cut per document (too long) or refused with a
    document's length (too short); both now name the row's N."""
    q, k, v = inputs(B=1, H=2, N=12)
    cu = torch.tensor([0, 5, 12])
    n = 15 if what.endswith("long") else 9
    kw = dict(positions=torch.arange(n)) if what.startswith("positions") else \
        dict(key_padding_mask=torch.ones(1, n, dtype=torch.bool))
    name = "positions" if what.startswith("positions") else "key_padding_mask"
    for kind in ("favor", "linear", "softmax"):
        with pytest.raises(ValueError, match=rf"{name}: expected shape .*12"):
            attend(kind, q, k, v, causal=True, cu_seqlens=cu, **kw)
    with pytest.raises(ValueError, match=rf"{name}: expected shape .*12"):
        LinearRotaryAttention(16, heads=2, causal=True)(torch.randn(1, 12, 16), cu_seqlens=cu, **kw)


# ---------------------------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("kind", ["favor", "linear", "softmax"])
@pytest.mark.parametrize("shape", [(0, 2, 5), (2, 0, 5), (2, 2, 0)], ids=["B=0", "H=0", "N=0"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_empty_batches_heads_and_sequences_give_empty_outputs(kind, shape, causal):
    q, k, v = (torch.randn(*shape, 8) for _ in range(3))
    out = attend(kind, q, k, v, causal=causal)
    assert out.shape == (*shape, 8)


def test_an_empty_piece_leaves_a_decoding_state_as_it_was():
    q, k, v = inputs(B=1, N=6)
    W = torch.randn(16, 8)
    _, st = favor_attention(q, k, v, W, causal=True, return_state=True)
    out, st2 = favor_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], W, causal=True, initial_state=st,
                               return_state=True)
    assert out.shape == (1, 2, 0, 8) and st2.offset == 6 and torch.equal(st2.numerator, st.numerator)
    layer = LinearRotaryAttention(16, heads=2, causal=True)
    y, s = layer(torch.randn(2, 0, 16), return_state=True)
    assert y.shape == (2, 0, 16) and s.offset == 0
    assert SoftmaxAttention(16, heads=2, causal=True)(torch.randn(2, 0, 16)).shape == (2, 0, 16)


@pytest.mark.parametrize("call, match", [
    (lambda: favor_attention(*inputs(N=4), torch.randn(0, 8)), r"projection: expected at least one row"),
    (lambda: linear_attention(torch.rand(1, 2, 4, 0), torch.rand(1, 2, 4, 0), torch.randn(1, 2, 4, 3)),
     r"qf: expected at least one feature"),
    (lambda: favor_attention(torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 3),
                             torch.randn(8, 0)), r"q: expected a head dim d >= 1"),
    (lambda: favor_attention(*inputs(N=4)[:2], torch.randn(2, 2, 4, 0), torch.randn(8, 8)),
     r"v: expected a value dim dv >= 1"),
], ids=["r=0", "features r=0", "d=0", "dv=0"])
def test_sizes_that_cannot_be_zero_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- states, caches
def test_a_state_refuses_a_call_with_another_configuration():
    q, k, v = inputs(B=1, N=6)
    W = torch.randn(16, 8)
    rot = RotaryEmbedding(16)
    _, st = favor_attention(q, k, v, W, causal=True, rotary=rot, decay=0.9, return_state=True)
    step = (q[:, :, :1], k[:, :, :1], v[:, :, :1], W)
    favor_attention(*step, causal=True, rotary=rot, decay=0.9, initial_state=st)  # the same options: fine
    for kw, what in ((dict(rotary=rot), r"decay=\(0\.9, 0\.9\).*decay=None"),
                     (dict(decay=0.9), r"RotaryEmbedding\(dim=16.*no rotary"),
                     (dict(rotary=RotaryEmbedding(16, base=500.0), decay=0.9), r"base=10000.*base=500"),
                     (dict(rotary=rot, decay=0.8), r"decay=\(0\.9, 0\.9\).*decay=\(0\.8, 0\.8\)")):
        with pytest.raises(ValueError, match=rf"initial_state: made by a call with .*{what}"):
            favor_attention(*step, causal=True, initial_state=st, **kw)
    with pytest.raises(ValueError, match=r"initial_state: made by a call with favor_attention.* linear_attention"):
        linear_attention(q[:, :, :1].exp().repeat(1, 1, 1, 2), k[:, :, :1].exp().repeat(1, 1, 1, 2), v[:, :, :1],
                         causal=True, rotary=rot, decay=0.9, initial_state=st)
    with pytest.raises(ValueError, match=r"initial_state: its sums are torch\.float32, but this call computes in "
                                         r"torch\.float64"):
        favor_attention(*(t.double() for t in step), causal=True, rotary=rot, decay=0.9, initial_state=st)


def test_a_layer_state_refuses_a_layer_with_other_heads_or_batch():
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=4, causal=True)
    _, st = layer(torch.randn(2, 5, 32), return_state=True)
    with pytest.raises(ValueError, match=r"state: expected a decoding state of \(B, heads\) = \(3, 4\)"):
        layer(torch.randn(3, 1, 32), state=st)
    with pytest.raises(ValueError, match=r"state: expected a decoding state of \(B, heads\) = \(2, 2\)"):
        LinearRotaryAttention(32, heads=2, dim_head=16, causal=True)(torch.randn(2, 1, 32), state=st)


def test_a_kv_cache_refuses_a_layer_with_other_heads_or_batch():
    torch.manual_seed(0)
    layer = SoftmaxAttention(32, heads=4, causal=True)
    _, cache = layer(torch.randn(2, 5, 32), return_state=True)
    for other, x in ((SoftmaxAttention(32, heads=2, causal=True), torch.randn(2, 1, 32)),
                     (layer, torch.randn(3, 1, 32))):
        with pytest.raises(ValueError, match=r"state: a KVCache of keys \(B, kv_heads, T, dim_head\)"):
            other(x, state=cache)


@pytest.mark.parametrize("decay", [True, False])
def test_a_bool_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay: .*a bool is not a rate"):
        LinearRotaryAttention(32, heads=2, causal=True, decay=decay)


def test_a_state_dict_of_another_configuration_is_refused():
    base = LinearRotaryAttention(32, heads=2, causal=True, seed=0)
    for other, what in ((LinearRotaryAttention(32, heads=2, causal=True, feature_map="trig", seed=0), "feature_map"),
                        (LinearRotaryAttention(32, heads=2, causal=True, decay=0.9, seed=0), "decay"),
                        (LinearRotaryAttention(32, heads=2, causal=True, rope="inputs", seed=0), "rope")):
        with pytest.raises(ValueError, match=rf"state_dict: saved from a LinearRotaryAttention with another "
                                             rf"configuration: {what}="):
            other.load_state_dict(base.state_dict())
    twin = LinearRotaryAttention(32, heads=2, causal=True, seed=1)
    twin.load_state_dict(base.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in base.state_dict().values())  # safetensors-friendly


def test_bad_scaling_bases_positions_and_seeds_are_refused_by_name():
    from linrope import FavorPlus
    with pytest.raises(ValueError, match=r"dim: expected at least 4 with scaling='ntk'"):
        RotaryEmbedding(2, scaling="ntk")
    q, k, v = inputs(N=3)
    with pytest.raises(ValueError, match=r"positions: expected an offset p with \|p\| \+ N <= 2\*\*53"):
        favor_attention(q, k, v, torch.randn(16, 8), rotary=RotaryEmbedding(16), positions=2**63)
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*63\)"):
        FavorPlus(8, 16, seed=2**64)
