"""``kernel="cpp"``: the compiled paths (linrope/_engine/step_cpu.cpp, causal_cpu.cpp). Their arithmetic is held to
the references elsewhere: tests/test_step.py runs every test with the compiled step in place of the eager one, and
the exactness, reliability, decay, gate and fuzz tests run every test twice, the second time with the compiled
causal pass in place of the torch engine for the calls it covers (conftest.py's ``engine_kernel``). Here: that the
argument reaches them from the functions and the layer, which calls they cover, that the threads do not change a
bit, and that they fail loudly where they cannot run."""

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
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def test_the_functions_decode_through_the_compiled_step(compiled_calls):
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


@pytest.fixture
def passes(monkeypatch):
    """Counts the engine calls the compiled causal pass ran (forward, backward)."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(compiled, f"causal_{name}")

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(compiled, f"causal_{name}", counted)
    return calls


def _favor_inputs(B=2, H=3, N=150, d=16, r=32, dv=8, sigma=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (sigma * torch.randn(B, H, N, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g)
    return q, k, v, gaussian_orthogonal_matrix(r, d, generator=g).float()


@pytest.mark.parametrize("options", [dict(rotary=True), dict(), dict(rotary=True, decay="multiscale"),
                                     dict(rotary=True, gates=True), dict(rotary=True, positions="per-example")],
                         ids=["rope", "no-rope", "decay", "gates", "per-example-positions"])
def test_the_causal_favor_pass_runs_compiled_forward_and_backward(passes, options):
    q, k, v, W = _favor_inputs()
    B, H, N, _ = q.shape
    kw = dict(causal=True)
    if options.get("rotary"):
        kw["rotary"] = RotaryEmbedding(W.shape[0])
    if "decay" in options:
        kw["decay"] = options["decay"]
    if options.get("positions") == "per-example":
        kw["positions"] = torch.stack((torch.arange(N), torch.arange(N) + 7))
    got = {}
    for kernel in ("torch", "cpp"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        gates = torch.full((B, H, N), -0.05, requires_grad=True) if options.get("gates") else None
        out = favor_attention(*x, W, kernel=kernel, log_gates=gates, **kw)
        out.backward(torch.ones_like(out))
        got[kernel] = [out] + [t.grad for t in x] + ([gates.grad] if gates is not None else [])
    assert passes == {"forward": 1, "backward": 1}
    for a, b in zip(got["cpp"], got["torch"]):
        assert _rel(a, b) < 2e-5


def test_the_other_calls_keep_the_torch_engine(passes):
    q, k, v, W = _favor_inputs(N=40)
    rot = RotaryEmbedding(W.shape[0])
    (fq, _), (fk, ks) = favor_plus(q, W, is_query=True), favor_plus(k, W, is_query=False)
    favor_attention(q, k, v, W, causal=False, rotary=rot, kernel="cpp")  # bidirectional
    favor_attention(q.double(), k.double(), v.double(), W.double(), causal=True, rotary=rot, kernel="cpp")
    linear_attention(fq, fk, v, k_logscale=ks, causal=True, rotary=rot, kernel="cpp")  # given features
    favor_attention(q, k, v, W, causal=True, rotary=rot)  # kernel="torch"
    layer = LinearRotaryAttention(32, heads=2, nb_features=16, causal=True, rope_learned=True, kernel="cpp")
    layer(torch.randn(1, 20, 32))  # learned angles
    assert passes == {"forward": 0, "backward": 0}
    favor_attention(q, k, v, W, causal=True, rotary=rot, kernel="cpp")
    assert passes == {"forward": 1, "backward": 0}


def test_the_threads_do_not_change_a_bit():
    """Each (batch, head) row is one thread's from start to end: the same bits on 1 thread as on several."""
    q, k, v, W = _favor_inputs(B=2, H=3, N=200, r=64)
    rot = RotaryEmbedding(64)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            x = [t.clone().requires_grad_() for t in (q, k, v)]
            out = favor_attention(*x, W, causal=True, rotary=rot, kernel="cpp", chunk_size=16)
            out.backward(torch.cos(out))
            got.append([out] + [t.grad for t in x])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_strided_inputs_are_read_in_place_and_give_the_same_results():
    """q, k, v as views (the layer's projections, (B, N, H, d) transposed) and a strided upstream gradient: the
    compiled pass reads their rows where they are; a view whose rows overlap (stride 0 along positions) is copied."""
    q, k, v, W = _favor_inputs(B=2, H=3, N=130, r=64)
    rot = RotaryEmbedding(64)
    results = []
    for layout in ("contiguous", "strided", "broadcast-v"):
        x = [t.clone() for t in (q, k, v)]
        if layout == "strided":
            x = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in x]
        if layout == "broadcast-v":
            x[2] = x[2][:, :, :1].expand_as(x[2])
        x = [t.requires_grad_() if t.is_leaf else t for t in x]
        leaves = [t for t in x if t.is_leaf]
        out = favor_attention(*x, W, causal=True, rotary=rot, kernel="cpp", chunk_size=32)
        grad = torch.sin(out).transpose(1, 2).contiguous().transpose(1, 2)  # a strided upstream gradient
        out.backward(grad)
        ref = favor_attention(*(t.detach().contiguous().requires_grad_() for t in x), W, causal=True, rotary=rot,
                              chunk_size=32)
        results.append((layout, out, [t.grad for t in leaves], ref))
    for layout, out, grads, ref in results:
        assert _rel(out, ref) < 1e-5, layout
    assert _rel(results[1][1], results[0][1]) < 1e-6
    for a, b in zip(results[1][2], results[0][2]):
        assert _rel(a, b) < 1e-6


def test_a_layer_trains_the_same_with_the_compiled_pass():
    torch.manual_seed(0)
    layers = {kernel: LinearRotaryAttention(64, heads=4, nb_features=32, causal=True, kv_heads=2, gate=True,
                                            kernel=kernel) for kernel in ("torch", "cpp")}
    layers["cpp"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 90, 64)
    grads = {}
    for kernel, layer in layers.items():
        layer(x).square().mean().backward()
        grads[kernel] = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert grads["cpp"].keys() == grads["torch"].keys() and len(grads["cpp"]) > 3
    for name, g in grads["torch"].items():
        assert _rel(grads["cpp"][name], g) < 1e-4, name


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
