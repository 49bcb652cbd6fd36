"""The engine's attention products at a chosen precision (private; ``precision=`` of the functions and the layer).

Only the products that carry eq. 19's numerator go through here: the chunk scores Q K^T, the values they weigh,
the state Q S and its update K^T V, and their gradients. Features, their log-scale references, the normalizer and
every running sum stay in float32 (or float64), so the rows' division and the distance-0 terms (taken unrotated
from the normalizer's float32 products) keep their precision.

* ``"float32"``: ``torch.bmm`` as it is (CUDA cores, or a CPU's FMA units).
* ``"tf32"``: the same call with TF32 tensor cores allowed (inputs rounded to 10 mantissa bits, float32 sums).
* ``"bfloat16"``: inputs cast to bfloat16 (8 bits), products summed in float32 (``out_dtype``).

Both lowered precisions are CUDA tensor-core formats: the functions refuse them elsewhere. For the tests, a CPU
*emulates* them (``EMULATE``): the inputs rounded as the tensor cores round them, then float32 products, which is
the same arithmetic up to the order of the sums.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

EMULATE = False  # tests: a CPU runs "tf32" / "bfloat16" by rounding the inputs (the functions refuse it otherwise)


def _round_tf32(x: Tensor) -> Tensor:
    """x rounded to TF32 (10 explicit mantissa bits, round half away from zero, as the conversion to tensor cores
    does), kept in float32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(x.shape)


@contextlib.contextmanager
def _tf32_allowed():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _lowered(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """a @ b (batched) at ``precision`` ("tf32" or "bfloat16"), float32 out."""
    if a.device.type == "cuda":
        if precision == "bfloat16":
            return torch.bmm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
        with _tf32_allowed():
            return torch.bmm(a, b)
    if precision == "bfloat16":
        return torch.bmm(a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float())
    return torch.bmm(_round_tf32(a), _round_tf32(b))


def bmm(a: Tensor, b: Tensor, precision: str, out: Tensor | None = None) -> Tensor:
    """``torch.bmm(a, b, out=out)`` at ``precision``."""
    if precision == "float32":
        return torch.bmm(a, b, out=out)
    c = _lowered(a, b, precision)
    return c if out is None else out.copy_(c)


def baddbmm_(c: Tensor, a: Tensor, b: Tensor, precision: str) -> Tensor:
    """``c.baddbmm_(a, b)`` at ``precision`` (the sum into c in c's dtype)."""
    if precision == "float32":
        return c.baddbmm_(a, b)
    return c.add_(_lowered(a, b, precision))


def baddbmm(c: Tensor, a: Tensor, b: Tensor, precision: str) -> Tensor:
    """``torch.baddbmm(c, a, b)`` (a new tensor) at ``precision``."""
    if precision == "float32":
        return torch.baddbmm(c, a, b)
    return c + _lowered(a, b, precision)
