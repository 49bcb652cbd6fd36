"""What a fuzz of the public API found, held: non-finite inputs reach only the rows that see them, padded slots
contribute nothing whatever they hold, packed lengths are checked against the whole N, empty batches, heads and
sequences give empty outputs, and states and caches refuse a configuration they were not made with."""

import math

import pytest
import torch

from linrope import (AttentionState, LinearRotaryAttention, RotaryEmbedding, SoftmaxAttention, favor_attention,
                     linear_attention, softmax_attention)

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
