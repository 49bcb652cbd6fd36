"""The Triton chunk kernels (linrope/_engine/triton_kernels.py) against the float64 quadratic reference.

Without CUDA they run in Triton's CPU interpreter, so these cases stay small (G <= 200, r, dv <= 64);
the long ones run only on CUDA.
"""

import os
import sys

import pytest
import torch

# Without CUDA, conftest.py turns Triton's interpreter on before anything imports triton (torch.compile does).
pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from linrope._engine import triton_kernels as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tk.interpreted():
    pytest.skip("no CUDA device and TRITON_INTERPRET is off (conftest.py sets it; was it overridden to 0?)",
                allow_module_level=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="long groups are too slow for the interpreter")


def _inputs(BH, G, r, dv, use_diag, s0, gen):
    f = dict(device=DEVICE, dtype=torch.float32)
    q, k = (torch.randn(BH, G, r, generator=gen).to(**f) / r ** 0.25 for _ in range(2))
    v = torch.randn(BH, G, dv, generator=gen).to(**f)
    S0 = torch.randn(BH, r, dv, generator=gen).to(**f) if s0 else torch.zeros(BH, r, dv, **f)
    diag = torch.randn(BH, G, generator=gen).to(**f) if use_diag else None
    return q, k, v, S0, diag


def _err(got, want):
    """Max abs error relative to the reference's scale (its max abs value)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item() if want.numel() else 1.0
    return (got.double() - want).abs().max().item() / max(scale, 1e-30) if want.numel() else 0.0


def _check(BH, G, C, r, dv, use_diag, s0, rtol=1e-5, with_do=True, with_dS=True, store_h=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, S0, diag = _inputs(BH, G, r, dv, use_diag, s0, gen)
    do = torch.randn(BH, G, dv, generator=gen).to(DEVICE) if with_do else None
    dS = torch.randn(BH, r, dv, generator=gen).to(DEVICE) if with_dS else None
    o, S_end, h = tk.chunk_forward(q, k, v, S0, diag, chunk_size=C, store_h=store_h)
    assert (h is None) == (not store_h)
    grads = tk.chunk_backward(q, k, v, S0, diag, h, do, dS, chunk_size=C)

    xs = [x.double().requires_grad_() for x in (q, k, v, S0)]
    d64 = diag.double().requires_grad_() if use_diag else None
    ro, rS = tk.reference_forward(*xs, d64)
    loss = ro.sum() * 0
    if with_do:
        loss = loss + (ro * do.double()).sum()
    if with_dS:
        loss = loss + (rS * dS.double()).sum()
    want = torch.autograd.grad(loss, xs + ([d64] if use_diag else []), allow_unused=True)
    want = [torch.zeros_like(x) if w is None else w for w, x in zip(want, xs + ([d64] if use_diag else []))]

    errs = {"o": _err(o, ro), "S_end": _err(S_end, rS)}
    names = ["dq", "dk", "dv", "dS0"] + (["dd"] if use_diag else [])
    for name, got, w in zip(names, grads, want):
        if w.abs().max() == 0:  # e.g. dq without do: must be exactly zero
            errs[name] = got.abs().max().item()
        else:
            errs[name] = _err(got, w)
    if not use_diag:
        assert grads[4] is None
    bad = {n: e for n, e in errs.items() if not e <= rtol}
    assert not bad, f"errors over {rtol} x scale: {bad} (all: {errs})"


CASES = [  # BH, G, C, r, dv, diag, S0 random
    (1, 64, 64, 16, 16, False, False),   # one full chunk
    (3, 200, 64, 32, 48, True, True),    # ragged G, r != dv, dv not a power of two
    (2, 20, 64, 64, 16, False, True),    # G < C
    (1, 130, 32, 16, 64, True, False),   # ragged, smaller chunk
    (3, 100, 16, 40, 24, False, True),   # r, dv not powers of two, chunk 16
    (1, 1, 64, 16, 16, True, True),      # a single position
    (1, 150, 64, 64, 64, True, True),    # full 64-wide blocks, three chunks
]


@pytest.mark.parametrize("BH,G,C,r,dv,use_diag,s0", CASES)
def test_matches_reference(BH, G, C, r, dv, use_diag, s0):
    _check(BH, G, C, r, dv, use_diag, s0)


def test_several_blocks_per_dim():
    # r = 80, dv = 40 with 16-wide blocks: the loops over r- and dv-blocks and their masked last blocks
    gen = torch.Generator().manual_seed(1)
    q, k, v, S0, diag = _inputs(2, 90, 80, 40, True, True, gen)
    do, dS = torch.randn(2, 90, 40).to(DEVICE), torch.randn(2, 80, 40).to(DEVICE)
    kw = dict(chunk_size=32, block_k=16, block_v=16)
    o, S_end, h = tk.chunk_forward(q, k, v, S0, diag, **kw)
    o2, S2, h2 = tk.chunk_forward(q, k, v, S0, diag, chunk_size=32)
    ro, rS = tk.reference_forward(q, k, v, S0, diag)
    assert _err(o, ro) <= 1e-5 and _err(S_end, rS) <= 1e-5
    g = tk.chunk_backward(q, k, v, S0, diag, h, do, dS, **kw)
    g2 = tk.chunk_backward(q, k, v, S0, diag, h2, do, dS, chunk_size=32)
    for a, b in zip(g, g2):  # the blocking changes only the summation order
        assert _err(a, b.double()) <= 1e-5


@pytest.mark.parametrize("with_do,with_dS", [(False, True), (True, False)])
def test_missing_cotangents_and_recomputed_states(with_do, with_dS):
    _check(2, 100, 32, 32, 16, True, True, with_do=with_do, with_dS=with_dS, store_h=False)
    _check(1, 70, 32, 16, 32, False, True, with_do=with_do, with_dS=with_dS, store_h=False)


def test_h_is_the_state_entering_each_chunk():
    gen = torch.Generator().manual_seed(2)
    q, k, v, S0, _ = _inputs(2, 100, 16, 32, False, True, gen)
    _, S_end, h = tk.chunk_forward(q, k, v, S0, chunk_size=32)
    assert h.shape == (2, 4, 16, 32)
    kv = (k.double().unsqueeze(-1) * v.double().unsqueeze(-2)).cumsum(1)  # (BH, G, r, dv)
    want = torch.stack([S0.double()] + [S0.double() + kv[:, c * 32 - 1] for c in (1, 2, 3)], 1)
    assert _err(h, want) <= 1e-5
    assert _err(S_end, S0.double() + kv[:, -1]) <= 1e-5


def test_empty_group():
    q, k, v, S0, diag = _inputs(2, 0, 16, 16, True, True, torch.Generator().manual_seed(3))
    o, S_end, h = tk.chunk_forward(q, k, v, S0, diag)
    assert o.shape == (2, 0, 16) and torch.equal(S_end, S0) and h.shape == (2, 0, 16, 16)
    dS = torch.randn(2, 16, 16).to(DEVICE)
    dq, dk, dv, dS0, dd = tk.chunk_backward(q, k, v, S0, diag, h, None, dS)
    assert dq.shape == (2, 0, 16) and dd.shape == (2, 0) and torch.equal(dS0, dS)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    q, k, v, S0, diag = _inputs(2, 50, 32, 16, True, True, gen)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not qt.is_contiguous()
    o, S_end, _ = tk.chunk_forward(qt, k, v, S0, diag, chunk_size=16)
    ro, _ = tk.reference_forward(q, k, v, S0, diag)
    assert _err(o, ro) <= 1e-5


def test_bad_arguments():
    q, k, v, S0, diag = _inputs(2, 40, 16, 32, True, True, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="float32"):
        tk.chunk_forward(q.double(), k, v, S0)
    with pytest.raises(ValueError, match="k has shape"):
        tk.chunk_forward(q, k[:, :30], v, S0)
    with pytest.raises(ValueError, match="S0 has shape"):
        tk.chunk_forward(q, k, v, S0.transpose(1, 2))
    with pytest.raises(ValueError, match="diag has shape"):
        tk.chunk_forward(q, k, v, S0, diag[:, :10])
    with pytest.raises(ValueError, match="3-D"):
        tk.chunk_forward(q[0], k, v, S0)
    with pytest.raises(ValueError, match="chunk_size"):
        tk.chunk_forward(q, k, v, S0, chunk_size=48)
    with pytest.raises(ValueError, match="precision"):
        tk.chunk_forward(q, k, v, S0, precision="fp16")
    _, _, h = tk.chunk_forward(q, k, v, S0, diag, chunk_size=16)
    with pytest.raises(ValueError, match="h has shape"):  # states from another chunk size
        tk.chunk_backward(q, k, v, S0, diag, h, None, None, chunk_size=32)
    with pytest.raises(ValueError, match="do has shape"):
        tk.chunk_backward(q, k, v, S0, diag, h, v[:, :5], None, chunk_size=16)


def test_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    tk._kernels.cache_clear()
    try:
        assert not tk.available()
        q, k, v, S0, _ = _inputs(1, 16, 16, 16, False, False, torch.Generator().manual_seed(6))
        with pytest.raises(RuntimeError, match="triton"):
            tk.chunk_forward(q, k, v, S0)
    finally:
        monkeypatch.undo()
        tk._kernels.cache_clear()
    assert tk.available()


@settings(max_examples=8, deadline=None)
@given(G=st.integers(1, 150), C=st.sampled_from([16, 32, 64]), r=st.sampled_from([16, 32, 48]),
       dv=st.sampled_from([16, 32]), use_diag=st.booleans(), BH=st.integers(1, 2), seed=st.integers(0, 99))
def test_property_matches_reference(G, C, r, dv, use_diag, BH, seed):
    _check(BH, G, C, r, dv, use_diag, True, seed=seed)


@needs_cuda
@pytest.mark.parametrize("use_diag", [True, False])
def test_cuda_long_group(use_diag):
    _check(8, 4096, 64, 256, 64, use_diag, True, rtol=2e-5)


@needs_cuda
def test_cuda_ragged_long_group_wide_values():
    _check(3, 1000, 64, 128, 128, True, True, rtol=2e-5)


# ---------------------------------------------------------------------------------------------- in the engine
# favor_attention / linear_attention / the layer with kernel="triton": the same engine (groups, references, jumps,
# normalizer, rotations), the chunk products from the kernels above. Small shapes for the interpreter.
from linrope import LearnedRotary, LinearRotaryAttention, RotaryEmbedding, favor_attention  # noqa: E402
from linrope.features import FavorPlus  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from reference import assert_close, favor_eq19  # noqa: E402


@pytest.mark.parametrize("rope", [None, "interleaved", "half"])
@pytest.mark.parametrize("scale", [1.0, 3.0, 5.0], ids=["std1", "std3", "std5"])
def test_engine_with_triton_kernels_matches_the_float64_reference(rope, scale):
    """Causal eq. 19 with kernel="triton", N=150 (ragged: groups of 64 and a short last one), against eq. 19 on
    exact FAVOR+ features in float64, outputs and gradients."""
    g = torch.Generator().manual_seed(1)
    q, k = (scale * torch.randn(2, 2, 150, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 150, 4, generator=g, dtype=torch.float64)
    W = FavorPlus(8, 16, seed=3).double().projection
    ts = [t.requires_grad_() for t in (q, k, v)]
    ref = favor_eq19(q, k, v, W, causal=True, rope=rope)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    dref = torch.autograd.grad(ref, ts, grad)
    rot = None if rope is None else RotaryEmbedding(16, interleaved=rope == "interleaved")
    xs = [t.detach().float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    got = favor_attention(*xs, W.float().to(DEVICE), causal=True, rotary=rot, chunk_size=16, group_size=64,
                          kernel="triton")
    tol = 2e-5 if scale == 1 else 3e-4
    assert_close("triton engine", ref, got.cpu(), rtol=tol)
    for name, a, b in zip("qkv", dref, torch.autograd.grad(got, xs, grad.float().to(DEVICE))):
        assert_close(f"triton engine d{name}", a, b.cpu(), rtol=10 * tol)


def test_triton_and_torch_kernels_agree_with_learned_angles_decay_masks_and_streaming():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g).to(DEVICE) for _ in range(3))
    W = FavorPlus(8, 16, seed=0).projection.to(DEVICE)
    mask = torch.rand(1, 70, generator=g) > 0.3
    cases = [dict(rotary=LearnedRotary(16, 2).to(DEVICE)), dict(rotary=RotaryEmbedding(16), decay=0.9),
             dict(rotary=RotaryEmbedding(16), key_padding_mask=mask.to(DEVICE))]
    for kw in cases:
        outs = []
        for kernel in ("torch", "triton"):
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = favor_attention(*xs, W, causal=True, chunk_size=16, group_size=32, kernel=kernel, **kw)
            params = [p for p in getattr(kw["rotary"], "parameters", lambda: [])() if p.requires_grad]
            grads = torch.autograd.grad(out.square().sum(), xs + params)
            outs.append((out, grads))
        (o1, g1), (o2, g2) = outs
        assert_close(f"{sorted(kw)} out", o1.double().cpu(), o2.cpu(), rtol=1e-5)
        for a, b in zip(g1, g2):
            assert_close(f"{sorted(kw)} grad", a.double().cpu(), b.cpu(), rtol=1e-4)
    # streaming: two calls with the state between them equal one call
    rot = RotaryEmbedding(16)
    full = favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, kernel="triton")
    a, st = favor_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], W, causal=True, rotary=rot, chunk_size=16,
                            return_state=True, kernel="triton")
    b = favor_attention(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], W, causal=True, rotary=rot, chunk_size=16,
                        initial_state=st, kernel="triton")
    assert_close("streamed", full.double().cpu(), torch.cat((a, b), 2).cpu(), rtol=1e-5)


def test_layer_takes_the_triton_kernel_and_the_arguments_are_checked():
    torch.manual_seed(0)
    layers = [LinearRotaryAttention(16, heads=2, dim_head=8, nb_features=16, causal=True, kernel=kn).to(DEVICE)
              for kn in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 40, 16, device=DEVICE)
    assert_close("layer", layers[0](x).double().cpu(), layers[1](x).cpu(), rtol=1e-5)
    q = torch.randn(1, 1, 20, 8, device=DEVICE)
    W = FavorPlus(8, 16, seed=0).projection.to(DEVICE)
    with pytest.raises(ValueError, match="kernel: expected"):
        favor_attention(q, q, q, W, causal=True, kernel="cuda")
    with pytest.raises(ValueError, match="chunk_size: expected a power of two"):
        favor_attention(q, q, q, W, causal=True, kernel="triton", chunk_size=24)
    with pytest.raises(ValueError, match="float32"):
        favor_attention(q.double(), q.double(), q.double(), W.double(), causal=True, kernel="triton")
    with pytest.raises(ValueError, match="kernel: expected"):
        LinearRotaryAttention(16, kernel="fast")


@settings(max_examples=6, deadline=None)
@given(N=st.integers(1, 90), chunk=st.sampled_from([16, 32]), groups=st.integers(1, 3), rope=st.booleans(),
       holes=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_kernel_equals_the_torch_kernel_on_any_shape(N, chunk, groups, rope, holes, seed):
    """Any length (shorter than a chunk, ragged last groups), chunk and group size, masks with holes: the two
    kernels agree on outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (2 * torch.randn(1, 2, N, 8, generator=g) for _ in range(3))
    W = FavorPlus(8, 16, seed=seed).projection
    mask = (torch.rand(1, N, generator=g) > 0.3) if holes else None
    res = []
    for kernel in ("torch", "triton"):
        xs = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
        out = favor_attention(*xs, W.to(DEVICE), causal=True, rotary=RotaryEmbedding(16) if rope else None,
                              chunk_size=chunk, group_size=groups * chunk, kernel=kernel,
                              key_padding_mask=None if mask is None else mask.to(DEVICE))
        res.append((out, torch.autograd.grad(out.square().sum(), xs)))
    assert_close("out", res[0][0].double().cpu(), res[1][0].cpu(), rtol=1e-5)
    for a, b in zip(res[0][1], res[1][1]):  # atol: where the gradient is 0 by cancellation (N = 1: out = v), the
        # triton path sums the diagonal's and the normalizer's O(1) terms apart, the torch path before a product
        assert_close("grad", a.double().cpu(), b.cpu(), rtol=1e-4, atol=1e-4)
