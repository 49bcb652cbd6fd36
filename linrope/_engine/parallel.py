"""Sequence parallelism for the engine (private; the ``group=`` keyword of ``linrope.functional``).

One sequence is split across the P ranks of a ``torch.distributed`` group: rank p holds positions
[o_p, o_p + N_p), slices in rank order. Linear attention's past is a state, so ranks exchange states, never keys
or values (LASP-2, arXiv 2502.07563: one all-gather of per-rank states instead of LASP's ring):

1. each rank sums its own keys and values into a state (``chunked.key_state``): numerator (B, H, r, dv), key
   sum (B, H, r), log-scale reference (B, H);
2. one all-gather gives every rank all P states (``gather``: one flat buffer, one collective);
3. causal: rank p's engine starts from the combination of ranks < p (and of a streaming ``initial_state``,
   which comes before rank 0); bidirectional: rank p's engine adds the combination of the other ranks to its
   own keys. ``weights`` bring states to a common reference before summing, like the engine between groups.

Backward mirrors it inside the same autograd Function (``chunked._parallel_backward``): each rank's gradient of
the P gathered states is summed over ranks (``reduce_row``: an all-reduce of P states), and rank p's row flows
into its keys and values, added to the same gradient buffers as its own output's share. Communication is
O(P r dv) per head both ways, never keys or values.

Every rank of the group must make the same calls with the same B, H, r, dv and options (checked with one small
all-gather that also exchanges the slice lengths), and run the backward if any does (like DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .feature_sources import NEG


@dataclass(frozen=True)
class Layout:
    """Where this rank's slice sits in the sequence split across ``group``."""

    group: object
    rank: int  # rank within the group
    size: int  # P, ranks in the group
    offset: int  # positions held by the ranks before this one
    total: int  # positions of the whole sequence


_META = ("B", "H", "r", "dv", "causal", "FAVOR+ (else given features)", "k_logscale given", "requires grad",
         "rotary given", "initial_state given", "return_state", "decay given")


def layout(group, N: int, meta: tuple, device) -> Layout:
    """Exchange slice lengths and check that every rank runs the same call (``meta``, values of ``_META``).

    Raises on every rank alike (they all see the same gathered values), so no rank is left waiting.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call torch.distributed.init_process_group "
                         "first, e.g. under torchrun), or pass group=None")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    on = device if device is not None and dist.get_backend(group) == "nccl" else "cpu"
    if dist.get_backend(group) == "nccl" and on == "cpu":
        on = f"cuda:{torch.cuda.current_device()}"
    mine = torch.tensor([N, *(int(m) for m in meta)], dtype=torch.int64, device=on)
    rows = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(rows, mine, group=group)
    rows = [[int(x) for x in t.tolist()] for t in rows]
    for i, name in enumerate(_META[:len(meta)], start=1):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(f"group: every rank must make the same call, but ranks differ in {name}: "
                             f"{', '.join(f'rank {j}: {v}' for j, v in enumerate(values))}")
    lengths = [row[0] for row in rows]
    return Layout(group, rank, size, sum(lengths[:rank]), sum(lengths))


def rank_offset(group, N: int) -> tuple[int, int]:
    """(positions before this rank's slice of N, positions of the whole sequence) across ``group``."""
    lay = layout(group, N, (), None)
    return lay.offset, lay.total


@dataclass(frozen=True)
class Parallel:
    """Sequence parallelism for one ``LinearAttentionFunction`` call: the layout, whether an initial state comes
    first, and whether the state after the whole sequence is returned."""

    lay: Layout
    initial: bool
    return_state: bool


def gather(S: Tensor, z: Tensor, M: Tensor, lay: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's (S, z, M): (P, BH, r, dv), (P, BH, r), (P, BH), by one all-gather of one float64 buffer (M's
    dtype: log-scales that must not round). No autograd: ``reduce_row`` is the backward's mirror."""
    flat = torch.cat((S.flatten().to(M.dtype), z.flatten().to(M.dtype), M.flatten()))
    parts = [torch.empty_like(flat) for _ in range(lay.size)]
    dist.all_gather(parts, flat, group=lay.group)
    every = torch.stack(parts)
    nS, nz, P = S.numel(), z.numel(), lay.size
    return (every[:, :nS].view(P, *S.shape).to(S.dtype), every[:, nS:nS + nz].view(P, *z.shape).to(z.dtype),
            every[:, nS + nz:].view(P, *M.shape))


def weights(M: Tensor, use: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Weights e (P, BH) in ``dtype`` that bring the states with ``use`` (P,) to their common reference
    Mc = max M (BH,) (0 for the others), and Mc: sum_p e_p S_p is the state of their keys together."""
    Mu = torch.where(use[:, None], M, torch.full_like(M, NEG))
    Mc = Mu.amax(0)
    e = torch.exp(Mu - Mc) * use[:, None]  # a state with no key: exp(NEG - NEG) = 1, times its zero sums
    return e.to(dtype), Mc


def reduce_row(dS: Tensor, dz: Tensor, lay: Layout) -> tuple[Tensor, Tensor]:
    """Sum (P, ...) gradients over the ranks (one all-reduce: gloo has no reduce-scatter) and return this rank's
    row: the gradient of its own key state from every rank's use of it."""
    flat = torch.cat((dS.flatten(), dz.flatten()))
    dist.all_reduce(flat, group=lay.group)
    dS, dz = flat[:dS.numel()].view(dS.shape), flat[dS.numel():].view(dz.shape)
    return dS[lay.rank], dz[lay.rank]
