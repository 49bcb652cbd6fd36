"""Benchmark cases and the FLOP model of the causal engine.

Each ``case_*`` factory builds inputs for one configuration and returns a zero-argument callable (forward, or
forward+backward with a random upstream gradient); ``lab.profiling.run_point`` times it in a fresh
process, naming it as in ``CASES``. Peers (performer-pytorch, pytorch-fast-transformers) are used only if
installed; nothing here is imported by the library itself.
"""

from __future__ import annotations

import math

import torch

from linrope.attention import LinearRotaryAttention, SoftmaxAttention
from linrope.features import FavorPlus
from linrope.functional import favor_attention
from linrope.rotary import RotaryEmbedding

__all__ = ["CASES", "peers_available", "causal_flops"]


# ---------------------------------------------------------------------------------------------- cases
def _qkv(n, b, h, d, device, seed=0, dtype="float32"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device, getattr(torch, dtype)).requires_grad_() for _ in range(3)]


def _run(make_out, inputs, backward):
    """A callable running ``make_out()`` (and its backward with a fixed random gradient)."""
    grad = None

    def step():
        nonlocal grad
        out = make_out()
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            for t in inputs:
                t.grad = None
        return out

    if not backward:
        return lambda: torch.no_grad()(make_out)()
    return step


def case_linrope(n, b=1, h=8, d=64, r=256, causal=True, rope="features", backward=True, device="cpu", decay=None,
                 group_size=None, kernel=None, precision=None, **_):
    """``favor_attention``: eq. 19 (rope='features'), learned rotations ('learned': ``LearnedRotary``, its
    angles differentiated too), RoPE before the features ('inputs') or none (None); ``decay``: a gamma, or
    'multiscale' (RetNet's per head); ``group_size`` as in the function (an 'auto' tuning runs in the untimed
    warm-up of the first process, later ones read the cache); ``kernel`` and ``precision`` as in the function
    (None: its default).
    Keywords beyond n, causal and rope need a library that has them."""
    q, k, v = _qkv(n, b, h, d, device)
    W = FavorPlus(d, r, seed=0).projection.to(device)
    feat = RotaryEmbedding(r) if rope == "features" else None
    if rope == "learned":
        from linrope.rotary import LearnedRotary
        feat = LearnedRotary(r, h).to(device)
    inp = RotaryEmbedding(d) if rope == "inputs" else None
    kw = {} if group_size is None else {"group_size": group_size}
    if kernel is not None:
        kw["kernel"] = kernel
    if precision is not None:
        kw["precision"] = precision
    if decay is not None:
        from linrope.attention import multiscale_decays
        kw["decay"] = multiscale_decays(h) if decay == "multiscale" else decay

    def out():
        qq, kk = (inp.rotate(q), inp.rotate(k)) if inp is not None else (q, k)
        return favor_attention(qq, kk, v, W, causal=causal, rotary=feat, **kw)
    return _run(out, (q, k, v), backward)


def case_sdpa(n, b=1, h=8, d=64, causal=True, backward=True, device="cpu", dtype="float32", **_):
    """torch's ``scaled_dot_product_attention`` on the same q, k, v in ``dtype`` (the backend it picks: flash on
    CPU; on CUDA, memory-efficient for float32 and FlashAttention for half types)."""
    q, k, v = _qkv(n, b, h, d, device, dtype=dtype)
    return _run(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                (q, k, v), backward)


def case_naive_softmax(n, b=1, h=8, d=64, causal=True, backward=True, device="cpu", **_):
    """Softmax attention with the N x N matrix materialised (the textbook reference)."""
    q, k, v = _qkv(n, b, h, d, device)

    def out():
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
        return s.softmax(-1) @ v
    return _run(out, (q, k, v), backward)


def case_layer(n, kind="linear", dim=512, heads=8, dim_head=64, r=256, causal=True, backward=True, device="cpu",
               options=None, **_):
    """The layers users import: ``LinearRotaryAttention`` (eq. 19; ``options``: its keywords, e.g. decay, gate,
    rope_learned, selective) or ``SoftmaxAttention`` (SDPA + RoPE)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = LinearRotaryAttention(dim, heads=heads, dim_head=dim_head, nb_features=r, causal=causal,
                                      **(options or {}))
    else:
        layer = SoftmaxAttention(dim, heads=heads, dim_head=dim_head, causal=causal)
    layer = layer.to(device)
    x = torch.randn(1, n, dim, device=device, requires_grad=True)
    params = [x, *layer.parameters()]
    return _run(lambda: layer(x), params, backward)


def _performer(d, r, causal, device):
    from performer_pytorch.performer_pytorch import FastAttention
    torch.manual_seed(0)
    return FastAttention(dim_heads=d, nb_features=r, causal=causal).to(device)


def case_performer(n, b=1, h=8, d=64, r=256, causal=True, path="default", backward=True, device="cpu", **_):
    """performer-pytorch ``FastAttention``: path 'default' is what it picks itself (on CPU the O(N r dv) fallback
    ``causal_linear_attention_noncuda``); 'ft' forces fast-transformers' ``CausalDotProduct`` (native CPU kernel)
    with its cumsum denominator. No RoPE (performer rotates q, k outside FastAttention)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning when its CUDA kernel is missing
        fa = _performer(d, r, causal, device)
    if causal and path == "ft":
        from performer_pytorch.performer_pytorch import causal_linear_attention
        fa.causal_linear_fn = causal_linear_attention
    q, k, v = _qkv(n, b, h, d, device)
    return _run(lambda: fa(q, k, v), (q, k, v), backward)


def case_matmul(n=2048, device="cpu", **_):
    """A square float32 matmul: the machine's reference FLOP rate."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda: a @ b


CASES = {name: f"{__name__}:case_{name}" for name in ("linrope", "sdpa", "naive_softmax", "layer", "performer",
                                                       "matmul")}  # 'module:function', as run_point takes them


def peers_available() -> dict:
    """Which peer libraries import here."""
    found = {}
    for name, module in (("performer-pytorch", "performer_pytorch"),
                         ("fast-transformers", "fast_transformers.causal_product")):
        try:
            __import__(module)
            found[name] = True
        except Exception:  # an import of a compiled extension can fail in many ways
            found[name] = False
    return found


# ---------------------------------------------------------------------------------------------- FLOPs
def causal_flops(n: int, heads: int = 8, d: int = 64, r: int = 256, dv: int = 64, chunk: int = 64,
                 batch: int = 1, rotary: bool = True) -> float:
    """Useful FLOPs of causal ``favor_attention``, forward + backward, recomputation not counted.

    Per position and head (C = chunk; a matmul of m x k by k x n counts 2 m k n):

        forward   features q, k          2 * 2 d r
                  intra scores Q K^T     2 C r          (the whole C x C block)
                  intra A V              2 C dv
                  inter Q S, update K^T V  2 * 2 r dv
                  exp 2r, normalizer 3r, rotation of q and k 2 * 3r (with RoPE)
        backward  features q, k          2 * 2 d r
                  dA, A^T dG             2 * 2 C dv
                  dA K, dA^T Q           2 * 2 C r
                  G S^T, Q^T G, V dS^T, K dS   4 * 2 r dv
                  normalizer ~6r, rotations 2 * 3r (with RoPE)
    """
    fwd = 4 * d * r + 2 * chunk * r + 2 * chunk * dv + 4 * r * dv + 5 * r + (6 * r if rotary else 0)
    bwd = 4 * d * r + 4 * chunk * dv + 4 * chunk * r + 8 * r * dv + 6 * r + (6 * r if rotary else 0)
    return float(n * heads * batch * (fwd + bwd))
