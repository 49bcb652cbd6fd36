"""Would ``torch.compile`` (inductor's C++ backend) speed up the engine's elementwise passes? (issue 14)

The engine turns one group of queries into FAVOR+ features and their rotated copy in five passes after the
projection u = x Wᵀ: max over features, subtract, exp, and the multiply by the rotation (which writes the rotated
copy; the unrotated one stays for the normalizer). Inductor can fuse everything after the matmul into one loop that
writes both. This probe times, on one group of the bench's shape, interleaved over rounds:

* ``matmul``: u = x Wᵀ alone (the part no fusion removes);
* ``eager``: the same passes through the library's public ``favor_plus`` and ``apply_rotary`` (the engine's own
  sources are private: the lab measures what it can import);
* ``compiled``: the same matmul, then a ``torch.compile``'d function computing both outputs.

The engine keeps its eager path unless the compiled one wins clearly; ``python experiments/bench.py --fusion``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from linrope.features import favor_plus
from linrope.rotary import RotaryEmbedding, apply_rotary

__all__ = ["FusionResult", "fusion_probe"]


@dataclass
class FusionResult:
    shape: tuple[int, int, int, int]  # (B*H, G, r, d): one group
    matmul_ms: float
    eager_ms: float
    compiled_ms: float
    max_abs_diff: float  # compiled against eager, both outputs

    @property
    def elementwise_ratio(self) -> float:
        """Compiled over eager time of the passes after the matmul (< 1: compiling wins)."""
        return (self.compiled_ms - self.matmul_ms) / (self.eager_ms - self.matmul_ms)

    def markdown(self) -> str:
        BH, G, r, d = self.shape
        return (f"| one group (B·H={BH}, G={G}, r={r}, d={d}) | median ms |\n|---|---:|\n"
                f"| u = x Wᵀ alone | {self.matmul_ms:.3f} |\n"
                f"| eager: favor_plus + apply_rotary | {self.eager_ms:.3f} |\n"
                f"| torch.compile'd exp and rotation after the same matmul | {self.compiled_ms:.3f} |\n\n"
                f"Elementwise passes, compiled / eager: {self.elementwise_ratio:.2f} (max |difference| "
                f"{self.max_abs_diff:.1e}).")


def _fused(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fq = torch.exp(u - u.amax(-1, keepdim=True))
    pairs = fq.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return fq, torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


def fusion_probe(*, BH: int = 8, G: int = 128, r: int = 256, d: int = 64, rounds: int = 7, repeats: int = 50,
                 seed: int = 0) -> FusionResult:
    """Median milliseconds per group of the three ways above (medians of ``repeats`` calls, then over
    ``rounds`` interleaved rounds). Compiling takes seconds the first time (it is excluded)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, BH, G, d, generator=g)
    W = torch.randn(r, d, generator=g)
    cos, sin = RotaryEmbedding(r, interleaved=True).cos_sin(None, G, q.device)
    Ws = W * d**-0.25  # favor_plus scales x by d^(-1/4): folded into W for the matmul-only ways
    u = torch.empty(BH, G, r)
    x = q.view(BH, G, d)
    compiled = torch.compile(_fused, dynamic=False)

    def run_matmul():
        return torch.matmul(x, Ws.t(), out=u)

    def run_eager():
        f, _ = favor_plus(x, W, is_query=True)
        return f, apply_rotary(f, cos, sin, interleaved=True)

    def run_compiled():
        return compiled(torch.matmul(x, Ws.t(), out=u), cos, sin)

    e, c = run_eager(), run_compiled()
    diff = max((e[0] - c[0]).abs().max().item(), (e[1] - c[1]).abs().max().item())
    times = {"matmul": [], "eager": [], "compiled": []}
    fns = {"matmul": run_matmul, "eager": run_eager, "compiled": run_compiled}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            times[name].append(statistics.median(ts) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return FusionResult((BH, G, r, d), med["matmul"], med["eager"], med["compiled"], diff)
