import random

import pytest
import torch

from linrope import AttentionState, RotaryEmbedding, favor_attention, linear_attention, softmax_attention
from linrope.features import FavorPlus
from linrope.reference import favor_attention_naive, linear_attention_naive
from reference import assert_close, eq19, favor_features, favor_log_features, rotation_matrices, softmax_ref

F64 = torch.float64


def qkv(B=2, H=3, N=37, d=8, dv=5, dtype=F64, scale=1.0):
    return [scale * torch.randn(B, H, N, x, dtype=dtype) for x in (d, d, dv)]


def features(B=2, H=3, N=37, r=12, dv=5):
    positive = [torch.rand(B, H, N, r, dtype=F64) + 0.05 for _ in range(2)]
    return (*positive, torch.randn(B, H, N, dv, dtype=F64))


# ---------------------------------------------------------------------------------------------- eq. 19
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("N, chunk", [(1, 64), (37, 1), (37, 16), (130, 64), (64, 16)])
def test_eq19_matches_quadratic_reference(causal, interleaved, N, chunk):
    qf, kf, v = features(N=N)
    rot = RotaryEmbedding(12, interleaved=interleaved)
    R = rotation_matrices(torch.arange(N), 12, interleaved=interleaved)
    got = linear_attention(qf, kf, v, causal=causal, rotary=rot, chunk_size=chunk, group_size=2 * chunk)
    assert_close("eq19", eq19(qf, kf, v, causal=causal, R=R), got, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_positions_with_offset(causal):
    qf, kf, v = features(N=20)
    pos = torch.arange(1000, 1020)
    rot = RotaryEmbedding(12)
    ref = eq19(qf, kf, v, causal=causal, R=rotation_matrices(pos, 12))
    got = linear_attention(qf, kf, v, causal=causal, rotary=rot, positions=pos)
    assert_close("tensor positions", ref, got, rtol=1e-10)
    assert_close("int offset", ref, linear_attention(qf, kf, v, causal=causal, rotary=rot, positions=1000), rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("rope", [None, "interleaved", "half"])
def test_favor_attention_matches_reference_outputs_and_gradients(causal, rope):
    q, k, v = qkv(N=70)
    for t in (q, k, v):
        t.requires_grad_()
    W = FavorPlus(8, 16, seed=2).double().projection
    rot = RotaryEmbedding(16, interleaved=rope == "interleaved") if rope else None
    R = rotation_matrices(torch.arange(70), 16, interleaved=rope == "interleaved") if rope else None
    ref = eq19(favor_features(q, W), favor_features(k, W), v, causal=causal, R=R)
    got = favor_attention(q, k, v, W, causal=causal, rotary=rot, chunk_size=16, group_size=32)
    assert_close("out", ref, got, rtol=1e-10)
    g = torch.randn_like(ref)
    d_ref = torch.autograd.grad(ref, (q, k, v), g)
    d_got = torch.autograd.grad(got, (q, k, v), g)
    for name, a, b in zip("qkv", d_ref, d_got):
        assert_close(f"d{name}", a, b, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("rope", [None, "interleaved", "half"])
def test_gradcheck(causal, rope):
    q, k, v = qkv(B=1, H=2, N=11, d=4, dv=3)
    W = FavorPlus(4, 6, seed=1).double().projection
    rot = RotaryEmbedding(6, interleaved=rope == "interleaved") if rope else None
    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: favor_attention(q, k, v, W, causal=causal, rotary=rot, chunk_size=4, group_size=8), inputs)
    qf, kf, v2 = features(B=1, H=2, N=11, r=6, dv=3)
    ks = torch.randn(1, 2, 11, dtype=F64)
    inputs = [t.requires_grad_() for t in (qf, kf, v2, ks)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, s: linear_attention(a, b, c, causal=causal, rotary=rot, chunk_size=3, group_size=6,
                                            k_logscale=s), inputs)


def test_gradcheck_through_streaming_state():
    q, k, v = qkv(B=1, H=1, N=6, d=4, dv=2)
    W = FavorPlus(4, 6, seed=1).double().projection
    rot = RotaryEmbedding(6)
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def two_pieces(q, k, v):
        o1, st = favor_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], W, causal=True, rotary=rot, return_state=True,
                                 chunk_size=2)
        o2, st = favor_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], W, causal=True, rotary=rot, initial_state=st,
                                 return_state=True)
        return torch.cat((o1, o2), 2)  # the state itself is relative to a detached reference (log_ref)

    assert torch.autograd.gradcheck(two_pieces, inputs)


