"""Attention layers: input and output (B, N, dim). Both take the same keywords where they apply, so a model
switches between linear and softmax attention with one argument.

* ``LinearRotaryAttention``: linear attention on a feature map with RoPE placed on the features (RoFormer
  eq. 19, the default), on the inputs (before the feature map, as performer-pytorch does) or nowhere.
* ``SoftmaxAttention``: the softmax baseline (SDPA), RoPE on q and k or none, with a KV cache for decoding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_group_size, check_int, check_kernel, check_precision
from .features import FavorPlus, _full_precision, compute_dtype, make_feature_map
from ._engine.parallel import rank_offset
from .functional import (AttentionState, document_positions, favor_attention, linear_attention, multiscale_decays,
                         resolve_decay, softmax_attention)
from .rotary import LearnedRotary, RotaryEmbedding

__all__ = ["LinearRotaryAttention", "SoftmaxAttention", "KVCache", "ROPE_PLACEMENTS", "multiscale_decays"]

ROPE_PLACEMENTS = ("features", "inputs", None)
GATE_TEMPERATURE = 16.0  # GLA's 1/tau: log g = logsigmoid(.) / 16 keeps gates near 1 (slow forgetting) at init
CLOCK_INIT = math.log(math.e - 1)  # softplus^-1(1): the selective clock starts ticking 1 per position


@dataclass
class KVCache:
    """Decoding state of ``SoftmaxAttention``: rotated keys (B, H, T, d), values (B, H, T, dv), their padding mask
    (B, T) or None, and the number of positions seen."""

    k: Tensor
    v: Tensor
    mask: Tensor | None
    offset: int


class _Heads(nn.Module):
    """q/k/v and output projections shared by both layers; checks x and the streaming arguments."""

    def __init__(self, dim: int, heads: int, dim_head: int | None, causal: bool, qkv_bias: bool,
                 kv_heads: int | None = None, projections: bool = True):
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        kv_heads = heads if kv_heads is None else check_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads ({heads}), got {kv_heads}")
        if dim_head is None:  # the usual split of the model width
            if dim % heads:
                raise ValueError(f"dim_head: expected an integer when dim ({dim}) is not a multiple of heads "
                                 f"({heads}), got None")
            dim_head = dim // heads
        check_int("dim_head", dim_head)
        self.dim, self.heads, self.dim_head, self.causal = dim, heads, dim_head, bool(causal)
        self.kv_heads = kv_heads
        self.projections = bool(projections)
        if self.projections:  # without them, a host model's own projections feed ``forward_heads``
            self.to_qkv = nn.Linear(dim, (heads + 2 * kv_heads) * dim_head, bias=qkv_bias)  # q, then k, then v
            self.to_out = nn.Linear(heads * dim_head, dim)

    def split(self, x: Tensor, state, return_state: bool, context: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """q from x, k and v from x or, for cross-attention, from ``context``: each (B, heads, N or M, dim_head)."""
        if not self.projections:
            raise TypeError(f"x: a {type(self).__name__} built with projections=False takes q, k, v through "
                            "forward_heads(q, k, v, ...), not x")
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, N, {self.dim}), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor (B, N, {self.dim}) of embeddings, got {x.dtype}")
        if context is not None:
            if self.causal:
                raise ValueError("context: expected None for a layer built with causal=True (cross-attention "
                                 "reads every key of the context: causal=False)")
            if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[0] != x.shape[0] \
                    or context.shape[-1] != self.dim:
                shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
                raise ValueError(f"context: expected shape (B, M, {self.dim}) with B = {x.shape[0]} like x, "
                                 f"got {shape}")
            if context.dtype != x.dtype or context.shape[1] == 0:
                raise ValueError(f"context: expected x's dtype ({x.dtype}) and at least one position, got "
                                 f"{context.dtype} of shape {tuple(context.shape)}")
        if not self.causal:  # incremental decoding needs a causal layer: later tokens would change earlier rows
            if state is not None:
                raise ValueError("state: expected None for a layer built with causal=False "
                                 "(decoding needs causal=True)")
            if return_state:
                raise ValueError("return_state: expected False for a layer built with causal=False "
                                 "(decoding needs causal=True)")
        if context is None and self.kv_heads == self.heads:
            # b n (three h d) -> three b h n d as a view: einops' call costs more than a decoding step's arithmetic
            B, N = x.shape[:2]
            q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # the same parameters, split: q from x, k and v from the context (or x), kv_heads of them
            hd = self.heads * self.dim_head
            W, b = self.to_qkv.weight, self.to_qkv.bias
            q = rearrange(F.linear(x, W[:hd], None if b is None else b[:hd]), "b n (h d) -> b h n d", h=self.heads)
            kv = F.linear(x if context is None else context, W[hd:], None if b is None else b[hd:])
            k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.kv_heads).unbind(0)
        if torch.compiler.is_compiling():
            # Views of an intermediate leaving a compiled graph (here into the engine, which dynamo does not
            # trace) crash on a warm AOTAutograd cache in torch 2.13 (their view replay reads a garbage shape);
            # fresh tensors leave the graph instead. Eager keeps the views: no copy.
            q, k, v = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
        return q, k, v

    def inputs(self, x, key_padding_mask, positions, state, return_state, context, context_mask, context_positions,
               cu_seqlens, state_type):
        """Everything both layers' ``forward`` checks and derives first: (q, k, v, the keys' mask, the keys'
        positions (cross-attention), the queries' positions (restarting per document when packed))."""
        q, k, v = self.split(x, state, return_state, context)
        key_padding_mask, key_positions = _keys(key_padding_mask, context, context_mask, context_positions)
        if state is not None and not isinstance(state, state_type):
            expected = {AttentionState: "an AttentionState (returned with return_state=True)", KVCache: "a KVCache"}
            raise TypeError(f"state: expected {expected[state_type]}, got {type(state).__name__}")
        if cu_seqlens is not None:
            if state is not None or return_state:
                raise ValueError("cu_seqlens: expected no state/return_state (packed documents each start afresh)")
            if context is not None:
                raise ValueError("cu_seqlens: expected no context (packed documents attend within themselves)")
            if positions is None:
                positions = document_positions(cu_seqlens, x.shape[1], x.device)
        return q, k, v, key_padding_mask, key_positions, positions

    def share_kv(self, t: Tensor) -> Tensor:
        """(B, kv_heads, ...) -> (B, heads, ...): query head h reads kv head h // (heads / kv_heads)."""
        g = self.heads // self.kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=1)

    def make_rotary(self, rdim: int, what: str, rope: str, rope_base: float, interleaved: bool, rope_scale: float,
                    rope_scaling: str, rope_original_length: int | None, rotary_fraction: float) -> RotaryEmbedding:
        if rdim % 2:
            raise ValueError(f"{what}: expected an even number to be rotated with rope={rope!r}, got {rdim}")
        return RotaryEmbedding(rdim, base=rope_base, interleaved=interleaved, scale=rope_scale, scaling=rope_scaling,
                               original_length=rope_original_length, rotary_fraction=rotary_fraction)

    def yarn_scale(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """YaRN's attention factor on q and k (1 unless ``rope_scaling='yarn'``): q.k scaled by its square."""
        f = 1.0 if self.rotary is None else self.rotary.attention_factor
        return (q, k) if f == 1.0 else (q * f, k * f)

    def merge(self, out: Tensor) -> Tensor:
        B, H, N, d = out.shape  # b h n d -> b n (h d), without einops' per-call cost (see split)
        return self.to_out(out.transpose(1, 2).reshape(B, N, H * d))


def _keys(key_padding_mask, context, context_mask, context_positions):
    """The keys' mask and positions: x's own, or the context's for cross-attention."""
    if context is None:
        for name, value in (("context_mask", context_mask), ("context_positions", context_positions)):
            if value is not None:
                raise ValueError(f"{name}: expected None without a context (it describes the context's keys)")
        return key_padding_mask, None
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask: expected None with a context (the keys are the context's: use "
                         "context_mask)")
    return context_mask, (0 if context_positions is None else context_positions)


def _decays(decay, heads: int, causal: bool) -> tuple[float, ...] | None:
    gammas = resolve_decay(decay, heads)
    if gammas is not None and not causal:
        raise ValueError("decay: expected None for a layer built with causal=False (a decay weighs the past)")
    return gammas


def _check_state_heads(state: AttentionState, B: int, heads: int) -> None:
    """A layer's decoding state holds ``heads`` heads (kv heads, or every query head: ``state_group``)."""
    if state.numerator.dim() != 4 or tuple(state.numerator.shape[:2]) != (B, heads):
        raise ValueError(f"state: expected a decoding state of (B, heads) = ({B}, {heads}) (this layer's batch and "
                         f"state heads), got numerator {tuple(state.numerator.shape)}")


def _check_rope(rope, allowed) -> None:
    if rope not in allowed:
        raise ValueError(f"rope: expected one of {allowed}, got {rope!r}")


class LinearRotaryAttention(_Heads):
    """Multi-head linear attention with rotary position embeddings.

    Args:
        dim: model width; x is (B, N, dim).
        heads, dim_head: number and size of heads (dim_head None: dim // heads, as in ``SoftmaxAttention``).
        kv_heads: grouped-query attention: keys and values get this many heads (a divisor of ``heads``; default
            ``heads``), query head h reading kv head h // (heads / kv_heads). The decoding state keeps kv_heads
            heads, or ``heads`` where the heads of a group differ in what they sum (learned rotations, or decays
            that differ within a group, e.g. 'multiscale'): ``state_group`` says which.
        nb_features: r, random features per head (even when ``rope='features'``).
        causal: attend to positions n <= m only (chunked, O(N) memory; supports streaming).
        feature_map: 'favor+' (default; fused path ``favor_attention``), 'hedgehog' (trained per head, see
            ``linrope.Hedgehog``: for distilling a softmax teacher), 'trig', 'relu' or 'elu'.
        rope: 'features' (eq. 19: rotate phi(q), phi(k) by R_m in feature space, normalizer unrotated),
            'inputs' (rotate q, k before phi: relative only in expectation over the random draw) or None.
        rope_base, interleaved, rope_scale, rope_scaling, rope_original_length, rotary_fraction: the
            ``RotaryEmbedding``'s base, pairing, context-extension factor s and how it applies ('linear'
            interpolation, 'ntk' base scaling, 'yarn' with the trained length ``rope_original_length``), and the
            fraction of pairs rotated (of the features with rope='features', of the head dim with 'inputs').
            Under 'yarn', q and k are scaled by its attention factor before the feature map.
        rope_learned: rope='features' with learned rotations (``LearnedRotary``, causal): per head, frequencies
            theta initialised at this RoPE's and a per-pair phase on the queries (0 at first), so a pair can peak
            away from distance 0; still exactly relative. The decoding state then keeps every query head.
        redraw_interval: redraw the random projection every this many optimizer steps (None: never). The layer
            never redraws by itself: the training loop calls ``linrope.redraw_projections(model, step)`` after
            each ``optimizer.step()`` (step = optimizer steps done), which redraws every layer that is due.
        seed: seed of the random projection (None: from torch's global generator).
        orthogonal: orthogonal random features.
        chunk_size: chunk of the causal path.
        group_size: positions whose features the engine holds at once (see ``linear_attention``): None sizes its
            buffers to 1 MiB (L2-sized for long sequences), ``"auto"`` measures once per shape class and machine and caches the fastest.
        kernel: the causal path's chunk products (see ``linear_attention``): "torch" (any device; the default),
            "cpp" (on a CPU, built on first use: the causal FAVOR+ pass compiled, forward and backward, with RoPE
            or none, and the decoding step of one token continuing ``state``; learned angles keep the torch
            engine but for the step) or "triton" (experimental fused kernels on a CUDA GPU, slower than "torch"
            where measured).
        precision: of the attention products (see ``linear_attention``): "float32" (the default), or "tf32" /
            "bfloat16" on a CUDA GPU with tensor cores (the device is checked at each call).
        qkv_bias: bias in the q/k/v projection.
        projections: False builds the attention without ``to_qkv`` and ``to_out``, for a host model that projects
            q, k, v and the output itself and calls ``forward_heads`` (``linrope.hf`` does).
        gate: causal only: a data-dependent decay (a forget gate): key n weighs prod_{n < t <= m} g_t in row m,
            numerator and normalizer alike, g_t = sigmoid(w_h . x_t + b_h)^(1/16) per kv head (GLA's gate), w = 0
            and b at RetNet's multiscale rates at initialisation (``gate_proj``). Combines with ``decay``; exact
            in streaming and decoding (``linear_attention``'s ``log_gates``). FAVOR+ then goes through
            ``linear_attention`` on its features.
        selective: rope='features', causal only; implies ``rope_learned``: a data-dependent ("selective")
            rotation: the learned angles turn by a clock instead of the position, query pair i of head h at
            position n by theta_hi A_n + phase_hi, key pairs by theta_hi A_n, A_n = sum_{t <= n} a_t with
            a_t = softplus(w_g . x_t + b_g) > 0 per kv head g (``clock_proj``; w = 0 and b = softplus^-1(1) at
            initialisation, so a = 1: the layer starts as ``rope_learned=True``). Still exactly relative: a score
            depends on the clock advanced between the two positions; the normalizer stays unrotated. Exact in
            streaming and decoding (the state carries the clock, ``AttentionState.clock``; decoding steps go
            through the chunked engine). Combines with ``gate`` and ``decay``; not with ``group``.
        decay: causal only: weigh the key at distance m - n by gamma_h^(m - n) in numerator and normalizer alike
            (RetNet's decay; against attention dilution): None, a float gamma in (0, 1] for every head, one per
            head, or 'multiscale' (RetNet's gamma_h = 1 - 2^(-5-h), short to long ranges across heads). Exact in
            streaming and decoding (the state decays).
        group: sequence parallelism (a ``torch.distributed`` process group, see ``linear_attention``): x is this
            rank's contiguous slice of each sequence, slices in rank order; positions default to the global ones
            and the output is this rank's slice of the whole sequence's. A model built with it runs unchanged;
            every rank makes the same calls. With ``return_state`` every rank gets the state after the whole
            sequence: to decode on one process from there, set ``layer.group = None`` (the parameters and the
            state_dict are the same either way).

    ``forward(x, key_padding_mask=None, positions=None, state=None, return_state=False, context=None,
    context_mask=None, context_positions=None, cu_seqlens=None)``: x (B, N, dim), key_padding_mask (B, N) bool
    with True = keep, positions (N,) or (B, N) as in ``RotaryEmbedding.rotate`` (default: continue from
    ``state.offset``). Cross-attention (causal=False): keys and values from ``context`` (B, M, dim), masked by
    ``context_mask`` (B, M), at ``context_positions`` (default 0..M-1). Packed documents: ``cu_seqlens`` (B = 1,
    cumulative lengths), positions restarting at each. Returns (B, N, dim), and the ``AttentionState`` with
    ``return_state=True`` (causal). A query that sees no key (all its keys padded) gets 0; every other row is
    divided by its exact normalizer.

    Forward leaves the module as it was (no counters, no redraws), so ``torch.utils.checkpoint`` recomputes
    exactly what the first pass computed, and ``torch.compile``, autocast and DDP see a pure function of the
    parameters and buffers. Features are computed in float32 under autocast.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, nb_features: int = 256,
                 causal: bool = False, feature_map: str = "favor+", rope: str | None = "features",
                 rope_base: float = 10000.0, interleaved: bool = True, rope_scale: float = 1.0,
                 rope_scaling: str = "linear", rope_original_length: int | None = None, rotary_fraction: float = 1.0,
                 redraw_interval: int | None = None, seed: int | None = None,
                 orthogonal: bool = True, chunk_size: int = 64, qkv_bias: bool = False, kv_heads: int | None = None,
                 decay: float | str | tuple | None = None, rope_learned: bool = False, group=None,
                 group_size: int | str | None = None, kernel: str = "torch", projections: bool = True,
                 gate: bool = False, selective: bool = False, precision: str = "float32"):
        super().__init__(dim, heads, dim_head, causal, qkv_bias, kv_heads, projections)
        dim_head = self.dim_head
        self.decay = _decays(decay, heads, self.causal)  # fixed rates: a tuple, so no dtype cast ever rounds them
        self.gate = bool(gate)
        if self.gate:
            if not self.causal:
                raise ValueError(f"gate: expected False unless causal=True (a forget gate weighs the past), got "
                                 f"gate={gate!r}, causal={causal}")
            # log g = logsigmoid(W x + b) / tau, one gate per kv head (GLA's form, tau = 16); W = 0 and b such that
            # g starts at RetNet's multiscale rates: the gate begins as the fixed decay and learns from the input
            self.gate_proj = nn.Linear(dim, self.kv_heads)
            with torch.no_grad():
                self.gate_proj.weight.zero_()
                g = torch.tensor(multiscale_decays(self.kv_heads), dtype=torch.float64) ** GATE_TEMPERATURE
                self.gate_proj.bias.copy_(torch.log(g / (1 - g)))
        self.group = group  # not a parameter or buffer: the state_dict is the same with and without it
        _check_rope(rope, ROPE_PLACEMENTS)
        kwargs = {} if feature_map == "elu" else dict(orthogonal=orthogonal, seed=seed, redraw_interval=redraw_interval)
        if feature_map == "hedgehog":  # trained per head
            kwargs["heads"] = heads
        self.feature_map = make_feature_map(feature_map, dim_head, nb_features, **kwargs)
        self.feature_map_name, self.rope = feature_map, rope
        self.rotary = None
        if rope is not None:
            features = rope == "features"
            self.rotary = self.make_rotary(self.feature_map.nb_features if features else dim_head,
                                           "nb_features" if features else "dim_head", rope, rope_base, interleaved,
                                           rope_scale, rope_scaling, rope_original_length, rotary_fraction)
        self.selective = bool(selective)
        if self.selective:
            if rope != "features" or not self.causal:
                raise ValueError(f"selective: expected False unless rope='features' and causal=True (the clock turns "
                                 f"learned rotations of the features), got rope={rope!r}, causal={causal}")
            # a_t = softplus(W x_t + b) > 0, one clock per kv head (like the gate: the heads reading one kv head
            # share its notion of elapsed time, each with its own frequencies); a = 1 at initialisation
            self.clock_proj = nn.Linear(dim, self.kv_heads)
            with torch.no_grad():
                self.clock_proj.weight.zero_()
                self.clock_proj.bias.fill_(CLOCK_INIT)
        self.rope_learned = bool(rope_learned) or self.selective
        if self.rope_learned:
            if rope != "features" or not self.causal:
                raise ValueError(f"rope_learned: expected False unless rope='features' and causal=True, got "
                                 f"rope={rope!r}, causal={causal}")
            self.rotary = LearnedRotary(self.rotary.dim, heads, init=self.rotary)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.group_size = check_group_size(group_size)
        self.kernel = check_kernel(kernel)
        self.precision = check_precision(precision)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rotary, kwargs: dict):
        """The heads' attention: q (B, H, N, d), k and v repeated to every query head, ``rotary`` the feature-space
        rotation (rope='features') or None, ``kwargs`` the functions' keywords (positions, state, masks, decay,
        ...). FAVOR+ goes through ``favor_attention`` (features recomputed in the backward), other maps through
        ``linear_attention`` on their features. Returns what the function returns. A subclass may replace it to
        study another attention on the same projections (the experiments' rotated-normalizer ablation does)."""
        if isinstance(self.feature_map, FavorPlus):
            return favor_attention(q, k, v, self.feature_map.projection, rotary=rotary, **kwargs)
        qf, _ = self.feature_map(q, is_query=True)
        kf, ks = self.feature_map(k, is_query=False)
        return linear_attention(qf, kf, v, rotary=rotary, k_logscale=ks, **kwargs)

    def _config(self) -> dict:
        """What the parameters and buffers mean beyond their shapes: a state_dict of another configuration whose
        tensors happen to have the same shapes must not load silently."""
        return dict(feature_map=self.feature_map_name, rope=self.rope, rope_learned=self.rope_learned,
                    decay=self.decay, causal=self.causal, gate=self.gate, selective=self.selective)

    def get_extra_state(self) -> Tensor:
        # as bytes of JSON in a uint8 tensor: a state_dict stays all tensors (safetensors, code that clones it)
        return torch.tensor(list(json.dumps(self._config(), sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if not isinstance(state, Tensor) or state.dtype != torch.uint8:
            return
        saved = json.loads(bytes(state.tolist()).decode())
        mine = json.loads(json.dumps(self._config()))
        differ = {key: (saved[key], mine[key]) for key in mine if key in saved and saved[key] != mine[key]}
        if differ:
            raise ValueError("state_dict: saved from a LinearRotaryAttention with another configuration: "
                             + ", ".join(f"{key}={a!r} there, {b!r} here" for key, (a, b) in differ.items()))

    @property
    def state_group(self) -> int:
        """How many query heads share one head of the decoding state: heads / kv_heads when the heads of a kv
        group sum the same keys the same way, else 1 (learned rotations turn each query head's keys by its own
        angles; decays that differ within a group weigh the same keys differently)."""
        g = self.heads // self.kv_heads
        if g == 1 or self.rope_learned:
            return 1
        if self.decay is not None and any(len(set(self.decay[i:i + g])) > 1 for i in range(0, self.heads, g)):
            return 1
        return g

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, positions: int | Tensor | None = None,
                state: AttentionState | None = None, return_state: bool = False, context: Tensor | None = None,
                context_mask: Tensor | None = None, context_positions: int | Tensor | None = None,
                cu_seqlens: Tensor | None = None):
        q, k, v, key_padding_mask, key_positions, positions = self.inputs(
            x, key_padding_mask, positions, state, return_state, context, context_mask, context_positions,
            cu_seqlens, AttentionState)
        log_gates, clock = self.input_signals(x)
        out = self.forward_heads(q, k, v, key_padding_mask, positions, state, return_state, key_positions, cu_seqlens,
                                 log_gates, clock)
        if return_state:
            return self.merge(out[0].to(x.dtype)), out[1]
        return self.merge(out.to(x.dtype))

    def input_signals(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """What the layer reads from x (B, N, dim) beside q, k, v: the gate's log g and the selective clock's
        increments a > 0, each (B, kv_heads, N), or None where the layer has none. Computed in float32 (float64
        for float64 x) whatever autocast says."""
        def read(proj: nn.Linear) -> Tensor:  # (B, N, kv_heads) -> (B, kv_heads, N)
            dt = compute_dtype(x)
            return F.linear(x.to(dt), proj.weight.to(dt), proj.bias.to(dt)).transpose(1, 2)

        if not (self.gate or self.selective):  # nothing to read (no autocast context to enter on every token)
            return None, None
        with _full_precision(x):
            log_gates = F.logsigmoid(read(self.gate_proj)) / GATE_TEMPERATURE if self.gate else None
            clock = F.softplus(read(self.clock_proj)) if self.selective else None
        return log_gates, clock

    def forward_heads(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                      positions: int | Tensor | None = None, state: AttentionState | None = None,
                      return_state: bool = False, key_positions: int | Tensor | None = None,
                      cu_seqlens: Tensor | None = None, log_gates: Tensor | None = None, clock: Tensor | None = None):
        """The attention between the projections: q (B, heads, N, dim_head), k and v (B, kv_heads, M, dim_head)
        -> (B, heads, N, dim_head) in float32 (float64 for float64 input), and the ``AttentionState`` with
        ``return_state``. ``forward`` is ``to_qkv``, this, then ``to_out``; a host model with projections of its
        own (``linrope.hf``) calls it on its q, k, v. Arguments as in ``forward``; ``key_positions`` are the
        context's (cross-attention), None for self-attention; ``log_gates`` (B, kv_heads, N) the gate's log g
        (a layer built with ``gate=True``; ``forward`` computes them from x); ``clock`` (B, kv_heads, N) the
        selective clock's increments a_t > 0 (``selective=True``; ``forward`` computes them from x)."""
        if (log_gates is None) == self.gate:
            raise ValueError("log_gates: expected " + ("(B, kv_heads, N) log gates for this gated layer" if self.gate
                                                       else "None (the layer was built with gate=False)"))
        if (clock is None) == self.selective:
            raise ValueError("clock: expected " + ("(B, kv_heads, N) clock increments for this selective layer"
                                                   if self.selective else
                                                   "None (the layer was built with selective=False)"))
        if state is not None and not isinstance(state, AttentionState):
            raise TypeError(f"state: expected an AttentionState (returned with return_state=True), got "
                            f"{type(state).__name__}")
        if positions is None and self.group is not None:  # global positions: the functions find them, or here
            if self.rope == "inputs":  # where q and k are rotated before the feature map
                positions = (0 if state is None else state.offset) + rank_offset(self.group, q.shape[2])[0]
        elif positions is None and state is not None:
            positions = state.offset
        feature_rotary = self.rotary if self.rope == "features" else None
        q, k = self.yarn_scale(q, k)
        kpos = positions if key_positions is None else key_positions
        if self.rope == "inputs":
            q, k = self.rotary.rotate(q, positions), self.rotary.rotate(k, kpos)
        k, v = self.share_kv(k), self.share_kv(v)
        g = self.state_group
        if state is not None:
            _check_state_heads(state, q.shape[0], self.heads // g)
            if g > 1:  # one state per kv head
                state = state.map(self.share_kv)
        kwargs = dict(causal=self.causal, positions=positions, chunk_size=self.chunk_size,
                      initial_state=state, return_state=return_state, key_padding_mask=key_padding_mask,
                      key_positions=None if self.rope == "inputs" else key_positions, cu_seqlens=cu_seqlens,
                      group=self.group, decay=self.decay, group_size=self.group_size, kernel=self.kernel,
                      precision=self.precision)
        if log_gates is not None:
            kwargs["log_gates"] = self.share_kv(log_gates)
        if clock is not None:
            kwargs["clock"] = self.share_kv(clock)
        out = self.attend(q, k, v, feature_rotary, kwargs)
        if return_state:
            out, st = out
            return out, (st if g == 1 else st.map(lambda t: t[:, ::g]))
        return out


class SoftmaxAttention(_Heads):
    """Multi-head softmax attention (``scaled_dot_product_attention``) with RoPE on q and k.

    Takes the keywords of ``LinearRotaryAttention`` that apply, with the same defaults: dim, heads, dim_head
    (None: dim // heads), causal, rope, rope_base, interleaved, rope_scale, rope_scaling, rope_original_length,
    rotary_fraction, qkv_bias, kv_heads (the ``KVCache`` then holds kv_heads heads); ``group`` only as None
    (softmax has no sequence-parallel path here: every rank would need every key, ring attention). ``forward``
    is the same (``context``, ``cu_seqlens`` included); its state is a ``KVCache``. ``rope`` defaults to 'inputs'
    here and to 'features' there because each is its layer's own RoPE (softmax has no feature map to rotate).
    Both return x's dtype.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, causal: bool = False,
                 rope: str | None = "inputs", rope_base: float = 10000.0, interleaved: bool = True,
                 rope_scale: float = 1.0, rope_scaling: str = "linear", rope_original_length: int | None = None,
                 rotary_fraction: float = 1.0, qkv_bias: bool = False, kv_heads: int | None = None, group=None):
        if group is not None:
            raise ValueError("group: expected None: SoftmaxAttention has no sequence-parallel path (every rank would "
                             "need every key and value, ring attention); LinearRotaryAttention(group=...) exchanges "
                             "states only")
        super().__init__(dim, heads, dim_head, causal, qkv_bias, kv_heads)
        _check_rope(rope, ("inputs", None))
        self.rope = rope
        self.rotary = None
        if rope is not None:
            self.rotary = self.make_rotary(self.dim_head, "dim_head", rope, rope_base, interleaved, rope_scale,
                                           rope_scaling, rope_original_length, rotary_fraction)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, positions: int | Tensor | None = None,
                state: KVCache | None = None, return_state: bool = False, context: Tensor | None = None,
                context_mask: Tensor | None = None, context_positions: int | Tensor | None = None,
                cu_seqlens: Tensor | None = None):
        q, k, v, key_padding_mask, key_positions, positions = self.inputs(
            x, key_padding_mask, positions, state, return_state, context, context_mask, context_positions,
            cu_seqlens, KVCache)
        offset = 0 if state is None else state.offset
        if positions is None:
            positions = offset
        q, k = self.yarn_scale(q, k)
        if self.rotary is not None:
            kpos = positions if context is None else key_positions
            q, k = self.rotary.rotate(q, positions), self.rotary.rotate(k, kpos)
        mask = key_padding_mask
        if state is not None:
            B, T = x.shape[0], state.k.shape[2] if isinstance(state.k, Tensor) and state.k.dim() == 4 else -1
            want = (B, self.kv_heads, T, self.dim_head)
            if T < 0 or tuple(state.k.shape) != want or not isinstance(state.v, Tensor) \
                    or tuple(state.v.shape) != want or state.k.dtype != k.dtype:
                got = tuple(state.k.shape) if isinstance(state.k, Tensor) else type(state.k).__name__
                raise ValueError(f"state: a KVCache of keys (B, kv_heads, T, dim_head) = (B={B}, {self.kv_heads}, T, "
                                 f"{self.dim_head}) in {k.dtype} and values of the same shape expected, got keys "
                                 f"{got} in {getattr(state.k, 'dtype', None)} (a cache of another layer or batch?)")
            if state.mask is not None and tuple(state.mask.shape) != (B, T):
                raise ValueError(f"state: expected a KVCache mask of shape (B, T) = {(B, T)}, got "
                                 f"{tuple(state.mask.shape)}")
            k, v = torch.cat((state.k, k), dim=2), torch.cat((state.v, v), dim=2)
            if mask is not None or state.mask is not None:
                B, N = x.shape[:2]
                old = state.mask if state.mask is not None else x.new_ones(B, state.k.shape[2], dtype=torch.bool)
                new = mask if mask is not None else x.new_ones(B, N, dtype=torch.bool)
                mask = torch.cat((old, new), dim=1)
        out = softmax_attention(q, self.share_kv(k), self.share_kv(v), causal=self.causal, key_padding_mask=mask,
                                cu_seqlens=cu_seqlens)
        out = self.merge(out.to(x.dtype))
        if return_state:
            return out, KVCache(k, v, mask, offset + x.shape[1])
        return out
