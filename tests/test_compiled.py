"""``kernel="cpp"``: the compiled decoding step (linrope/_engine/step_cpu.cpp). Its arithmetic is held to the
references by tests/test_step.py, which runs every test with it in place of the eager step; here: that the
argument reaches it from the functions and the layer (and nothing else changes: full passes are the torch
engine's, bit for bit), and that it fails loudly where it cannot run."""

import pytest
import torch

from linrope import LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope._engine import compiled, step
from linrope.features import favor_plus, gaussian_orthogonal_matrix


@pytest.fixture
def compiled_calls(monkeypatch):
    calls = []
    original = step._one_compiled

    def counted(*args, **kwargs):
        calls.append(args[5].shape)  # v
        return original(*args, **kwargs)

    monkeypatch.setattr(step, "_one_compiled", counted)
    return calls


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_the_functions_decode_through_the_compiled_step_and_keep_the_engine_for_the_rest(compiled_calls):
    g = torch.Generator().manual_seed(0)
    B, H, N, d, r = 2, 3, 12, 16, 32
    q, k = (3 * torch.randn(B, H, N, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, 8, generator=g)
    W = gaussian_orthogonal_matrix(r, d, generator=g).float()
    (fq, _), (fk, ks) = favor_plus(q, W, is_query=True), favor_plus(k, W, is_query=False)
    kw = dict(causal=True, rotary=RotaryEmbedding(r), decay="multiscale")
    calls = {"favor": lambda sl, **a: favor_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], W, **kw, **a),
             "features": lambda sl, **a: linear_attention(fq[:, :, sl], fk[:, :, sl], v[:, :, sl],
                                                          k_logscale=ks[:, :, sl], **kw, **a)}
    with torch.no_grad():
        for name, call in calls.items():
            full = call(slice(None))
            got = {}
            for kernel in ("torch", "cpp"):
                out, state = call(slice(0, 8), return_state=True, kernel=kernel)
                outs = [out]
                for t in range(8, N):
                    out, state = call(slice(t, t + 1), initial_state=state, return_state=True, kernel=kernel)
                    outs.append(out)
                got[kernel] = (torch.cat(outs, 2), state)
            assert torch.equal(got["cpp"][0][:, :, :8], got["torch"][0][:, :, :8]), name  # the prompt: the engine
            assert _rel(got["cpp"][0], full) < 1e-5 and _rel(got["cpp"][0], got["torch"][0]) < 1e-5, name
            assert _rel(got["cpp"][1].numerator, got["torch"][1].numerator) < 1e-5, name
    assert len(compiled_calls) == 2 * (N - 8)


def test_the_layer_decodes_through_the_compiled_step(compiled_calls):
    torch.manual_seed(0)
    eager = LinearRotaryAttention(64, heads=4, nb_features=32, causal=True, kv_heads=2, rope_learned=True).eval()
    fast = LinearRotaryAttention(64, heads=4, nb_features=32, causal=True, kv_heads=2, rope_learned=True,
                                 kernel="cpp").eval()
    fast.load_state_dict(eager.state_dict())
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        full = eager(x)
        _, state = fast(x[:, :4], return_state=True)
        outs = []
        for t in range(4, 10):
            out, state = fast(x[:, t:t + 1], state=state, return_state=True)
            outs.append(out)
    assert _rel(torch.cat(outs, 1), full[:, 4:]) < 1e-5
    assert len(compiled_calls) == 6


def test_gradients_take_the_engine_with_the_compiled_kernel_chosen(compiled_calls):
    layer = LinearRotaryAttention(32, heads=2, nb_features=16, causal=True, kernel="cpp")
    x = torch.randn(1, 5, 32, requires_grad=True)
    _, state = layer(x[:, :4], return_state=True)
    out, _ = layer(x[:, 4:], state=state, return_state=True)
    out.sum().backward()
    assert x.grad is not None and compiled_calls == []


def test_the_compiled_kernel_fails_loudly_where_it_cannot_run(monkeypatch):
    from linrope.functional import _check_kernel

    with pytest.raises(ValueError, match='kernel="cpp": expected CPU tensors, got cuda'):
        _check_kernel("cpp", 64, torch.float32, torch.device("cuda"))
    with pytest.raises(ValueError, match='kernel: expected "torch", "cpp" or "triton", got \'c\\+\\+\''):
        LinearRotaryAttention(32, heads=2, kernel="c++")
    monkeypatch.setattr(compiled, "_MODULE", None)
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        compiled.module()
