"""Data-dependent decay (``log_gates``, a forget gate per head and position) against float64 eq. 19 with the
product of gates written out, in outputs and gradients, at large cumulative gates, in streaming, decoding,
packed documents, and in the layer (``gate=True``)."""

import pytest
import torch

from linrope import LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope.features import gaussian_orthogonal_matrix
from reference import assert_close, eq19_weighted, rotation_matrices

# every test twice: the torch engine, and the compiled causal pass where it covers the call (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_kernel")

F64 = torch.float64


def gate_weights(log_gates, N):
    """prod_{n < t <= m} g_t for n <= m, 0 above the diagonal: (B, H, N, N) float64, written out."""
    lg = log_gates.double()
    w = torch.zeros(*lg.shape[:2], N, N, dtype=torch.float64)
    for m in range(N):
        for n in range(m + 1):
            w[..., m, n] = torch.exp(lg[..., n + 1:m + 1].sum(-1))
    return w


def inputs(B=2, H=3, N=23, r=8, dv=5, scale=1.0, gate_scale=0.3, dtype=torch.float64):
    qf = torch.rand(B, H, N, r, dtype=dtype) + 0.05
    kf = torch.rand(B, H, N, r, dtype=dtype) + 0.05
    v = torch.randn(B, H, N, dv, dtype=dtype)
    lg = -gate_scale * torch.rand(B, H, N, dtype=dtype) * scale
    return qf, kf, v, lg


def _same_gradients(out, inputs, ref, ref_inputs, names):
    """The gradients of a random projection of out w.r.t. inputs equal the reference's w.r.t. its own (float64)."""
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out * w).sum(), inputs)
    want = torch.autograd.grad((ref * w).sum(), ref_inputs)
    for name, a, b in zip(names, want, got):
        assert_close(f"d {name}", a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("rope", [False, True])
def test_outputs_and_gradients_match_the_written_out_product(rope):
    qf, kf, v, lg = inputs()
    N = qf.shape[2]
    tensors = [t.clone().requires_grad_() for t in (qf, kf, v, lg)]
    rot = RotaryEmbedding(8) if rope else None
    out = linear_attention(*tensors[:3], causal=True, rotary=rot, log_gates=tensors[3], chunk_size=4, group_size=8)
    R = rotation_matrices(torch.arange(N), 8) if rope else None
    ref_t = [t.clone().requires_grad_() for t in (qf, kf, v, lg)]
    ref = eq19_weighted(*ref_t[:3], Rq=R, Rk=R, weights=gate_weights(ref_t[3], N))
    assert_close("gated", ref, out, rtol=1e-10, atol=1e-12)
    _same_gradients(out, tensors, ref, ref_t, ("qf", "kf", "v", "log_gates"))


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("std", [1.0, 3.0, 10.0])
def test_favor_gates_match_the_written_out_product_on_favor_features(rope, std):
    """favor_attention(log_gates=): the gates as differentiated key log-biases inside the fused FAVOR+ path
    (features recomputed in the backward), against eq. 19 on phi(x) = exp(x~ W^T - |x~|^2/2) written out."""
    g = torch.Generator().manual_seed(5)
    B, H, N, d, r = 2, 3, 23, 8, 16
    q, k = (std * torch.randn(B, H, N, d, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(B, H, N, 5, generator=g, dtype=F64)
    lg = -0.3 * torch.rand(B, H, N, generator=g, dtype=F64)
    W = gaussian_orthogonal_matrix(r, d, generator=g).double()
    rot = RotaryEmbedding(r) if rope else None
    tensors = [t.clone().requires_grad_() for t in (q, k, v, lg)]
    out = favor_attention(*tensors[:3], W, causal=True, rotary=rot, log_gates=tensors[3], chunk_size=4,
                          group_size=8)

    def phi(x):
        x = x * d ** -0.25
        return torch.exp(x @ W.t() - 0.5 * x.square().sum(-1, keepdim=True))

    R = rotation_matrices(torch.arange(N), r) if rope else None
    ref_t = [t.clone().requires_grad_() for t in (q, k, v, lg)]
    ref = eq19_weighted(phi(ref_t[0]), phi(ref_t[1]), ref_t[2], Rq=R, Rk=R, weights=gate_weights(ref_t[3], N))
    assert_close("gated favor", ref, out, rtol=1e-10, atol=1e-12)
    _same_gradients(out, tensors, ref, ref_t, ("q", "k", "v", "log_gates"))


@pytest.mark.parametrize("kernel", ["torch", "cpp"])
def test_favor_gates_decode_as_the_full_pass(kernel):
    g = torch.Generator().manual_seed(6)
    B, H, N, d, r = 2, 2, 20, 8, 16
    q, k = (2 * torch.randn(B, H, N, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, 4, generator=g)
    lg = -torch.rand(B, H, N, generator=g)
    W = gaussian_orthogonal_matrix(r, d, generator=g).float()
    kw = dict(causal=True, rotary=RotaryEmbedding(r), decay=0.95, kernel=kernel)
    with torch.no_grad():
        full = favor_attention(q, k, v, W, log_gates=lg, **kw)
        out, st = favor_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], W, log_gates=lg[:, :, :8],
                                  return_state=True, **kw)
        parts = [out]
        for t in range(8, N):
            o, st = favor_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], W,
                                    log_gates=lg[:, :, t:t + 1], initial_state=st, return_state=True, **kw)
            parts.append(o)
    assert_close("decoded", full.double(), torch.cat(parts, 2).double(), rtol=1e-5, atol=1e-6)


