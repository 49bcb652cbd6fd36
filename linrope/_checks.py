"""Argument checks shared by the library and the lab (private). Each raises naming the argument, what was
expected and what came: ``ValueError`` for a wrong value or shape, ``TypeError`` for a wrong kind of object.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a size or a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1, expected: str | None = None) -> int:
    """``value`` if it is an int >= ``minimum``, else ValueError: '{name}: expected {expected}, got {value!r}'
    (``expected`` defaults to 'a positive integer' for minimum 1, 'an integer >= {minimum}' otherwise)."""
    if not is_int(value) or value < minimum:
        expected = expected or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_group_size(value):
    """``value`` if it is None, ``"auto"`` or a positive int (the engine's ``group_size``), else ValueError."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    return check_int("group_size", value, 1, 'a positive integer, "auto" or None')


KERNELS = ("torch", "cpp", "triton")
PRECISIONS = ("float32", "tf32", "bfloat16")  # of the attention products (linrope._engine.products)


def check_kernel(value) -> str:
    """``value`` if it names one of ``KERNELS`` (the causal chunk products' implementation), else ValueError."""
    if not (isinstance(value, str) and value in KERNELS):
        raise ValueError(f'kernel: expected "torch", "cpp" or "triton", got {value!r}')
    return value


def check_precision(value) -> str:
    """``value`` if it names one of ``PRECISIONS``, else ValueError (what a device can do is checked per call)."""
    if not (isinstance(value, str) and value in PRECISIONS):
        raise ValueError(f'precision: expected "float32", "tf32" or "bfloat16", got {value!r}')
    return value


def check_number(name: str, value, ok: Callable[[float], bool], expected: str) -> float:
    """``value`` if it is a finite int or float (not a bool) with ``ok(value)``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_tensor(name: str, x, dims: int | None = 4) -> Tensor:
    """``x`` if it is a floating-point tensor (with ``dims`` dimensions, (B, H, N, dim) for 4; None: any)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor (B, H, N, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_qkv(names: tuple[str, str], q: Tensor, k: Tensor, v: Tensor, cross: bool = False) -> None:
    """q, k (B, H, N, d) and v (B, H, N, dv), named ``names`` and 'v' in the messages; with ``cross``, keys and
    values may have their own length M: k (B, H, M, d), v (B, H, M, dv)."""
    for name, x in zip((*names, "v"), (q, k, v)):
        check_tensor(name, x)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{names[0]}, {names[1]}: last dimensions differ: {tuple(q.shape)} vs {tuple(k.shape)}")
    if cross:
        if k.shape[:2] != q.shape[:2]:
            raise ValueError(f"{names[1]}: expected (B, H) = {tuple(q.shape[:2])} like {names[0]}, "
                             f"got {tuple(k.shape)}")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v: expected (B, H, M) = {tuple(k.shape[:3])} like {names[1]}, got {tuple(v.shape)}")
        return
    for name, x in ((names[1], k), ("v", v)):
        if x.shape[:3] != q.shape[:3]:
            raise ValueError(f"{name}: expected (B, H, N) = {tuple(q.shape[:3])} like {names[0]}, got {tuple(x.shape)}")


def check_mask(mask, B: int, N: int) -> Tensor | None:
    """A key padding mask: None, or a (B, N) bool tensor with True = keep."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask: expected a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask: expected shape (B, N) = ({B}, {N}), got {tuple(mask.shape)}")
    return mask
