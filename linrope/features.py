"""Feature maps phi: (B, H, N, d) -> (B, H, N, r) for linear attention.

Every map returns ``(features, log_scale)``. For queries ``features`` is phi(q) up to a positive factor per row,
which cancels between the numerator and the denominator of attention, and ``log_scale`` is None. For keys,
``features * exp(log_scale)[..., None]`` is phi(k) up to one constant factor for all keys; exp-type maps carry
the magnitude in ``log_scale`` so that nothing overflows before attention can pick a safe reference
(``linrope.functional.linear_attention(..., k_logscale=...)``). Bounded maps return ``log_scale=None``.

Maps:
  * ``FavorPlus``: positive random features for exp(q.k / sqrt(d)) (Performer's FAVOR+, Choromanski et al. 2021)
  * ``FavorTrig``: the original sin/cos random Fourier features (signed; shown for ablations: their normalizer
    can be zero or negative, the reason FAVOR+ exists)
  * ``ReLUFeatures``: relu(W x~) + kernel_eps (Performer's "generalized attention")
  * ``EluFeatures``: elu(x) + 1 (Katharopoulos et al. 2020), r = d, no projection
  * ``Hedgehog``: a trained projection per head followed by a softmax over features, [softmax(W x~),
    softmax(-W x~)] (Zhang et al. 2024, "The Hedgehog & the Porcupine"): for distilling softmax attention

Random maps hold their projection as a buffer (saved with the state dict) drawn reproducibly from ``seed``;
``redraw()`` draws the next one. A forward never changes a map: a training loop calls
``redraw_projections(model, step)`` after optimizer step ``step``, which redraws every map whose
``redraw_interval`` (counted in optimizer steps) divides ``step``. Redrawing inside forward would make
activation checkpointing recompute with other features than the first pass, and split one optimizer step's
micro-batches between two projections.

Features are computed in float32 (float64 for float64 input), with autocast disabled: under bfloat16 autocast
the projection matmul would otherwise run in bfloat16 and exp() would turn its rounding into errors of several
percent.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int, check_number, check_tensor, is_int

__all__ = [
    "FeatureMap", "FavorPlus", "FavorTrig", "ReLUFeatures", "EluFeatures", "Hedgehog", "FEATURE_MAPS",
    "make_feature_map",
    "gaussian_orthogonal_matrix", "favor_plus", "compute_dtype", "redraw_projections",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _full_precision(x: Tensor):
    """A context that turns autocast off on ``x``'s device (a no-op where that device has no autocast)."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()


def gaussian_orthogonal_matrix(nb_rows: int, dim: int, *, orthogonal: bool = True,
                               generator: torch.Generator | None = None) -> Tensor:
    """A (nb_rows, dim) float64 matrix whose rows are marginally N(0, I_dim).

    Orthogonal: stacked blocks of ``dim`` orthonormal rows (QR of a Gaussian, sign-corrected so the rows are
    uniform on the sphere), each row rescaled by the norm of an independent Gaussian vector (chi-distributed),
    which keeps FAVOR+ unbiased while lowering its variance (Performer, Theorem 2).
    """
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if not orthogonal:
        return randn(nb_rows, dim)
    blocks = []
    for _ in range(math.ceil(nb_rows / dim)):
        q, r = torch.linalg.qr(randn(dim, dim))
        blocks.append((q * torch.sign(torch.diagonal(r))).t())
    directions = torch.cat(blocks)[:nb_rows]
    return directions * randn(nb_rows, dim).norm(dim=1, keepdim=True)


