"""The attention layers inside the PyTorch machinery users wrap them in: activation checkpointing, autocast,
``torch.compile``, state dicts, ``.to(float64)``, and decoding far from position 0.

DDP is covered by ``tests/test_training.py::test_ddp_two_cpu_ranks_keep_parameters_and_feature_projections_...``:
the linear-rope model (these layers) trains on two gloo ranks with redraws every 2 optimizer steps, and the ranks'
parameters and projections stay identical.
"""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from linrope import LinearRotaryAttention, SoftmaxAttention, redraw_projections
from linrope.features import favor_plus

DIM, HEADS, DIM_HEAD, R = 16, 2, 8, 16


def linear(**kw):
    return LinearRotaryAttention(DIM, heads=HEADS, dim_head=DIM_HEAD, nb_features=R, **kw)


def softmax(**kw):
    return SoftmaxAttention(DIM, heads=HEADS, dim_head=DIM_HEAD, **kw)


def max_rel_error(got, ref):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max()).item()


def explicit_rotations(positions, dim, base=10000.0):
    """R_m (len(positions), dim, dim) in float64: pair (2i, 2i+1) turned by m * base ** (-2i/dim), angles from
    Python floats (no table, no library code)."""
    rot = torch.zeros(len(positions), dim, dim, dtype=torch.float64)
    for row, m in enumerate(positions):
        for i in range(dim // 2):
            c, s = math.cos(m * base ** (-2 * i / dim)), math.sin(m * base ** (-2 * i / dim))
            rot[row, 2 * i, 2 * i], rot[row, 2 * i, 2 * i + 1] = c, -s
            rot[row, 2 * i + 1, 2 * i], rot[row, 2 * i + 1, 2 * i + 1] = s, c
    return rot


def reference_linear_layer(layer, x, positions):
    """``LinearRotaryAttention`` (favor+, rope='features', interleaved, no qkv bias) by hand in float64: RoFormer
    eq. 19, out_m = sum_n (R_m phi(q_m)).(R_n phi(k_n)) v_n / sum_n phi(q_m).phi(k_n) over n (n <= m if causal),
    with phi the FAVOR+ features of ``favor_plus``. x (B, N, dim) -> (B, N, dim)."""
    B, N, _ = x.shape
    qkv = x.double() @ layer.to_qkv.weight.double().t()
    q, k, v = qkv.view(B, N, 3, HEADS, DIM_HEAD).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    W = layer.feature_map.projection.double()
    qf, _ = favor_plus(q, W, is_query=True)  # its per-row factor cancels between numerator and normalizer
    kf, log_scale = favor_plus(k, W, is_query=False)
    kf = kf * torch.exp(log_scale)[..., None]
    rot = explicit_rotations(positions, R)
    rq, rk = torch.einsum("nij,bhnj->bhni", rot, qf), torch.einsum("nij,bhnj->bhni", rot, kf)
    num, den = rq @ rk.transpose(-1, -2), qf @ kf.transpose(-1, -2)  # (B, H, N, N)
    if layer.causal:
        keep = torch.ones(N, N, dtype=torch.bool).tril()
        num, den = num * keep, den * keep
    out = (num @ v) / den.sum(-1, keepdim=True)
    out = out.permute(0, 2, 1, 3).reshape(B, N, HEADS * DIM_HEAD)
    return out @ layer.to_out.weight.double().t() + layer.to_out.bias.double()


def forward_backward(layer, x, grad, call=None):
    """Output, input gradient and parameter gradients of sum(call(x) * grad)."""
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = (layer if call is None else call)(x)
    (y.float() * grad).sum().backward()
    return y.detach(), x.grad, [p.grad for p in layer.parameters()]


# ---------------------------------------------------------------------------------------------- checkpointing
# the research's recommended configuration: learned rotations, a forget gate, grouped kv heads
RECOMMENDED = dict(causal=True, rope_learned=True, gate=True, kv_heads=1)


@pytest.mark.parametrize("feature_map, extra", [("favor+", {}), ("trig", {}), ("favor+", RECOMMENDED)],
                         ids=["favor+", "trig", "learned+gate+gqa"])
def test_checkpointed_training_step_gives_the_same_output_and_gradients(feature_map, extra):
    # a redraw every optimizer step: a forward that redrew would recompute with other features in the backward
    layer = linear(**{"causal": True, **extra}, feature_map=feature_map, redraw_interval=1).train()
    x, grad = torch.randn(2, 20, DIM), torch.randn(2, 20, DIM)
    for step in (1, 2):
        plain = forward_backward(layer, x, grad)
        ckpt = forward_backward(layer, x, grad, lambda t: checkpoint(layer, t, use_reentrant=False))
        assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[1], ckpt[1])
        for (name, _), a, b in zip(layer.named_parameters(), plain[2], ckpt[2]):
            assert torch.equal(a, b), f"step {step}: gradient of {name} differs under checkpoint"
        assert redraw_projections(layer, step) == 1  # between optimizer steps, as a training loop does


