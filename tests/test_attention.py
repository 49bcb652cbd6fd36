import pytest
import torch

from linrope import LinearRotaryAttention, SoftmaxAttention

MAPS = ["favor+", "trig", "relu", "elu"]
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


def test_state_dict_round_trip_reproduces_outputs_exactly():
    a = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, causal=True)
    b = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, causal=True, seed=123)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 50, 32)
    assert torch.equal(a(x), b(x))


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


def test_rotated_normalizer_ablation_runs_and_differs():
    kw = dict(causal=True, seed=0)
    torch.manual_seed(0)
    a = layer(**kw)
    torch.manual_seed(0)
    b = layer(rotate_normalizer=True, **kw)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    assert (a(x) - b(x)).abs().max() > 1e-3


def test_redraw_interval_applies_in_training_only():
    attn = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, redraw_interval=2)
    p0 = attn.feature_map.projection.clone()
    x = torch.randn(1, 8, 32)
    attn.eval()
    attn(x), attn(x)
    assert torch.equal(p0, attn.feature_map.projection)
    attn.train()
    attn(x), attn(x)
    assert not torch.equal(p0, attn.feature_map.projection)


def test_half_precision_layer():
    attn = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32, causal=True).to(torch.bfloat16)
    y = attn(torch.randn(2, 300, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("bad, match", [
    (lambda: LinearRotaryAttention(32, feature_map="cosformer"), "feature_map"),
    (lambda: LinearRotaryAttention(32, rope="alibi"), "rope"),
    (lambda: LinearRotaryAttention(32, nb_features=31), "nb_features"),
    (lambda: LinearRotaryAttention(32, dim_head=15, rope="inputs"), "dim_head"),
    (lambda: LinearRotaryAttention(32, heads=0), "heads"),
    (lambda: LinearRotaryAttention(32, rope="inputs", rotate_normalizer=True), "rotate_normalizer"),
    (lambda: SoftmaxAttention(32, rope="features"), "rope"),
    (lambda: LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32)(torch.randn(1, 5, 31)), "x"),
    (lambda: LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32)(torch.randn(1, 5, 32),
                                                                              return_state=True), "state"),
    (lambda: LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=32)(
        torch.randn(1, 5, 32), key_padding_mask=torch.ones(1, 5, dtype=torch.long)), "key_padding_mask"),
    (lambda: SoftmaxAttention(32, heads=2, dim_head=16)(torch.randn(1, 5, 32), positions=torch.arange(4)),
     "positions"),
])
def test_invalid_arguments_name_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