def test_exact_when_the_gates_forget_fast_and_with_a_decay_beside_them():
    qf, kf, v, lg = inputs(N=70, gate_scale=6.0)  # G falls to about -200: old keys far below float32's range
    out = linear_attention(qf.float(), kf.float(), v.float(), causal=True, log_gates=lg.float(), decay=0.9,
                           chunk_size=8)
    w = gate_weights(lg.float(), 70) * (0.9 ** (torch.arange(70)[:, None] - torch.arange(70)[None, :])
                                        ).clamp(max=1).tril().double()
    ref = eq19_weighted(qf.float(), kf.float(), v.float(), weights=w)
    assert_close("fast gates + decay", ref, out.double(), rtol=2e-5, atol=1e-6)


def test_streaming_and_decoding_continue_the_product():
    qf, kf, v, lg = inputs(B=1, H=2, N=30)
    rot = RotaryEmbedding(8)
    full = linear_attention(qf, kf, v, causal=True, rotary=rot, log_gates=lg)
    parts, state = [], None
    for a, b in ((0, 11), (11, 12), (12, 13), (13, 30)):  # a chunked call, single steps, then a chunked call again
        out, state = linear_attention(qf[:, :, a:b], kf[:, :, a:b], v[:, :, a:b], causal=True, rotary=rot,
                                      log_gates=lg[:, :, a:b], initial_state=state, return_state=True)
        parts.append(out)
    assert_close("streamed", full, torch.cat(parts, 2), rtol=1e-10, atol=1e-12)


def test_packed_documents_restart_the_gates():
    qf, kf, v, lg = inputs(B=1, H=2, N=20)
    cu = torch.tensor([0, 7, 20])
    out = linear_attention(qf, kf, v, causal=True, log_gates=lg, cu_seqlens=cu)
    for a, b in ((0, 7), (7, 20)):
        alone = linear_attention(qf[:, :, a:b], kf[:, :, a:b], v[:, :, a:b], causal=True, log_gates=lg[:, :, a:b])
        assert_close(f"document {a}:{b}", alone, out[:, :, a:b], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rope_learned", [False, True])
def test_gated_layer_decodes_as_its_full_pass_and_learns_its_gate(rope_learned):
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=4, kv_heads=2, nb_features=16, causal=True, gate=True,
                                  rope_learned=rope_learned)
    x = torch.randn(2, 19, 32)
    full = layer(x)
    full.square().mean().backward()
    assert layer.gate_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out, st = layer(x[:, :9], return_state=True)
        parts = [out]
        for t in range(9, 19):
            o, st = layer(x[:, t:t + 1], state=st, return_state=True)
            parts.append(o)
    assert_close("decoded", full.detach().double(), torch.cat(parts, 1).double(), rtol=1e-4, atol=1e-5)
    assert st.numerator.shape[1] == (4 if rope_learned else 2)  # a kv head's gate is shared by its query heads


def test_gated_layer_starts_as_the_multiscale_decay():
    torch.manual_seed(1)
    gated = LinearRotaryAttention(32, heads=4, nb_features=16, causal=True, gate=True, seed=3)
    fixed = LinearRotaryAttention(32, heads=4, nb_features=16, causal=True, decay="multiscale", seed=3)
    fixed.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate_proj") and "extra_state" not in k},
                          strict=False)
    x = torch.randn(1, 40, 32)
    assert_close("gate at init", fixed(x).double(), gated(x).double(), rtol=1e-4, atol=1e-6)


def test_bad_gates_are_named():
    qf, kf, v, lg = inputs()
    with pytest.raises(ValueError, match=r"log_gates: expected shape \(B, H, N\)"):
        linear_attention(qf, kf, v, causal=True, log_gates=lg[..., :-1])
    with pytest.raises(ValueError, match="log_gates: expected causal=True"):
        linear_attention(qf, kf, v, causal=False, log_gates=lg)
    with pytest.raises(ValueError, match="gate: expected False unless causal=True"):
        LinearRotaryAttention(32, heads=4, gate=True)
