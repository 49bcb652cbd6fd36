"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864).

A rotation R_m acts on pairs of coordinates of a ``dim``-vector at position m, pair i turning by the angle
``m * theta_i / scale`` with ``theta_i = base ** (-2 i / dim)``. Two pairings exist in the wild:

* ``interleaved=True``: pairs (2i, 2i+1), as in the RoFormer paper, rotary-embedding-torch and HF RoFormer;
* ``interleaved=False``: pairs (i, i + dim/2), the "rotate_half" layout of GPT-NeoX and LLaMA.

Angles are computed in float64 and cos/sin stored in float32 (float64 for float64 input), whatever the input
dtype: at position 16384 a float16 angle would be off by whole radians, and at 10**6 a float32 one by up to 0.03.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._checks import check_int, check_number, check_tensor, is_int

__all__ = ["RotaryEmbedding", "LearnedRotary", "apply_rotary", "resolve_positions", "SCALINGS"]

SCALINGS = ("linear", "ntk", "yarn")
MAX_POSITION = 2**53  # float64 holds every integer position up to here: the angles stay exact


def resolve_positions(positions: int | Tensor | None, n: int, device: torch.device, batch: int | None = None
                      ) -> Tensor:
    """Turn the ``positions`` argument accepted across linrope into an int64 tensor: (n,), or (batch, n).

    ``None`` means 0..n-1, an int ``p`` means p..p+n-1 (decoding, shifted windows), a tensor must be integer, of
    shape (n,), or (batch, n) for positions of each example when ``batch`` is given (packed or left-padded
    batches).
    """
    if positions is None:
        return torch.arange(n, device=device)
    if isinstance(positions, bool) or not isinstance(positions, (int, Tensor)):
        raise TypeError("positions: expected None, an int offset or an integer tensor of shape (N,) or (B, N), "
                        f"got {type(positions).__name__}")
    if isinstance(positions, int):
        if not -MAX_POSITION <= positions <= MAX_POSITION - n:
            raise ValueError(f"positions: expected an offset p with |p| + N <= 2**53 (angles come from float64 "
                             f"positions, exact up to there), got {positions} for N = {n}")
        return torch.arange(positions, positions + n, device=device)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected an integer tensor, got dtype {positions.dtype}")
    shapes = [(n,)] + ([] if batch is None else [(batch, n)])
    if tuple(positions.shape) not in shapes:
        raise ValueError(f"positions: expected shape {' or '.join(map(str, shapes))} to match the sequence length, "
                         f"got {tuple(positions.shape)}")
    return positions.to(device=device, dtype=torch.long)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, inverse: bool = False) -> Tensor:
    """Rotate the last dimension of ``x`` (..., N, D) by angles given as ``cos``, ``sin`` of shape (N, D/2), or
    (B, N, D/2) for x (B, H, N, D) (positions per example, shared by the heads).

    ``inverse=True`` applies R^T (the rotation by minus the angle): the backward of a rotation.
    The arithmetic runs in ``cos.dtype``; the result has ``x.dtype``.
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
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
        scale: the context extension factor s (run at s times the trained length), applied as ``scaling`` says.
        scaling: how ``scale`` stretches the frequencies:
            'linear': position interpolation, every theta_i / s (Chen et al. 2023);
            'ntk': NTK-aware, base * s^(dim / (dim - 2)): high frequencies kept, the lowest one divided by s;
            'yarn': YaRN (Peng et al., arXiv 2309.00071): pair i is interpolated (theta_i / s) when its
            wavelength 2 pi / theta_i exceeds ``original_length`` / ``yarn_beta_slow``, kept when it is shorter
            than ``original_length`` / ``yarn_beta_fast``, and blended linearly in between; with it comes
            ``attention_factor`` = 0.1 ln s + 1, the factor by which YaRN scales q and k (the layers apply it
            where q and k meet in a dot product: softmax attention and rope='inputs').
        original_length: the trained context length, for 'yarn' (required there).
        yarn_beta_fast, yarn_beta_slow: YaRN's ramp bounds, in rotations per ``original_length`` (32 and 1).
        rotary_fraction: rotate only the first round(fraction * dim / 2) pairs (GPT-NeoX's ``rotary_pct``); the
            other pairs keep angle 0, i.e. pass through as pure content channels.
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
                 max_cached: int = 8192, scaling: str = "linear", original_length: int | None = None,
                 yarn_beta_fast: float = 32.0, yarn_beta_slow: float = 1.0, rotary_fraction: float = 1.0):
        super().__init__()
        if check_int("dim", dim, 1, "a positive even integer") % 2:
            raise ValueError(f"dim: expected a positive even integer, got {dim!r}")
        check_number("base", base, lambda b: b > 1, "a finite number > 1")
        check_number("scale", scale, lambda s: s > 0, "a finite number > 0")
        check_int("max_cached", max_cached, 0, "an integer >= 0 (0 disables the cache)")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling: expected one of {SCALINGS}, got {scaling!r}")
        if scaling == "ntk" and dim < 4:
            raise ValueError(f"dim: expected at least 4 with scaling='ntk' (it scales the base by "
                             f"s^(dim / (dim - 2))), got {dim}")
        if scaling == "yarn":
            check_int("original_length", original_length, 1, "the trained context length (a positive integer) "
                                                                "with scaling='yarn'")
            check_number("yarn_beta_slow", yarn_beta_slow, lambda b: b > 0, "a number > 0")
            check_number("yarn_beta_fast", yarn_beta_fast, lambda b: b > yarn_beta_slow,
                         f"a number > yarn_beta_slow ({yarn_beta_slow})")
        check_number("rotary_fraction", rotary_fraction, lambda f: 0 < f <= 1, "a number in (0, 1]")
        self.dim, self.base, self.interleaved, self.scale = dim, float(base), bool(interleaved), float(scale)
        self.max_cached, self.scaling, self.original_length = max_cached, scaling, original_length
        self.yarn_beta_fast, self.yarn_beta_slow = float(yarn_beta_fast), float(yarn_beta_slow)
        self.rotary_fraction = float(rotary_fraction)
        self.rotated_pairs = max(1, round(rotary_fraction * dim / 2))
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        extra = "" if self.scaling != "yarn" else f", original_length={self.original_length}"
        part = "" if self.rotary_fraction == 1 else f", rotary_fraction={self.rotary_fraction:g}"
        return (f"dim={self.dim}, base={self.base:g}, interleaved={self.interleaved}, scale={self.scale:g}, "
                f"scaling={self.scaling!r}{extra}{part}, max_cached={self.max_cached}")

    def signature(self) -> tuple:
        """What a state summed under this rotation depends on (``AttentionState.signature``)."""
        return ("rope", self.dim, self.base, self.interleaved, self.scale, self.scaling, self.original_length,
                self.yarn_beta_fast, self.yarn_beta_slow, self.rotary_fraction)

    @property
    def attention_factor(self) -> float:
        """YaRN's scale of q and k (0.1 ln s + 1 for s > 1); 1 for the other scalings."""
        return 0.1 * math.log(self.scale) + 1.0 if self.scaling == "yarn" and self.scale > 1 else 1.0

    def frequencies(self, device=None) -> Tensor:
        """theta_i per pair (dim/2,), float64, after scaling; 0 for the pairs left unrotated."""
        theta = self.base ** (-torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
        s = self.scale
        if self.scaling == "linear":
            theta = theta / s
        elif self.scaling == "ntk":
            theta = (self.base * s ** (self.dim / (self.dim - 2))) ** (
                -torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
        else:  # yarn: rotations per trained context decide each pair's blend of interpolated and original
            rotations = self.original_length * theta / (2 * math.pi)
            keep = ((rotations - self.yarn_beta_slow) / (self.yarn_beta_fast - self.yarn_beta_slow)).clamp(0, 1)
            theta = theta / s * (1 - keep) + theta * keep
        theta[self.rotated_pairs:] = 0.0
        return theta

    def _angles(self, positions: Tensor) -> Tensor:
        return positions.to(torch.float64)[..., None] * self.frequencies(positions.device)  # (..., N, dim/2)

    def _direct(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = self._angles(positions)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def cos_sin(self, positions: int | Tensor | None, n: int, device: torch.device, dtype: torch.dtype = torch.float32,
                batch: int | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles at ``positions`` (see ``resolve_positions``), each of shape (n, dim/2), or
        (batch, n, dim/2) for positions given per example.

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
        pos = resolve_positions(positions, n, device, batch)
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
        """Apply R_m to ``x`` of shape (..., N, dim); positions as in ``resolve_positions``, (B, N) ones for x of
        shape (B, H, N, dim). Same dtype out."""
        check_tensor("x", x, dims=None)
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., N, {self.dim}), got {tuple(x.shape)}")
        batch = x.shape[0] if x.dim() == 4 else None
        cos, sin = self.cos_sin(positions, x.shape[-2], x.device, x.dtype, batch)
        return apply_rotary(x, cos, sin, interleaved=self.interleaved, inverse=inverse)

    def forward(self, x: Tensor, positions: int | Tensor | None = None) -> Tensor:
        return self.rotate(x, positions)


class LearnedRotary(nn.Module):
    """A learned rotation of interleaved feature pairs, per head: eq. 19 with learned frequencies and phases.

    Query pair i of head h at position m turns by theta_hi m + phase_hi, key pair i at position n by theta_hi n,
    so (R'_m qf).(R_n kf) = Re sum_i c_i e^(i(theta_hi (m - n) + phase_hi)), c_i = z_q,i conj(z_k,i): still a
    function of m - n only, for every random draw (eq. 19's exact relative position), while the normalizer stays
    unrotated. The phase lets a pair peak at a distance its fixed RoPE angle cannot reach with positive features
    (whose c_i lie in Re c >= 0); learning theta moves the kernels' frequencies (LRPE, FLT). Use as ``rotary=``
    of ``linear_attention`` / ``favor_attention`` (causal) or through ``LinearRotaryAttention(rope_learned=True)``.

    Args:
        dim: the number of features r (even): r/2 pairs per head.
        heads: H; each head learns its own theta and phase.
        base: theta initialised at RoPE's base^(-2i/dim) (``init`` overrides: a ``RotaryEmbedding``, whose
            scaled frequencies are used).
        learn_theta, learn_phase: which of theta (H, dim/2) and phase (H, dim/2, initialised at 0) are learned
            (requires_grad); both are parameters either way, so state_dicts have one layout.
    """

    interleaved = True  # feature order is arbitrary for random features: the engine's pairing is used

    def __init__(self, dim: int, heads: int, base: float = 10000.0, learn_theta: bool = True,
                 learn_phase: bool = True, init: RotaryEmbedding | None = None):
        super().__init__()
        check_int("heads", heads)
        if init is None:
            init = RotaryEmbedding(dim, base)
        elif init.dim != dim:
            raise ValueError(f"init: expected a RotaryEmbedding of dim {dim}, got dim {init.dim}")
        self.dim, self.heads = init.dim, heads
        self.attention_factor = init.attention_factor  # YaRN's factor on q and k when initialised from it
        self.theta = nn.Parameter(init.frequencies().float().repeat(heads, 1), requires_grad=learn_theta)
        self.phase = nn.Parameter(torch.zeros(heads, dim // 2), requires_grad=learn_phase)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"

    def signature(self) -> tuple:
        """What a state summed under these rotations depends on (their values are parameters: not part of it)."""
        return ("learned", self.dim, self.heads)


def check_rotary(rotary, dim: int, what: str, learned: bool = False) -> None:
    """None, or a ``RotaryEmbedding`` of dim ``dim`` (``what`` says what that dim is); with ``learned``, a
    ``LearnedRotary`` too (eq. 19's rotation of features, where the engine turns the pairs itself)."""
    if rotary is None:
        return
    kinds = (RotaryEmbedding, LearnedRotary) if learned else RotaryEmbedding
    if not isinstance(rotary, kinds):
        expected = "a linrope.RotaryEmbedding, a LearnedRotary" if learned else "a linrope.RotaryEmbedding"
        raise TypeError(f"rotary: expected {expected} or None, got {type(rotary).__name__}")
    if rotary.dim != dim:
        raise ValueError(f"rotary: its dim ({rotary.dim}) must equal {what} ({dim})")