# ---------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("rope", [None, "features", "inputs"])
def test_streaming_in_random_pieces_and_token_by_token_equals_one_pass(rope):
    q, k, v = qkv(N=75)
    W = FavorPlus(8, 16, seed=4).double().projection
    feat_rot = RotaryEmbedding(16) if rope == "features" else None
    in_rot = RotaryEmbedding(8) if rope == "inputs" else None
    if in_rot is not None:
        q, k = in_rot.rotate(q), in_rot.rotate(k)
    full = favor_attention(q, k, v, W, causal=True, rotary=feat_rot)
    rng = random.Random(0)
    for sizes in ("random", "tokens"):
        state, outs, i = None, [], 0
        while i < 75:
            n = 1 if sizes == "tokens" else min(rng.randint(1, 20), 75 - i)
            out, state = favor_attention(q[:, :, i:i + n], k[:, :, i:i + n], v[:, :, i:i + n], W, causal=True,
                                         rotary=feat_rot, initial_state=state, return_state=True, chunk_size=8)
            outs.append(out)
            i += n
        assert state.offset == 75
        assert_close(f"stream {sizes}", full.double(), torch.cat(outs, 2), rtol=1e-10)


@pytest.mark.parametrize("rope", [False, True])
def test_caller_state_and_incoming_gradients_are_never_written(rope):
    """The engine rescales states in place only when they are its own: the caller's initial state and the
    gradients autograd hands the backward stay as they were (large activations: references move every group)."""
    q, k, v = qkv(N=40, scale=4.0)
    W = FavorPlus(8, 16, seed=2).double().projection
    rot = RotaryEmbedding(16) if rope else None
    _, st = favor_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], W, causal=True, rotary=rot, return_state=True)
    # the same state referred 100 lower: the first key of the call is then above it and rescales the state
    S0, z0 = (t.mul(torch.exp(torch.tensor(100.0, dtype=F64))).requires_grad_() for t in (st.numerator, st.key_sum))
    st = AttentionState(S0, z0, st.log_ref - 100, st.offset)
    x = [t[:, :, 9:].clone().requires_grad_() for t in (q, k, v)]
    before = [t.detach().clone() for t in (S0, z0)]
    out, end = favor_attention(*x, W, causal=True, rotary=rot, initial_state=st, return_state=True, chunk_size=4,
                               group_size=8)
    grads = [torch.randn_like(t) for t in (out, end.numerator, end.key_sum)]
    kept = [g.clone() for g in grads]
    torch.autograd.grad((out, end.numerator, end.key_sum), [*x, S0, z0], grads)
    for name, now, then in zip(("numerator", "key_sum", "d out", "d numerator", "d key_sum"), [S0, z0, *grads],
                               before + kept):
        assert torch.equal(now.detach(), then), name


