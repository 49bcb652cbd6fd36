"""Selective (data-dependent) rotation: ``clock=`` of ``linear_attention`` / ``favor_attention`` with a
``LearnedRotary`` (query pair i of head h at position n turns by theta_hi A_n + phase_hi, key pairs by theta_hi A_n,
A_n = sum_{t <= n} a_t per batch row and head, the normalizer unrotated) against float64 eq. 19 written out with
explicit rotation matrices: outputs and the gradients of q/k features, v, theta, phase and the clock, at large
clocks and large activations, in streaming and token-by-token decoding, with gates, GQA, and through the layer
(``LinearRotaryAttention(selective=True)``, its ``clock_proj`` included)."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from linrope import LearnedRotary, LinearRotaryAttention, RotaryEmbedding, favor_attention
from linrope import linear_attention
from linrope.features import gaussian_orthogonal_matrix
from reference import assert_close, eq19_weighted, favor_features, rotation_from_angles

F64 = torch.float64
B, H, R, DV, D = 2, 3, 8, 5, 6


def _learned(seed, r=R, heads=H, dtype=F64):
    rot = LearnedRotary(r, heads).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from RoPE's angles and phase 0, as after training
        rot.phase.copy_(torch.randn(heads, r // 2, generator=g, dtype=dtype))
        rot.theta.mul_(1 + 0.3 * torch.randn(heads, r // 2, generator=g, dtype=dtype))
    return rot


def _inputs(seed, N=23, tick=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    qf = torch.rand(B, H, N, R, generator=g, dtype=dtype) + 0.05
    kf = torch.rand(B, H, N, R, generator=g, dtype=dtype) + 0.05
    v = torch.randn(B, H, N, DV, generator=g, dtype=dtype)
    a = tick * (0.1 + 2 * torch.rand(B, H, N, generator=g, dtype=dtype))  # a_t > 0, varying per row and head
    return qf, kf, v, a


def selective_reference(qf, kf, v, a, theta, phase, A0=None, weights=None, mask=None):
    """eq. 19 in float64 with the clock written out: A = A0 + cumsum(a), R^q_n = R(theta A_n + phase),
    R^k_n = R(theta A_n) explicit (B, H, N, r, r) matrices, causal (``weights`` (.., N, N) replace the causal mask:
    gates times it)."""
    A = torch.cumsum(a.double(), -1)
    if A0 is not None:
        A = A + A0.double()[..., None]
    ang = A[..., None] * theta.double()[:, None, :]  # (B, H, N, r/2)
    Rq, Rk = rotation_from_angles(ang + phase.double()[:, None, :]), rotation_from_angles(ang)
    N = qf.shape[2]
    w = torch.ones(N, N, dtype=F64).tril() if weights is None else weights
    return eq19_weighted(qf, kf, v, Rq=Rq, Rk=Rk, weights=w, mask=mask)


def gate_weights(log_gates, N):
    """prod_{n < t <= m} g_t for n <= m, 0 above the diagonal (B, H, N, N), written out."""
    lg = log_gates.double()
    w = torch.zeros(*lg.shape[:2], N, N, dtype=F64)
    for m in range(N):
        for n in range(m + 1):
            w[..., m, n] = torch.exp(lg[..., n + 1:m + 1].sum(-1))
    return w


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("favor", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("tick", [1.0, 40.0])
def test_outputs_and_all_gradients_match_explicit_rotations(favor, mask, tick):
    seed = 3 + 2 * favor + mask
    qf, kf, v, a = _inputs(seed, tick=tick)
    N = qf.shape[2]
    rot = _learned(seed)
    keep = (torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) > 0.3) if mask else None
    if favor:  # raw q, k and a projection: the features inside, recomputed in the backward
        g = torch.Generator().manual_seed(seed + 9)
        q, k = torch.randn(B, H, N, D, generator=g, dtype=F64), torch.randn(B, H, N, D, generator=g, dtype=F64)
        W = gaussian_orthogonal_matrix(R, D, generator=g).to(F64)
        mine = [t.clone().requires_grad_() for t in (q, k, v, a)]
        out = favor_attention(mine[0], mine[1], mine[2], W, causal=True, rotary=rot, clock=mine[3],
                              key_padding_mask=keep, chunk_size=4, group_size=8)
        ref_t = [t.clone().requires_grad_() for t in (q, k, v, a)]
        qf_r, kf_r = favor_features(ref_t[0], W), favor_features(ref_t[1], W)
    else:
        mine = [t.clone().requires_grad_() for t in (qf, kf, v, a)]
        out = linear_attention(mine[0], mine[1], mine[2], causal=True, rotary=rot, clock=mine[3],
                               key_padding_mask=keep, chunk_size=4, group_size=8)
        ref_t = [t.clone().requires_grad_() for t in (qf, kf, v, a)]
        qf_r, kf_r = ref_t[0], ref_t[1]
    theta, phase = (p.detach().clone().requires_grad_() for p in (rot.theta, rot.phase))
    ref = selective_reference(qf_r, kf_r, ref_t[2], ref_t[3], theta, phase, mask=keep)
    _assert_same_grads(out, ref, mine + [rot.theta, rot.phase], ref_t + [theta, phase],
                       ("q", "k", "v", "clock", "theta", "phase"), rtol=1e-10, grad_rtol=1e-8, grad_atol=1e-11)


def _assert_same_grads(out, ref, mine, theirs, names, rtol, grad_rtol, grad_atol):
    """Outputs, then the gradients of one random projection of them, the fast path's against the reference's."""
    assert_close("out", ref, out, rtol=rtol, atol=1e-12)
    w = torch.randn_like(ref)
    for name, x, y in zip(names, _grads((ref * w).sum(), theirs), _grads((out * w).sum(), mine)):
        assert_close(f"d {name}", x, y, rtol=grad_rtol, atol=grad_atol)


def test_large_clocks_float64_gradients_and_float32_rows():
    """A up to ~1e5 (angles ~1e5 rad): float64 outputs and gradients hold to the reference (the clock enters as
    float64 angles, dtheta through the group's first clock value plus the advance within the group); float32 FAVOR+
    at std-5 activations holds every row to 1e-4 of the float64 reference (the distance-0 term is phase-only)."""
    N = 40
    qf, kf, v, a = _inputs(11, N=N, tick=2500.0)  # A_N ~ 1e5
    assert torch.cumsum(a, -1).max() > 5e4
    rot = _learned(11)
    mine = [t.clone().requires_grad_() for t in (qf, kf, v, a)]
    out = linear_attention(*mine[:3], causal=True, rotary=rot, clock=mine[3], chunk_size=8, group_size=16)
    ref_t = [t.clone().requires_grad_() for t in (qf, kf, v, a)]
    theta, phase = (p.detach().clone().requires_grad_() for p in (rot.theta, rot.phase))
    ref = selective_reference(*ref_t, theta, phase)
    _assert_same_grads(out, ref, mine + [rot.theta, rot.phase], ref_t + [theta, phase],
                       ("qf", "kf", "v", "clock", "theta", "phase"), rtol=1e-9, grad_rtol=1e-7, grad_atol=1e-10)

    g = torch.Generator().manual_seed(12)
    q, k = (5.0 * torch.randn(B, H, N, 16, generator=g) for _ in range(2))
    v32 = torch.randn(B, H, N, DV, generator=g)
    W = gaussian_orthogonal_matrix(32, 16, generator=g)
    rot32 = _learned(12, r=32, dtype=torch.float32)
    a32 = a.float()
    got32 = favor_attention(q, k, v32, W, causal=True, rotary=rot32, clock=a32)
    shift = favor_features(k, W).log().amax((-1, -2), keepdim=True)  # a factor common to all keys cancels
    ref32 = selective_reference(favor_features(q, W), favor_features(k, W, shift), v32, a32, rot32.theta, rot32.phase)
    rows = ((got32.double() - ref32).norm(dim=-1) / ref32.norm(dim=-1).clamp_min(1e-30)).max()
    assert rows < 1e-4, float(rows)


def test_streaming_equals_one_pass_outputs_and_gradients_through_the_state():
    qf, kf, v, a = _inputs(5, N=30)
    rot = _learned(5)
    full_t = [t.clone().requires_grad_() for t in (qf, kf, v, a)]
    full = linear_attention(*full_t[:3], causal=True, rotary=rot, clock=full_t[3], decay=0.95)
    parts_t = [t.clone().requires_grad_() for t in (qf, kf, v, a)]
    parts, state = [], None
    for lo, hi in ((0, 11), (11, 12), (12, 13), (13, 30)):  # a chunked call, single steps, a chunked call again
        out, state = linear_attention(*(t[:, :, lo:hi] for t in parts_t[:3]), causal=True, rotary=rot,
                                      clock=parts_t[3][:, :, lo:hi], decay=0.95, initial_state=state,
                                      return_state=True)
        assert state.clock.dtype == F64 and state.clock.shape == (B, H)
        parts.append(out)
    assert_close("streamed", full, torch.cat(parts, 2), rtol=1e-10, atol=1e-12)
    assert_close("state clock", torch.cumsum(a, -1)[..., -1], state.clock, rtol=1e-14, atol=0)
    w = torch.randn_like(full)
    for name, x, y in zip(("qf", "kf", "v", "clock"), _grads((full * w).sum(), full_t),
                          _grads((torch.cat(parts, 2) * w).sum(), parts_t)):
        assert_close(f"d {name}", x, y, rtol=1e-9, atol=1e-12)
    # map and detach carry the clock; the signature is that of a learned rotation
    assert state.detach().clock is not None and state.map(lambda t: t[:1]).clock.shape == (1, H)


def test_gates_and_clock_together_against_the_written_out_product():
    qf, kf, v, a = _inputs(7)
    N = qf.shape[2]
    lg = -0.3 * torch.rand(B, H, N, dtype=F64, generator=torch.Generator().manual_seed(8))
    rot = _learned(7)
    mine = [t.clone().requires_grad_() for t in (qf, kf, v, a, lg)]
    out = linear_attention(*mine[:3], causal=True, rotary=rot, clock=mine[3], log_gates=mine[4], chunk_size=4)
    ref_t = [t.clone().requires_grad_() for t in (qf, kf, v, a, lg)]
    theta, phase = (p.detach().clone().requires_grad_() for p in (rot.theta, rot.phase))
    ref = selective_reference(*ref_t[:4], theta, phase, weights=gate_weights(ref_t[4], N))
    assert_close("gated selective", ref, out, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ref)
    got = _grads((out * w).sum(), mine + [rot.theta, rot.phase])
    want = _grads((ref * w).sum(), ref_t + [theta, phase])
    for name, x, y in zip(("qf", "kf", "v", "clock", "log_gates", "theta", "phase"), want, got):
        assert_close(f"d {name}", x, y, rtol=1e-8, atol=1e-11)
    # streaming keeps both the gates' product and the clock
    parts, state = [], None
    for lo, hi in ((0, 9), (9, 10), (10, N)):
        o, state = linear_attention(qf[:, :, lo:hi], kf[:, :, lo:hi], v[:, :, lo:hi], causal=True, rotary=rot,
                                    clock=a[:, :, lo:hi], log_gates=lg[:, :, lo:hi], initial_state=state,
                                    return_state=True)
        parts.append(o)
    assert_close("gated streamed", ref, torch.cat(parts, 2), rtol=1e-10, atol=1e-12)


def test_packed_documents_restart_the_clock():
    qf, kf, v, a = _inputs(9, N=20)
    qf, kf, v, a = qf[:1], kf[:1], v[:1], a[:1]
    rot = _learned(9)
    cu = torch.tensor([0, 7, 20])
    out = linear_attention(qf, kf, v, causal=True, rotary=rot, clock=a, cu_seqlens=cu)
    for lo, hi in ((0, 7), (7, 20)):
        alone = linear_attention(qf[:, :, lo:hi], kf[:, :, lo:hi], v[:, :, lo:hi], causal=True, rotary=rot,
                                 clock=a[:, :, lo:hi])
        assert_close(f"document {lo}:{hi}", alone, out[:, :, lo:hi], rtol=1e-12, atol=1e-14)


def test_errors_name_the_argument():
    qf, kf, v, a = _inputs(1, N=6)
    rot = _learned(1)
    with pytest.raises(ValueError, match="clock: expected a LearnedRotary"):
        linear_attention(qf, kf, v, causal=True, rotary=RotaryEmbedding(R), clock=a)
    with pytest.raises(ValueError, match="clock: expected a LearnedRotary"):
        linear_attention(qf, kf, v, causal=True, clock=a)
    with pytest.raises(ValueError, match="clock: expected causal=True"):
        linear_attention(qf, kf, v, causal=False, rotary=rot, clock=a)
    with pytest.raises(ValueError, match=r"clock: expected shape \(B, H, N\)"):
        linear_attention(qf, kf, v, causal=True, rotary=rot, clock=a[:, :, :3])
    with pytest.raises(ValueError, match="clock: expected group=None"):
        linear_attention(qf, kf, v, causal=True, rotary=rot, clock=a, group=object())
    _, plain = linear_attention(qf, kf, v, causal=True, rotary=rot, return_state=True)
    with pytest.raises(ValueError, match="clock: the initial_state was made without a clock"):
        linear_attention(qf, kf, v, causal=True, rotary=rot, clock=a, initial_state=plain)
    _, ticking = linear_attention(qf, kf, v, causal=True, rotary=rot, clock=a, return_state=True)
    with pytest.raises(ValueError, match="initial_state: made by a call with a clock"):
        linear_attention(qf[:, :, :1], kf[:, :, :1], v[:, :, :1], causal=True, rotary=rot, initial_state=ticking)
    with pytest.raises(ValueError, match="selective: expected False unless rope='features' and causal=True"):
        LinearRotaryAttention(16, heads=2, nb_features=8, causal=True, rope="inputs", selective=True)
    with pytest.raises(ValueError, match="selective: expected False unless rope='features' and causal=True"):
        LinearRotaryAttention(16, heads=2, nb_features=8, causal=False, selective=True)
    layer = LinearRotaryAttention(16, heads=2, nb_features=8, causal=True, selective=True)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="clock: expected \\(B, kv_heads, N\\) clock increments"):
        layer.forward_heads(q, q, q)
    plain_layer = LinearRotaryAttention(16, heads=2, nb_features=8, causal=True, rope_learned=True)
    with pytest.raises(ValueError, match="clock: expected None"):
        plain_layer.forward_heads(q, q, q, clock=torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="selective=True there, False here"):
        plain_layer.set_extra_state(layer.get_extra_state())


# ---------------------------------------------------------------------------------------------- the layer
def _layer(seed, gate=False, kv_heads=None, heads=2, dim=12, r=8, **kw):
    torch.manual_seed(seed)
    layer = LinearRotaryAttention(dim, heads=heads, nb_features=r, causal=True, selective=True, gate=gate,
                                  kv_heads=kv_heads, seed=seed, **kw).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a clock that varies with the input, rotations away from their initial values
        layer.clock_proj.weight.copy_(torch.randn(layer.clock_proj.weight.shape, generator=g, dtype=F64))
        layer.rotary.phase.copy_(torch.randn(layer.rotary.phase.shape, generator=g, dtype=F64))
        if gate:
            layer.gate_proj.weight.copy_(0.3 * torch.randn(layer.gate_proj.weight.shape, generator=g, dtype=F64))
    return layer


def layer_reference(layer, x):
    """The layer written out: its projections, FAVOR+ features in float64, the clock a = softplus(w . x + b) per
    kv head (repeated to the query heads), explicit rotations, gates written out, then to_out."""
    q, k, v = layer.split(x, None, False)
    k, v = layer.share_kv(k), layer.share_kv(v)
    W = layer.feature_map.projection
    a = layer.share_kv(F.softplus(F.linear(x, layer.clock_proj.weight, layer.clock_proj.bias)).transpose(1, 2))
    weights = None
    if layer.gate:
        lg = F.logsigmoid(F.linear(x, layer.gate_proj.weight, layer.gate_proj.bias)).transpose(1, 2) / 16.0
        weights = gate_weights(layer.share_kv(lg), x.shape[1])
    out = selective_reference(favor_features(q, W), favor_features(k, W), v, a, layer.rotary.theta,
                              layer.rotary.phase, weights=weights)
    return layer.to_out(rearrange(out, "b h n d -> b n (h d)"))


@pytest.mark.parametrize("gate,kv_heads", [(False, None), (True, None), (False, 1), (True, 1)])
def test_layer_against_the_written_out_layer_every_parameter_gradient(gate, kv_heads):
    layer = _layer(21, gate=gate, kv_heads=kv_heads)
    x = torch.randn(2, 19, 12, dtype=F64, generator=torch.Generator().manual_seed(22))
    out = layer(x)
    ref = layer_reference(layer, x)
    assert_close("layer", ref, out, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ref)
    names, params = zip(*[(n, p) for n, p in layer.named_parameters() if p.requires_grad])
    assert "clock_proj.weight" in names and "rotary.theta" in names
    got = _grads((out * w).sum(), params)
    want = _grads((ref * w).sum(), params)
    for name, x_, y in zip(names, want, got):
        assert_close(f"d {name}", x_, y, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("gate,kv_heads,decay", [(False, None, None), (True, None, None), (False, 1, "multiscale"),
                                                 (True, 1, None)])
def test_layer_decodes_token_by_token_as_its_full_pass(gate, kv_heads, decay):
    layer = _layer(31, gate=gate, kv_heads=kv_heads, decay=decay)
    x = torch.randn(2, 17, 12, dtype=F64, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        full = layer(x)
        out, state = layer(x[:, :5], return_state=True)  # a prompt, then one token at a time
        outs = [out]
        for t in range(5, x.shape[1]):
            out, state = layer(x[:, t:t + 1], state=state, return_state=True)
            outs.append(out)
    assert_close("decoded", full, torch.cat(outs, 1), rtol=1e-10, atol=1e-12)
    assert state.clock.shape == (2, layer.heads) and state.offset == x.shape[1]


def test_layer_with_a_equal_to_one_is_the_learned_rotation_layer():
    """At initialisation (w = 0, b = softplus^-1(1)) the clock ticks 1 per position: A_n = n + 1, the learned
    rotation's angles shifted by theta on both sides, which cancels in every score."""
    torch.manual_seed(41)
    sel = LinearRotaryAttention(12, heads=2, nb_features=8, causal=True, selective=True, gate=True, seed=41).double()
    lrn = LinearRotaryAttention(12, heads=2, nb_features=8, causal=True, rope_learned=True, gate=True,
                                seed=41).double()
    assert sel.rope_learned and sel.state_group == 1
    with torch.no_grad():
        for name, p in lrn.named_parameters():
            sel.get_parameter(name).copy_(p)
        for name, b in lrn.named_buffers():
            sel.get_buffer(name).copy_(b)
        lrn.rotary.phase.normal_()
        sel.rotary.phase.copy_(lrn.rotary.phase)
    x = torch.randn(2, 21, 12, dtype=F64)
    a = F.softplus(sel.clock_proj(x))
    assert_close("a = 1", torch.ones_like(a), a, rtol=0, atol=1e-9)  # b rounded to float32 at construction
    assert_close("a = 1: rope_learned", lrn(x), sel(x), rtol=1e-7, atol=1e-10)
    x32 = x.float()
    assert_close("float32", lrn.float()(x32).double(), sel.float()(x32), rtol=1e-5, atol=1e-6)
