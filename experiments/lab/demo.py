"""The whole stack on one long sequence (``experiments/demo.py``): the layers, causal and bidirectional, against the
softmax baseline with the same weights, with time and peak memory."""

from __future__ import annotations

import resource
import time

import torch

from linrope import LinearRotaryAttention, SoftmaxAttention

__all__ = ["demo"]

WHAT = {"inputs": "RoPE on q,k (vs softmax+RoPE)", "features": "eq. 19 (vs softmax, no RoPE)*",
        None: "no RoPE (vs softmax, no RoPE)"}


def demo(length: int = 8192, dim: int = 256, heads: int = 4, features: int = 256, seed: int = 0, say=print) -> None:
    """Run each layer forward+backward on one sequence of ``length`` and ``say`` a line per layer: its relative
    error against softmax (RoPE on q, k against softmax + RoPE; eq. 19 and no RoPE against softmax without RoPE)
    and its time; then this process's peak RSS."""
    torch.manual_seed(seed)
    x = 0.5 * torch.randn(1, length, dim)
    dh = dim // heads
    say(f"N={length} dim={dim} heads={heads} r={features}, float32, forward+backward")
    say(f"{'causal':>7} {'layer':<34} {'rel. error vs softmax':>22} {'time s':>8}")
    for causal in (False, True):
        refs = {}
        for rope in ("inputs", None):
            soft = SoftmaxAttention(dim, heads=heads, dim_head=dh, causal=causal, rope=rope)
            if rope is None:
                soft.load_state_dict(weights)
            weights = soft.state_dict()
            refs[rope] = soft(x).detach()
        for rope in ("inputs", "features", None):
            lin = LinearRotaryAttention(dim, heads=heads, dim_head=dh, nb_features=features, causal=causal, rope=rope,
                                        seed=seed)
            lin.load_state_dict(weights, strict=False)  # same q/k/v/out weights as the softmax layers
            target = refs["inputs" if rope == "inputs" else None]
            t = time.perf_counter()
            y = lin(x)
            y.sum().backward()
            dt = time.perf_counter() - t
            err = ((y.detach() - target).norm() / target.norm()).item()
            say(f"{str(causal):>7} {WHAT[rope]:<34} {err:>22.3f} {dt:>8.2f}")
    say(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    say("* eq. 19 is a different model from softmax+RoPE: its error only shows it stays close in scale.")