@pytest.mark.parametrize("make", [
    pytest.param(lambda: linear(causal=True, redraw_interval=1), id="linear-favor+"),
    pytest.param(lambda: linear(causal=True, feature_map="relu", rope="inputs", redraw_interval=1), id="linear-relu"),
    pytest.param(lambda: linear(causal=True, feature_map="elu", rope=None), id="linear-elu"),
    pytest.param(lambda: softmax(causal=True), id="softmax"),
])
def test_training_forward_and_backward_leave_every_parameter_and_buffer_unchanged(make):
    layer = make().train()
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    x = torch.randn(2, 10, DIM)
    for _ in range(3):
        forward_backward(layer, x, torch.ones(2, 10, DIM))
        layer(x[:, :4], return_state=True)
    after = layer.state_dict()
    assert list(after) == list(before)
    for name, t in before.items():
        assert torch.equal(t, after[name]), f"forward changed {name}"


# ---------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("make", [pytest.param(lambda: linear(causal=True), id="linear"),
                                  pytest.param(lambda: linear(**RECOMMENDED), id="learned+gate+gqa"),
                                  pytest.param(lambda: softmax(causal=True), id="softmax")])
def test_bfloat16_autocast_forward_and_backward_track_float32(make):
    layer = make()
    x, grad = torch.randn(2, 40, DIM), torch.randn(2, 40, DIM)
    ref = forward_backward(layer, x, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, gx, gp = forward_backward(layer, x, grad)
    assert y.dtype == torch.bfloat16  # what nn.Linear gives under autocast: the layer ends with one
    assert gx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gp)
    # bfloat16 keeps 8 bits: the q/k/v and output projections alone move results by a few 1e-3
    assert max_rel_error(y, ref[0]) < 3e-2
    assert max_rel_error(gx, ref[1]) < 3e-2
    for (name, _), g, g_ref in zip(layer.named_parameters(), gp, ref[2]):
        assert max_rel_error(g, g_ref) < 3e-2, name


# ---------------------------------------------------------------------------------------------- torch.compile
# The linear layer's engine runs eagerly (a graph break, by design); the softmax layer, RoPE tables included,
# must compile into one graph.
@pytest.mark.parametrize("make, fullgraph", [pytest.param(lambda: linear(causal=True), False, id="linear"),
                                             pytest.param(lambda: linear(**RECOMMENDED), False,
                                                          id="learned+gate+gqa"),
                                             pytest.param(lambda: softmax(causal=True), True, id="softmax")])