def test_streaming_state_of_generic_features_continues_from_offset():
    qf, kf, v = features(N=30)
    rot = RotaryEmbedding(12)
    full = linear_attention(qf, kf, v, causal=True, rotary=rot)
    o1, st = linear_attention(qf[:, :, :13], kf[:, :, :13], v[:, :, :13], causal=True, rotary=rot, return_state=True)
    o2 = linear_attention(qf[:, :, 13:], kf[:, :, 13:], v[:, :, 13:], causal=True, rotary=rot, initial_state=st)
    assert_close("continue", full, torch.cat((o1, o2), 2), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- RoPE properties
def test_relative_property_shift_invariance():
    q, k, v = qkv(N=40)
    W = FavorPlus(8, 16, seed=5).double().projection
    rot_f, rot_d = RotaryEmbedding(16), RotaryEmbedding(8)
    for causal in (False, True):
        a = favor_attention(q, k, v, W, causal=causal, rotary=rot_f)
        b = favor_attention(q, k, v, W, causal=causal, rotary=rot_f, positions=12345)
        assert_close("eq19 shift", a, b, rtol=1e-9)
        a = softmax_attention(q, k, v, causal=causal, rotary=rot_d)
        b = softmax_attention(q, k, v, causal=causal, rotary=rot_d, positions=777)
        assert_close("softmax shift", a, b, rtol=1e-9)


def test_rope_before_features_is_not_shift_invariant_for_a_fixed_draw():
    """Rotating q, k before phi is relative only in expectation: a fixed draw sees absolute positions."""
    q, k, v = qkv(N=40)
    W = FavorPlus(8, 16, seed=5).double().projection
    rot = RotaryEmbedding(8)
    a = favor_attention(rot.rotate(q), rot.rotate(k), v, W, causal=True)
    b = favor_attention(rot.rotate(q, 500), rot.rotate(k, 500), v, W, causal=True)
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- causality
def test_causal_prefix_is_untouched_by_later_tokens_even_extreme_ones():
    """performer-pytorch's global key max leaks the future (its issue #82); our reference P looks back only."""
    q, k, v = qkv(N=200, dtype=torch.float32)
    W = FavorPlus(8, 32, seed=6).projection
    rot = RotaryEmbedding(32)
    m = 90
    base = favor_attention(q, k, v, W, causal=True, rotary=rot)
    for scale in (1.0, 30.0):  # 30: later keys of norm ~85 whose features would swamp a global max
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, m + 1:] = scale * torch.randn_like(q2[:, :, m + 1:])
        k2[:, :, m + 1:] = scale * torch.randn_like(k2[:, :, m + 1:])
        v2[:, :, m + 1:] = torch.randn_like(v2[:, :, m + 1:])
        out = favor_attention(q2, k2, v2, W, causal=True, rotary=rot)
        assert torch.equal(base[:, :, :m + 1], out[:, :, :m + 1])
        assert torch.isfinite(out).all()


def test_key_whose_log_scale_jumps_is_handled_exactly():
    """A key far above every earlier one (> JUMP_LIMIT nats) triggers the per-position fallback."""
    from linrope import _engine
    from linrope.features import favor_plus

    q, k, v = qkv(N=50, d=8, scale=0.5)
    W = FavorPlus(8, 16, seed=2).double().projection.clone()
    W[1] *= 11.0 / W[1].norm()  # a row with |w|^2/2 = 60.5: the key x~ = w reaches that log-scale
    k[:, :, 30] = W[1] * 8 ** 0.25
    k[:, :, 41] = 0.7 * W[1] * 8 ** 0.25
    _, s = favor_plus(k, W, is_query=False)
    assert (s[..., 30] - s[..., :30].amax(-1)).min() > _engine.JUMP_LIMIT
    for t in (q, k, v):
        t.requires_grad_()
    ref = eq19(favor_features(q, W), favor_features(k, W), v, causal=True)
    g = torch.randn_like(ref)
    d_ref = torch.autograd.grad(ref, (q, k, v), g)
    for rot in (None, RotaryEmbedding(16)):
        R = None if rot is None else rotation_matrices(torch.arange(50), 16)
        ref = eq19(favor_features(q, W), favor_features(k, W), v, causal=True, R=R)
        got = favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=8, group_size=16)
        assert_close("jump out", ref, got, rtol=1e-9)
        assert_close("naive", ref, favor_attention_naive(q, k, v, W, causal=True, rotary=rot), rtol=1e-9)
        if rot is None:
            for name, a, b in zip("qkv", d_ref, torch.autograd.grad(got, (q, k, v), g)):
                assert_close(f"jump d{name}", a, b, rtol=1e-8)