def favor_plus(x: Tensor, projection: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
    """FAVOR+ features of x (..., N, d) for the projection W (r, d).

    With x~ = x d^(-1/4) and u = x~ W^T, phi(x) = exp(u - |x~|^2/2) / sqrt(r). Returned: f = exp(u - max_i u)
    (entries in (0, 1], largest exactly 1) and, for keys, log_scale = max_i u - |x~|^2/2; the constant
    1/sqrt(r) and, for queries, the whole per-row factor are dropped because they cancel.
    Shapes: f (..., N, r), log_scale (..., N) or None. Computed in float32 (float64 for float64 input).
    """
    dt = compute_dtype(x)
    with _full_precision(x):
        xs = x.to(dt) * x.shape[-1] ** -0.25
        u = xs @ projection.to(dt).t()
        m = u.amax(-1, keepdim=True)
        f = torch.exp(u - m)
        if is_query:
            return f, None
        return f, m.squeeze(-1) - 0.5 * (xs * xs).sum(-1)


class FeatureMap(nn.Module):
    """Base class: ``forward(x, *, is_query)`` -> (features (B, H, N, r), log_scale (B, H, N) or None)."""

    nb_features: int

    def forward(self, x: Tensor, *, is_query: bool) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


def _check_dim(name: str, value) -> int:
    return check_int(name, value, 1, "an integer >= 1")


def _check_input(x, dim: int) -> None:
    check_tensor("x", x, dims=None)
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x: expected last dimension {dim} (the feature map's dim), got shape {tuple(x.shape)}")


def _check_interval(value) -> int | None:
    if value is not None:
        check_int("redraw_interval", value, 1, "None or an integer >= 1 (optimizer steps)")
    return value


class _RandomProjection(FeatureMap):
    """Holds W (nb_projections, dim) as a buffer, its seed and how many redraws happened.

    ``redraw_interval`` is read only by ``redraw_projections``; nothing here redraws by itself.
    """

    def __init__(self, dim: int, nb_projections: int, nb_features: int, orthogonal: bool, seed: int | None,
                 redraw_interval: int | None):
        super().__init__()
        self.dim = _check_dim("dim", dim)
        self.nb_features = nb_features
        self.orthogonal = bool(orthogonal)
        self.redraw_interval = _check_interval(redraw_interval)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        elif not is_int(seed):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        elif not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected an int in [0, 2**63) (it is kept as an int64 buffer), got {seed}")
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("redraws", torch.tensor(0, dtype=torch.long))
        self.register_buffer("projection", self._draw(nb_projections, torch.Generator().manual_seed(seed)))

    def _draw(self, rows: int, generator: torch.Generator) -> Tensor:
        return gaussian_orthogonal_matrix(rows, self.dim, orthogonal=self.orthogonal, generator=generator).float()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection in place. Without a generator the k-th redraw is a pure function of (seed, k),
        so replicas that share a seed (e.g. DDP ranks) redraw identically."""
        self.redraws += 1
        if generator is None:
            generator = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(self.redraws)) % 2**63)
        new = self._draw(self.projection.shape[0], generator)
        self.projection.copy_(new.to(self.projection.device, self.projection.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts written before redraws moved to optimizer steps carry a forward counter, ``steps``, that
        # nothing reads any more; dropping it keeps strict loading of old checkpoints working.
        state_dict.pop(prefix + "steps", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, nb_features={self.nb_features}, orthogonal={self.orthogonal}, "
                f"redraw_interval={self.redraw_interval}")

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.dim)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x~ = x d^(-1/4) and u = x~ W^T in the compute dtype (called with autocast off)."""
        xs = x.to(compute_dtype(x)) * self.dim ** -0.25
        return xs, xs @ self.projection.to(xs.dtype).t()


class FavorPlus(_RandomProjection):
    """FAVOR+ positive random features for the softmax kernel exp(q.k / sqrt(d)); see ``favor_plus``.

    Args:
        dim: input size d (the head dim).
        nb_features: r, number of random features (the projection has r rows).
        orthogonal: orthogonal random features (lower variance) or iid Gaussian rows.
        seed: seed of the projection; None draws one from torch's global generator (so ``torch.manual_seed``
            makes it reproducible). Stored in the state dict.
        redraw_interval: redraw every this many optimizer steps, when the training loop calls
            ``redraw_projections`` (None: never).
    """

    def __init__(self, dim: int, nb_features: int = 256, orthogonal: bool = True, seed: int | None = None,
                 redraw_interval: int | None = None):
        _check_dim("nb_features", nb_features)
        super().__init__(dim, nb_features, nb_features, orthogonal, seed, redraw_interval)

    def forward(self, x, *, is_query):
        self._check(x)
        return favor_plus(x, self.projection, is_query=is_query)


class FavorTrig(_RandomProjection):
    """Random Fourier features phi(x) = exp(|x~|^2/2) / sqrt(r) [sin(W x~), cos(W x~)] (r even, r/2 projections).

    Unbiased for exp(q.k/sqrt(d)) but signed: the normalizer can vanish or turn negative (Performer, sec. 2.3).
    The sin half comes first, the cos half second; the key magnitude exp(|x~|^2/2) is returned as log_scale.
    """

    def __init__(self, dim: int, nb_features: int = 256, orthogonal: bool = True, seed: int | None = None,
                 redraw_interval: int | None = None):
        if not is_int(nb_features) or nb_features < 2 or nb_features % 2:
            raise ValueError(f"nb_features: expected an even integer >= 2 (FavorTrig has sin and cos halves), "
                             f"got {nb_features!r}")
        super().__init__(dim, nb_features // 2, nb_features, orthogonal, seed, redraw_interval)

    def forward(self, x, *, is_query):
        self._check(x)
        with _full_precision(x):
            xs, u = self._project(x)
            f = torch.cat((torch.sin(u), torch.cos(u)), dim=-1)
            return f, (None if is_query else 0.5 * (xs * xs).sum(-1))


class ReLUFeatures(_RandomProjection):
    """Performer's generalized attention features relu(W x~) + kernel_eps (positive, bounded growth)."""

    def __init__(self, dim: int, nb_features: int = 256, orthogonal: bool = True, seed: int | None = None,
                 redraw_interval: int | None = None, kernel_eps: float = 1e-3):
        _check_dim("nb_features", nb_features)
        check_number("kernel_eps", kernel_eps, lambda e: e > 0, "a finite number > 0")
        super().__init__(dim, nb_features, nb_features, orthogonal, seed, redraw_interval)
        self.kernel_eps = float(kernel_eps)

    def forward(self, x, *, is_query):
        self._check(x)
        with _full_precision(x):
            return F.relu(self._project(x)[1]) + self.kernel_eps, None


class EluFeatures(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al. 2020): r = d features, no projection, nothing random."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = self.nb_features = _check_dim("dim", dim)

    def forward(self, x, *, is_query):
        _check_input(x, self.dim)
        with _full_precision(x):
            return F.elu(x.to(compute_dtype(x))) + 1, None


class Hedgehog(FeatureMap):
    """A trained positive feature map: phi(x) = [softmax(W_h x~), softmax(-W_h x~)] over features, per head h.

    Hedgehog's map (Zhang et al., ICLR 2024; LoLCATs' first stage trains it to match a softmax teacher). W_h
    (r/2, d) starts at FAVOR+'s orthogonal random projection, which makes the initial kernel a FAVOR+ estimate of
    the softmax kernel exp(q.k / sqrt(d)): each half is a softmax over r/2 random projections, whose denominator
    is r/2 times an estimate of exp(|x~|^2 / 2) (FAVOR+'s exact key factor), and the two halves are the
    antithetic pair w, -w. Training then moves W_h where the teacher's attention needs it. Features are bounded
    (in (0, 1], each half sums to 1): no log-scale is returned, and no row's normalizer can underflow (each
    half has an entry >= 2/r). The map is the same for queries and keys, so it works with every RoPE placement.

    Args:
        dim: the head dim d.
        nb_features: r (even): r/2 projections, two halves.
        heads: H, each with its own W_h; inputs are (B, H, N, d).
        orthogonal, seed: the initial draw, as in ``FavorPlus`` (seed None: from torch's global generator).
        redraw_interval: must be None (the projection is trained, not redrawn).
    """

    def __init__(self, dim: int, nb_features: int = 256, heads: int = 1, orthogonal: bool = True,
                 seed: int | None = None, redraw_interval: int | None = None):
        super().__init__()
        self.dim = _check_dim("dim", dim)
        if not is_int(nb_features) or nb_features < 2 or nb_features % 2:
            raise ValueError(f"nb_features: expected an even integer >= 2 (Hedgehog has two halves), got "
                             f"{nb_features!r}")
        self.heads = check_int("heads", heads)
        if redraw_interval is not None:
            raise ValueError(f"redraw_interval: expected None for feature_map='hedgehog' (its projection is "
                             f"trained, not redrawn), got {redraw_interval!r}")
        if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
        self.nb_features = nb_features
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)
        w = torch.stack([gaussian_orthogonal_matrix(nb_features // 2, dim, orthogonal=orthogonal,
                                                    generator=generator) for _ in range(heads)])
        self.weight = nn.Parameter(w.float())  # (H, r/2, d)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, nb_features={self.nb_features}, heads={self.heads}"

    def forward(self, x, *, is_query):
        _check_input(x, self.dim)
        if x.dim() != 4 or x.shape[1] != self.heads:
            raise ValueError(f"x: expected shape (B, {self.heads}, N, {self.dim}) (one trained map per head), got "
                             f"{tuple(x.shape)}")
        with _full_precision(x):
            dt = compute_dtype(x)
            u = torch.einsum("bhnd,hfd->bhnf", x.to(dt) * self.dim ** -0.25, self.weight.to(dt))
            return torch.cat((u.softmax(-1), (-u).softmax(-1)), dim=-1), None


def redraw_projections(module: nn.Module, step: int) -> int:
    """Redraw the projection of every random feature map in ``module`` whose ``redraw_interval`` divides ``step``.

    Call it once after each ``optimizer.step()``, with ``step`` the number of optimizer steps done so far (1 after
    the first), so all micro-batches of a step (and its backward, checkpointed or not) see one projection. Maps
    with ``redraw_interval=None`` are left alone. A redraw is a pure function of (seed, redraw count), so DDP
    replicas that share seeds and call this with the same ``step`` keep identical features without
    communicating. ``module`` may be wrapped (DDP, ``torch.compile``): its submodules are walked.

    Returns:
        the number of feature maps redrawn.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    check_int("step", step, 1, "an integer >= 1 (optimizer steps done)")
    redrawn = 0
    for m in module.modules():
        if isinstance(m, _RandomProjection) and m.redraw_interval and step % m.redraw_interval == 0:
            m.redraw()
            redrawn += 1
    return redrawn


FEATURE_MAPS = {"favor+": FavorPlus, "hedgehog": Hedgehog, "trig": FavorTrig, "relu": ReLUFeatures,
                "elu": EluFeatures}


def make_feature_map(name: str, dim: int, nb_features: int = 256, **kwargs) -> FeatureMap:
    """Build a feature map by name: one of ``FEATURE_MAPS`` ('favor+', 'hedgehog', 'trig', 'relu', 'elu')."""
    if not isinstance(name, str) or name not in FEATURE_MAPS:
        raise ValueError(f"feature_map: expected one of {sorted(FEATURE_MAPS)}, got {name!r}")
    if name == "elu":
        return EluFeatures(dim)
    return FEATURE_MAPS[name](dim, nb_features, **kwargs)