def test_compiled_layer_matches_eager_forward_and_backward(make, fullgraph):
    layer = make()
    compiled = torch.compile(layer, dynamic=False, fullgraph=fullgraph)
    x, grad = torch.randn(2, 12, DIM), torch.randn(2, 12, DIM)
    eager, comp = forward_backward(layer, x, grad), forward_backward(layer, x, grad, compiled)
    assert max_rel_error(comp[0], eager[0]) < 1e-5 and max_rel_error(comp[1], eager[1]) < 1e-5
    for (name, _), a, b in zip(layer.named_parameters(), comp[2], eager[2]):
        assert max_rel_error(a, b) < 1e-5, name
    if isinstance(layer, LinearRotaryAttention):  # the compiled layer reads the projection, it did not bake it in
        layer.feature_map.redraw()
        with torch.no_grad():
            redrawn = compiled(x)
            assert max_rel_error(redrawn, layer(x)) < 1e-5 and max_rel_error(redrawn, eager[0]) > 1e-3


# ---------------------------------------------------------------------------------------------- state and dtype
@pytest.mark.parametrize("make", [pytest.param(lambda seed: linear(causal=True, seed=seed, redraw_interval=2),
                                               id="linear"),
                                  pytest.param(lambda seed: linear(feature_map="trig", seed=seed), id="linear-trig"),
                                  pytest.param(lambda seed: softmax(), id="softmax")])
def test_state_dict_round_trip_into_a_fresh_layer_gives_the_same_output(make):
    a = make(1)
    redraw_projections(a, 2)
    b = make(2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 15, DIM)
    assert torch.equal(a(x), b(x))


def test_state_dicts_saved_with_the_old_forward_counter_load_into_the_layer():
    a = linear(causal=True, seed=1, redraw_interval=2)
    redraw_projections(a, 2)
    old = dict(a.state_dict(), **{"feature_map.steps": torch.tensor(4)})
    b = linear(causal=True, seed=2, redraw_interval=2)
    b.load_state_dict(old)  # strict
    x = torch.randn(1, 9, DIM)
    assert torch.equal(a(x), b(x)) and int(b.feature_map.redraws) == 1


@pytest.mark.parametrize("causal", [True, False])
def test_float64_layer_matches_eq19_computed_by_hand(causal):
    layer = linear(causal=causal).to(torch.float64)
    assert layer.feature_map.projection.dtype == torch.float64 and layer.to_qkv.weight.dtype == torch.float64
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64
    assert max_rel_error(out, reference_linear_layer(layer, x, range(12))) < 1e-10
    assert max_rel_error(layer(x, positions=40), reference_linear_layer(layer, x, range(40, 52))) < 1e-10


# ---------------------------------------------------------------------------------------------- far positions
def test_decoding_near_position_one_million_is_exact_and_keeps_the_rotary_cache_bounded():
    layer = linear(causal=True)
    rotary = layer.rotary
    bound = rotary.max_cached * (R // 2) * 4 * 2  # float32 cos and sin tables of at most max_cached rows
    x = torch.randn(1, 6, DIM)
    start = 10**6 - 3
    with torch.no_grad():
        outs, state = [], None
        for t in range(6):
            out, state = layer(x[:, t:t + 1], positions=start + t, state=state, return_state=True)
            outs.append(out)
            assert rotary.cache_nbytes() <= bound
        decoded = torch.cat(outs, 1)
        assert max_rel_error(decoded, layer(x, positions=start)) < 1e-5  # one pass agrees with decoding
        nbytes = rotary.cache_nbytes()
        for t in range(4):  # ten times further: no table grows with the position
            layer(x[:, :1], positions=10**7 + t)
        assert rotary.cache_nbytes() == nbytes <= bound
    # float32 angles would be off by up to 0.03 rad here, moving the output by about a percent
    assert max_rel_error(decoded, reference_linear_layer(layer, x, range(start, start + 6))) < 2e-5
    cos, sin = rotary.cos_sin(start, 6, "cpu", torch.float32)
    rot = explicit_rotations(range(start, start + 6), R)
    # a float32 value in [-1, 1] is within 2**-25 of the float64 it rounds
    assert (cos.double() - rot[:, 0::2, 0::2].diagonal(dim1=1, dim2=2)).abs().max() <= 2.0**-25 + 1e-9
    assert (sin.double() - rot[:, 1::2, 0::2].diagonal(dim1=1, dim2=2)).abs().max() <= 2.0**-25 + 1e-9