@pytest.mark.parametrize("jump", [False, True], ids=["plain", "jump"])
def test_causal_engine_reads_the_device_once_per_call_not_per_group(jump):
    """Host reads (``.item()``, ``bool()``, ``nonzero``) stall a GPU: the causal forward makes one per call however
    many groups it runs (the deferred jump check), the backward none. With a jump the forward runs again,
    splitting groups, and its result stays exact (see the test above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    q, k, v = [t.float().requires_grad_() for t in qkv(B=2, H=2, N=300, d=16, dv=8)]
    W = FavorPlus(16, 32, seed=0).projection.clone()
    if jump:  # as in the test above: a key reaching log-scale 60 after keys near 0
        W[1] *= 11.0 / W[1].norm()
        with torch.no_grad():
            k[:, :, 100] = W[1] * 16 ** 0.25
    with HostReads():
        out = favor_attention(q, k, v, W, causal=True, rotary=RotaryEmbedding(32), chunk_size=16, group_size=32)
    if jump:  # the second pass reads each of its (more than 10) groups
        assert HostReads.count > 1 + 10
    else:
        assert HostReads.count == 1
    HostReads.count = 0
    with HostReads():
        out.sum().backward()
    assert HostReads.count == 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_scans_as_cumsum_match_the_reference(monkeypatch, rope, causal):
    """On a GPU the engine's scans over chunks are torch.cumsum (one kernel) instead of loops over slices: the
    same outputs and gradients, exercised here on the CPU (bidirectional: the two-sided scans of RoPE)."""
    from linrope._engine import chunked

    monkeypatch.setattr(chunked, "_loop_scans", lambda X: False)
    q, k, v = qkv(N=70, d=8, scale=1.5)
    W = FavorPlus(8, 16, seed=1).double().projection
    rot, R = (RotaryEmbedding(16), rotation_matrices(torch.arange(70), 16)) if rope else (None, None)
    for t in (q, k, v):
        t.requires_grad_()
    ref = eq19(favor_features(q, W), favor_features(k, W), v, causal=causal, R=R)
    got = favor_attention(q, k, v, W, causal=causal, rotary=rot, chunk_size=8, group_size=32)
    assert_close("cumsum scans", ref, got, rtol=1e-10)
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(got, (q, k, v), g)):
        assert_close(f"cumsum scans d{name}", a, b, rtol=1e-9)


def test_large_norm_keys_stay_accurate_in_float32():
    """Keys of norm ~25 at d=64: exp features span ~1e40; the log-scale bookkeeping keeps float32 exact."""
    q, k, v = qkv(B=1, H=2, N=300, d=64, dv=8, dtype=torch.float32)
    k = 3.0 * k
    W = FavorPlus(64, 128, seed=0).projection
    rot = RotaryEmbedding(128)
    for causal in (False, True):
        got = favor_attention(q, k, v, W, causal=causal, rotary=rot)
        R = rotation_matrices(torch.arange(300), 128)
        ref = eq19(favor_features(q, W), favor_features(k, W), v, causal=causal, R=R)
        assert_close("large keys", ref, got, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- masks, dtypes
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_removes_keys_from_numerator_and_normalizer(causal):
    q, k, v = qkv(N=30)
    W = FavorPlus(8, 16, seed=2).double().projection
    mask = torch.rand(2, 30) > 0.3
    mask[0, 0] = True
    mask[1, :5] = False  # causal rows 0..4 of batch 1 see no key: output 0, not NaN
    rot = RotaryEmbedding(16)
    got = favor_attention(q, k, v, W, causal=causal, rotary=rot, key_padding_mask=mask, chunk_size=8)
    R = rotation_matrices(torch.arange(30), 16)
    ref = eq19(favor_features(q, W), favor_features(k, W), v, causal=causal, R=R, mask=mask)
    assert_close("masked", ref, got, rtol=1e-9)
    if causal:
        assert got[1, :, :5].abs().max() == 0
    sm = softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
    ref = softmax_ref(q, k, v, causal=causal, mask=mask).nan_to_num(0.0)  # rows that see no key: 0
    assert_close("softmax masked", ref, sm, rtol=1e-9)


def _rows_reference(q, k, v, W, rows, *, causal, R):
    """eq. 19 in float64 for the query ``rows`` only (all keys): a quadratic reference that fits at N = 8192."""
    lq, lk = favor_log_features(q[:, :, rows], W), favor_log_features(k, W)
    qf, kf = torch.exp(lq - lq.amax(-1, keepdim=True)), torch.exp(lk - lk.amax((-1, -2), keepdim=True))
    rq = torch.einsum("nij,bhnj->bhni", R[rows], qf)
    rk = torch.einsum("nij,bhnj->bhni", R, kf)
    num, den = rq @ rk.transpose(-1, -2), qf @ kf.transpose(-1, -2)  # (B, H, rows, N)
    if causal:
        later = torch.arange(k.shape[2])[None, :] > torch.as_tensor(rows)[:, None]
        num, den = num.masked_fill(later, 0), den.masked_fill(later, 0)
    return (num @ v.double()) / den.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_at_8192(dtype):
    """Half inputs against eq. 19 in float64 on the same (rounded) inputs, at the rows that matter most: the
    first ones (few keys), some in between and the last. Autograd keeps the inputs in half, not float32 copies."""
    q, k, v = (t.to(dtype) for t in qkv(B=1, H=2, N=8192, d=32, dv=32, dtype=torch.float32))
    W = FavorPlus(32, 64, seed=0).projection
    rot = RotaryEmbedding(64)
    R = rotation_matrices(torch.arange(8192), 64)
    rows = [0, 1, 2, 5, 63, 64, 1000, 4097, 8191]
    for causal in (False, True):
        saved = []
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            got = favor_attention(q_, k_, v_, W, causal=causal, rotary=rot)
        assert got.dtype == dtype and torch.isfinite(got).all()
        big = [t for t in saved if t.dim() == 4]  # q, k, v and the output (cos, sin tables are 2-D)
        assert big and all(t.dtype == dtype for t in big), [t.dtype for t in big]
        ref = _rows_reference(q, k, v, W, rows, causal=causal, R=R)
        err = (got[:, :, rows].double() - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert err.max() < (1e-2 if dtype == torch.bfloat16 else 2e-3), err  # the output's own rounding


def test_softmax_attention_matches_reference_with_rope():
    q, k, v = qkv(N=33)
    rot = RotaryEmbedding(8, interleaved=False)
    R = rotation_matrices(torch.arange(33), 8, interleaved=False)
    for causal in (False, True):
        assert_close("softmax", softmax_ref(q, k, v, causal=causal, R=R),
                     softmax_attention(q, k, v, causal=causal, rotary=rot), rtol=1e-10)


def test_library_reference_agrees_with_test_reference():
    qf, kf, v = features(N=25)
    rot = RotaryEmbedding(12)
    R = rotation_matrices(torch.arange(25), 12)
    for causal in (False, True):
        assert_close("naive", eq19(qf, kf, v, causal=causal, R=R),
                     linear_attention_naive(qf, kf, v, causal=causal, rotary=rot), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- invalid input
def _inputs():
    qf, kf, v = features(N=10)
    q, k, _ = qkv(N=10)
    st = AttentionState(torch.zeros(2, 3, 12, 4), torch.zeros(2, 3, 12), torch.zeros(2, 3), 0)  # dv is 5
    return dict(qf=qf, kf=kf, v=v, q=q, k=k, W=torch.randn(12, 8, dtype=F64), st=st)


BAD_CALLS = [  # (call on the inputs above, the phrase the error must contain: the argument and what was expected)
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], rotary=RotaryEmbedding(10)),
                 r"rotary: its dim \(10\) must equal the number of features r \(12\)", id="rotary-dim"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"][..., :11], x["v"]),
                 r"qf, kf: last dimensions differ", id="kf-features"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"][:1], x["v"]),
                 r"kf: expected \(B, H, N\) = \(2, 3, 10\) like qf", id="kf-batch"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"][:, :2], x["v"]),
                 r"kf: expected \(B, H, N\) = \(2, 3, 10\) like qf", id="kf-heads"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"][:, :, :9]),
                 r"v: expected \(B, H, N\) = \(2, 3, 10\) like qf", id="v-length"),
    pytest.param(lambda x: linear_attention(x["qf"][0], x["kf"], x["v"]),
                 r"qf: expected a 4-D tensor \(B, H, N, dim\)", id="qf-3d"),
    pytest.param(lambda x: linear_attention(x["qf"].long(), x["kf"], x["v"]),
                 r"qf: expected a floating-point tensor", id="qf-int"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"],
                                            key_padding_mask=torch.ones(2, 9, dtype=torch.bool)),
                 r"key_padding_mask: expected shape \(B, N\) = \(2, 10\)", id="mask-shape"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], key_padding_mask=torch.ones(2, 10)),
                 r"key_padding_mask: expected dtype torch.bool", id="mask-dtype"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], rotary=RotaryEmbedding(12),
                                            positions=torch.arange(10.0)),
                 r"positions: expected an integer tensor", id="positions-float"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], positions=torch.arange(9)),
                 r"positions: expected shape \(10,\) or \(2, 10\) to match the sequence length", id="positions-length"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], chunk_size=0, causal=True),
                 r"chunk_size: expected a positive integer, got 0", id="chunk-zero"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], group_size=True, causal=True),
                 r"group_size: expected a positive integer, \"auto\" or None, got True", id="group-bool"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], initial_state=x["st"]),
                 r"initial_state/return_state: streaming needs causal=True", id="state-bidirectional"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], causal=True, initial_state=x["st"]),
                 r"initial_state: expected numerator \(B, H, r, dv\) = \(2, 3, 12, 5\)", id="state-shape"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], causal=True, initial_state=(1, 2)),
                 r"initial_state: expected an AttentionState, got tuple", id="state-type"),
    pytest.param(lambda x: linear_attention(x["qf"], x["kf"], x["v"], k_logscale=torch.zeros(2, 3, 9, dtype=F64)),
                 r"k_logscale: expected shape \(B, H, N\) = \(2, 3, 10\)", id="logscale-shape"),
    pytest.param(lambda x: favor_attention(x["q"], x["k"][:, :, :4], x["v"][:, :, :4], x["W"], causal=True),
                 r"key_positions: expected None and keys as long as the queries with causal=True", id="causal-cross"),
    pytest.param(lambda x: favor_attention(x["q"], x["k"][:, :, :4], x["v"], x["W"]),
                 r"v: expected \(B, H, M\) = \(2, 3, 4\) like k", id="cross-v-length"),
    pytest.param(lambda x: favor_attention(x["q"], x["k"], x["v"], x["W"][:, :7]),
                 r"projection: expected shape \(r, d\) with d = 8", id="projection-shape"),
    pytest.param(lambda x: favor_attention(x["q"], x["k"], x["v"], x["W"].requires_grad_()),
                 r"projection: expected a tensor that does not require grad", id="projection-grad"),
    pytest.param(lambda x: favor_attention(x["q"], x["k"], x["v"], x["W"], rotary=RotaryEmbedding(8)),
                 r"rotary: its dim \(8\) must equal the number of features r \(projection rows\) \(12\)",
                 id="favor-rotary-dim"),
    pytest.param(lambda x: softmax_attention(x["q"], x["k"][:, :, :, :7], x["v"]),
                 r"q, k: last dimensions differ: \(2, 3, 10, 8\) vs \(2, 3, 10, 7\)", id="softmax-k"),
    pytest.param(lambda x: softmax_attention(x["q"], x["k"], x["v"], rotary=RotaryEmbedding(12)),
                 r"rotary: its dim \(12\) must equal the head dim d \(8\)", id="softmax-rotary-dim"),
]


@pytest.mark.parametrize("call, phrase", BAD_CALLS)
def test_invalid_input_raises_naming_the_argument_and_what_was_expected(call, phrase):
    with pytest.raises((ValueError, TypeError), match=phrase):
        call(_inputs())


@pytest.mark.parametrize("causal", [False, True])
def test_upstream_gradient_with_any_strides(causal):
    """The layer hands back gradients with permuted strides (rearrange); several groups must still work."""
    q, k, v = qkv(B=2, H=3, N=300, d=8, dv=8)
    for t in (q, k, v):
        t.requires_grad_()
    W = FavorPlus(8, 16, seed=2).double().projection
    rot = RotaryEmbedding(16)
    g = torch.randn(2, 300, 3, 8, dtype=F64).permute(0, 2, 1, 3)  # (B, H, N, dv) with (B, N, H, dv) strides
    got = torch.autograd.grad(favor_attention(q, k, v, W, causal=causal, rotary=rot, group_size=64), (q, k, v), g)
    ref = torch.autograd.grad(favor_attention(q, k, v, W, causal=causal, rotary=rot, group_size=64), (q, k, v),
                              g.contiguous())
    for a, b in zip(ref, got):
        assert_close("grad", a, b, rtol=1e-12)


def test_kernel_argument_errors_name_what_is_needed(monkeypatch):
    """kernel= is explicit: an unknown name, or "triton" where it cannot run, is an error saying why (never a silent
    fallback to the torch kernel)."""
    from linrope._engine import triton_kernels

    q, k, v = qkv(N=20, d=8, dtype=torch.float32)
    W = FavorPlus(8, 16, seed=0).projection
    with pytest.raises(ValueError, match='kernel: expected "torch", "cpp" or "triton"'):
        favor_attention(q, k, v, W, causal=True, kernel="flash")
    monkeypatch.setattr(triton_kernels, "available", lambda: False)
    with pytest.raises(RuntimeError, match="triton package does not import"):
        favor_attention(q, k, v, W, causal=True, kernel="triton")
    monkeypatch.setattr(triton_kernels, "available", lambda: True)
    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="expected CUDA tensors, got cpu"):
        linear_attention(q.exp(), k.exp(), v, causal=True, kernel="triton")
