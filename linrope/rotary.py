"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864).

A rotation R_m acts on pairs of coordinates of a ``dim``-vector at position m, pair i turning by the angle
``m * theta_i / scale`` with ``theta_i = base ** (-2 i / dim)``. Two pairings exist in the wild:

* ``interleaved=True``: pairs (2i, 2i+1), as in the RoFormer paper, rotary-embedding-torch and HF RoFormer;
* ``interleaved=False``: pairs (i, i + dim/2), the "rotate_half" layout of GPT-NeoX and LLaMA.

Angles are computed in float64 and cos/sin stored in float32 (float64 for float64 input), whatever the input
dtype: at position 16384 a float16 angle would be off by whole radians, and at 10**6 a float32 one by up to 0.03.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_int, check_number, check_tensor, is_int

__all__ = ["RotaryEmbedding", "apply_rotary", "resolve_positions"]


def resolve_positions(positions: int | Tensor | None, n: int, device: torch.device) -> Tensor:
    """Turn the ``positions`` argument accepted across linrope into a 1-D int64 tensor of length ``n``.

    ``None`` means 0..n-1, an int ``p`` means p..p+n-1 (decoding, shifted windows), a tensor must be 1-D,
    integer and of length ``n``.
    """
    if positions is None:
        return torch.arange(n, device=device)
    if isinstance(positions, bool) or not isinstance(positions, (int, Tensor)):
        raise TypeError("positions: expected None, an int offset or a 1-D integer tensor, "
                        f"got {type(positions).__name__}")
    if isinstance(positions, int):
        return torch.arange(positions, positions + n, device=device)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected an integer tensor, got dtype {positions.dtype}")
    if positions.dim() != 1 or positions.shape[0] != n:
        raise ValueError(f"positions: expected shape ({n},) to match the sequence length, got {tuple(positions.shape)}")
    return positions.to(device=device, dtype=torch.long)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, inverse: bool = False) -> Tensor:
    """Rotate the last dimension of ``x`` (..., N, D) by angles given as ``cos``, ``sin`` of shape (N, D/2).

    ``inverse=True`` applies R^T (the rotation by minus the angle): the backward of a rotation.
    The arithmetic runs in ``cos.dtype``; the result has ``x.dtype``.
    """
    xc = x.to(cos.dtype)
    if inverse:
        sin = -sin
    if interleaved:
        x0, x1 = xc.unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, D/2) each
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = xc.chunk(2, dim=-1)
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE for vectors of size ``dim`` (even): ``rotate(x, positions)`` applies R_m to x[..., m, :].

    Args:
        dim: size of the rotated vectors (the head dim for softmax attention, the number of random
            features ``r`` for eq. 19).
        base: frequency base, ``theta_i = base ** (-2 i / dim)``.
        interleaved: pair (2i, 2i+1) if True (RoFormer), (i, i + dim/2) if False (GPT-NeoX / LLaMA).
        scale: linear position interpolation: positions are multiplied by ``1 / scale``; use ``scale = s``
            to run at ``s`` times the trained length.
        max_cached: positions in [0, max_cached) are served from cos/sin tables cached per device and dtype,
            grown to the next power of two but never past ``max_cached`` rows: at most ``max_cached * dim * 4``
            bytes per device in float32 (twice that in float64). Any other request (a position past the table or
            negative, or a tensor of positions on an accelerator, whose range would cost a host sync to check)
            gets the angles of just its positions, computed on the spot: decoding at position 10**6 holds no
            more memory than at position 10. 0 disables the cache.

    Angles are computed in float64 on both paths, with the same arithmetic, so both give the same values. The
    cache is not part of the state dict (a pure function of the constructor arguments) and is bypassed under
    ``torch.compile``: there the angles of the requested positions are computed inside the graph.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = True, scale: float = 1.0,
                 max_cached: int = 8192):
        super().__init__()
        if check_int("dim", dim, 1, "a positive even integer") % 2:
            raise ValueError(f"dim: expected a positive even integer, got {dim!r}")
        check_number("base", base, lambda b: b > 1, "a finite number > 1")
        check_number("scale", scale, lambda s: s > 0, "a finite number > 0")
        check_int("max_cached", max_cached, 0, "an integer >= 0 (0 disables the cache)")
        self.dim, self.base, self.interleaved, self.scale = dim, float(base), bool(interleaved), float(scale)
        self.max_cached = max_cached
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, base={self.base:g}, interleaved={self.interleaved}, scale={self.scale:g}, "
                f"max_cached={self.max_cached}")

    def _angles(self, positions: Tensor) -> Tensor:
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim)
        return positions.to(torch.float64)[:, None] * (inv_freq / self.scale)  # (N, dim/2)

    def _direct(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = self._angles(positions)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def cos_sin(self, positions: int | Tensor | None, n: int, device: torch.device, dtype: torch.dtype = torch.float32
                ) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles at ``positions`` (see ``resolve_positions``), each of shape (n, dim/2).

        ``dtype`` is the compute dtype: float64 gives float64 tables, anything else float32. Never reads a
        tensor's value on the host, except the positions of a CPU tensor (where that costs no device sync).
        """
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        device = torch.device(device)
        # Dynamo cannot trace the Python-side cache mutation; inside a compiled graph the angles are cheap.
        cacheable = not torch.compiler.is_compiling()
        if positions is None or is_int(positions):
            start = 0 if positions is None else positions
            if cacheable and 0 <= start and start + n <= self.max_cached:
                cos, sin = self._table(start + n, device, dtype)
                return cos[start:start + n], sin[start:start + n]
        pos = resolve_positions(positions, n, device)
        if cacheable and n and isinstance(positions, Tensor) and pos.device.type == "cpu":
            lo, hi = (int(v) for v in pos.aminmax())
            if lo >= 0 and hi < self.max_cached:
                cos, sin = self._table(hi + 1, device, dtype)
                return cos[pos], sin[pos]
        return self._direct(pos, dtype)

    def _table(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Tables of at least ``length`` <= ``max_cached`` rows."""
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = min(max(1 << max(length - 1, 0).bit_length(), 256), self.max_cached)
            cached = self._cache[key] = self._direct(torch.arange(size, device=device), dtype)
        return cached

    def cache_nbytes(self) -> int:
        """Bytes held by the cached cos/sin tables, over all devices and dtypes."""
        return sum(t.numel() * t.element_size() for pair in self._cache.values() for t in pair)

    def rotate(self, x: Tensor, positions: int | Tensor | None = None, *, inverse: bool = False) -> Tensor:
        """Apply R_m to ``x`` of shape (..., N, dim); positions as in ``resolve_positions``. Same dtype out."""
        check_tensor("x", x, dims=None)
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., N, {self.dim}), got {tuple(x.shape)}")
        cos, sin = self.cos_sin(positions, x.shape[-2], x.device, x.dtype)
        return apply_rotary(x, cos, sin, interleaved=self.interleaved, inverse=inverse)

    def forward(self, x: Tensor, positions: int | Tensor | None = None) -> Tensor:
        return self.rotate(x, positions)
