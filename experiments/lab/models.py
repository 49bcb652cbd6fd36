"""A small causal byte-level Transformer language model with pluggable attention, all of it in this file.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> MLP -> residual), tied input/output byte
embeddings (vocabulary 256), in the spirit of nanoGPT's ``model.py``. The attention is picked by one name,
``ModelConfig.attention``, from ``VARIANTS`` (softmax or linear attention, and where positions enter); each
entry's ``about`` says what it builds, and the experiment scripts' ``--help`` lists them.

Linear variants use ``ModelConfig.feature_map`` ('favor+' by default, or 'trig', 'relu', 'elu').
Shape legend: B batch, N sequence length, C model width (``dim``), V vocabulary (256).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from linrope.attention import KVCache, LinearRotaryAttention, SoftmaxAttention
from linrope.features import FEATURE_MAPS, redraw_projections
from linrope.functional import linear_attention

from .checks import check_int, check_number

__all__ = ["Variant", "ALL_VARIANTS", "VARIANTS", "TOY_VARIANTS", "CORE_VARIANTS", "RECOMMENDED", "T5Attention",
           "t5_buckets", "ModelConfig", "RMSNorm", "MLP", "Block", "ByteLM", "sinusoidal_positions",
           "sequence_parallel_refusal", "rank_offset"]

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class Variant:
    """How one named attention variant is built, by the byte LM (``make_attention``) and by the one-head toys
    (``lab.mechanism.ToyAttention``); ``in_models`` and ``in_toys`` say which can build it."""

    kind: str                        # 'softmax' or 'linear'
    rope: str | None                 # the layers' ``rope=`` argument
    absolute: bool                   # add sinusoidal absolute positions to the token embeddings
    rotate_normalizer: bool = False  # ablation of eq. 19 (linear, rope='features' only)
    about: str = ""                  # one line for a reader (and for --help)
    label: str = ""                  # a few words for figures and tables (the name where empty)
    learned: bool = False            # add learned absolute position embeddings (BERT, GPT-2); up to max_len
    t5: bool = False                 # softmax only: T5's bucketed relative bias on the logits (Raffel et al. 2020)
    decay: str | float | None = None  # linear only: the layers' ``decay=`` (RetNet's 'multiscale', or gamma)
    gate: bool = False               # linear only: the layers' ``gate=`` (a data-dependent decay, GLA's gate)
    rope_learned: bool = False       # linear, rope='features': learned frequencies and phases (``LearnedRotary``)
    selective: bool = False          # linear, rope='features': the layers' ``selective=`` (learned rotations turned
                                     # by a data-dependent clock, sum of softplus(w.x + b)); models only
    learn_theta: bool = True         # with rope_learned: the frequencies learn (toys only: one without the other)
    learn_phase: bool = True         # with rope_learned: the phases learn
    copy_pairs: bool = False         # toys only: eq. 19 on r/2 features, each paired with a copy of itself
    kernel: str | None = None        # toys only, content-free: eq. 19's kernel of the distance alone, no feature
                                     # map: 'learned' (c learned directly) or 'optimum' (fixed at the SNR optimum)

    @property
    def in_models(self) -> bool:
        """Whether ``make_attention`` builds it (a layer of the library)."""
        return self.kernel is None and not self.copy_pairs and self.learn_theta and self.learn_phase

    @property
    def in_toys(self) -> bool:
        """Whether a one-head toy builds it: positions only through the attention, eq. 19's normalizer unrotated."""
        return not (self.absolute or self.learned or self.t5 or self.rotate_normalizer or self.selective)


ALL_VARIANTS: dict[str, Variant] = {
    "softmax-rope": Variant("softmax", "inputs", absolute=False, label="softmax + RoPE: the ceiling",
                            about="softmax attention, RoPE on q and k: the quality ceiling"),
    "softmax-abs": Variant("softmax", None, absolute=True, label="softmax + absolute positions",
                           about="softmax attention, sinusoidal absolute positions added to the embeddings"),
    "linear-rope": Variant("linear", "features", absolute=False, label="eq. 19",
                           about="linear attention, RoPE on the features phi(q), phi(k), normalizer unrotated "
                                 "(RoFormer eq. 19, the paper's proposal)"),
    "linear-rope-inputs": Variant("linear", "inputs", absolute=False, label="RoPE before phi",
                                  about="linear attention, RoPE on q and k before the feature map "
                                        "(what performer-pytorch does)"),
    "linear-abs": Variant("linear", None, absolute=True, label="absolute positions (Performer)",
                          about="linear attention, sinusoidal absolute positions (the classic Performer)"),
    "linear-nope": Variant("linear", None, absolute=False, label="no positions",
                           about="linear attention, no positions at all"),
    "linear-rope-rotden": Variant("linear", "features", absolute=False, rotate_normalizer=True,
                                  label="eq. 19 with the normalizer rotated",
                                  about="ablation: eq. 19 with the normalizer rotated too; it can vanish or turn "
                                        "negative"),
    "softmax-learned": Variant("softmax", None, absolute=False, learned=True,
                               about="baseline: softmax attention, learned absolute positions (BERT, GPT-2)"),
    "linear-learned": Variant("linear", None, absolute=False, learned=True,
                              about="baseline: linear attention, learned absolute positions"),
    "linear-rope-learned": Variant("linear", "features", absolute=False, rope_learned=True,
                                   about="eq. 19 with learned frequencies per head and a learned per-pair phase on "
                                         "the queries (still exactly relative)"),
    "linear-rope-decay": Variant("linear", "features", absolute=False, decay="multiscale", label="eq. 19 + decay",
                                 about="eq. 19 with RetNet's per-head decay gamma_h^(m-n) on numerator and "
                                       "normalizer (gamma_h = 1 - 2^(-5-h))"),
    "linear-rope-learned-decay": Variant("linear", "features", absolute=False, rope_learned=True,
                                         decay="multiscale", label="learned rotations + decay",
                                         about="eq. 19 with learned frequencies and phases and the multiscale decay "
                                               "(the two fixes together)"),
    "linear-nope-decay": Variant("linear", None, absolute=False, decay="multiscale",
                                 about="control: RetNet's multiscale decay without any rotation (what the decay "
                                       "does alone)"),
    "linear-rope-inputs-decay": Variant("linear", "inputs", absolute=False, decay="multiscale",
                                        about="control: RoPE before the feature map plus the multiscale decay"),
    "linear-rope-gated": Variant("linear", "features", absolute=False, gate=True, label="eq. 19 + gate",
                                 about="eq. 19 with a data-dependent decay: a forget gate per head, "
                                       "sigmoid(w.x + b)^(1/16), starting at the multiscale rates"),
    "linear-rope-learned-gated": Variant("linear", "features", absolute=False, rope_learned=True, gate=True,
                                         label="learned rotations + gate",
                                         about="eq. 19 with learned frequencies and phases and the forget gate"),
    "linear-nope-gated": Variant("linear", None, absolute=False, gate=True, label="gate, no rotation",
                                 about="control: the forget gate without any rotation (what the gate does "
                                       "alone: GLA-like)"),
    "linear-rope-inputs-gated": Variant("linear", "inputs", absolute=False, gate=True, label="RoPE before phi + gate",
                                        about="control: RoPE before the feature map plus the forget gate"),
    "linear-rope-selective": Variant("linear", "features", absolute=False, rope_learned=True, selective=True,
                                     decay="multiscale", label="selective rotations + decay",
                                     about="learned rotations turned by a data-dependent clock (sum of "
                                           "softplus(w.x + b) per kv head, 1 per token at init) with the multiscale "
                                           "decay: linear-rope-learned-decay plus the clock alone"),
    "linear-rope-selective-gated": Variant("linear", "features", absolute=False, rope_learned=True, selective=True,
                                           gate=True, label="selective rotations + gate",
                                           about="the selective clock with the forget gate (starting at the "
                                                 "multiscale rates, no fixed decay): linear-rope-learned-gated "
                                                 "plus the clock"),
    "softmax-t5": Variant("softmax", None, absolute=False, t5=True,
                          about="baseline: softmax attention, T5's bucketed relative bias (no place in linear "
                                "attention)"),
    # the one-head toys' own mechanisms (lab.mechanism), which no layer of the library builds
    "linear-rope-copy": Variant("linear", "features", absolute=False, copy_pairs=True,
                                about="eq. 19 on r/2 features each paired with a copy of itself"),
    "linear-rope-theta": Variant("linear", "features", absolute=False, rope_learned=True, learn_phase=False,
                                 about="eq. 19 with learned frequencies theta_i only"),
    "linear-rope-phase": Variant("linear", "features", absolute=False, rope_learned=True, learn_theta=False,
                                 about="eq. 19 with a learned per-pair phase only"),
    "linear-rope-c": Variant("linear", "features", absolute=False, kernel="learned",
                             about="content-free only: eq. 19's kernel with c learned directly (Re c >= 0), no "
                                   "feature map"),
    "linear-rope-optimum": Variant("linear", "features", absolute=False, kernel="optimum",
                                   about="content-free only: the fixed eq. 19 kernel K(m - n) of the selectivity "
                                         "optimum (Re c >= 0)"),
}
# one registry, two views: what the byte LM builds (every script's --variants) and what the toys build
VARIANTS = {name: v for name, v in ALL_VARIANTS.items() if v.in_models}
TOY_VARIANTS = {name: v for name, v in ALL_VARIANTS.items() if v.in_toys}
# the configuration the README recommends: the best linear variant measured (cpu-long on two corpora, level with
# softmax + RoPE there; quick preset, 3 seeds)
RECOMMENDED = "linear-rope-learned-gated"
# the variants the synthetic tasks run by default: eq. 19, its comparisons and the ablation; the
# position baselines above are there to be named (``--variants softmax-learned,...``)
CORE_VARIANTS = ("softmax-rope", "softmax-abs", "linear-rope", "linear-rope-inputs", "linear-abs", "linear-nope",
                 "linear-rope-rotden")


@dataclass
class ModelConfig:
    attention: str = "linear-rope"   # a key of VARIANTS
    n_layer: int = 3
    dim: int = 128
    heads: int = 4                   # dim_head = dim // heads
    mlp_ratio: int = 4               # MLP hidden width = mlp_ratio * dim
    feature_map: str = "favor+"      # linear variants only: 'favor+', 'trig', 'relu' or 'elu'
    nb_features: int = 64            # random features r per head (linear variants; even for RoPE on features)
    redraw_interval: int | None = None  # redraw the random projections every this many optimizer steps
                                        # (``redraw_projections``, called by the training loop)
    feature_seed: int = 0            # layer i draws its projection from seed feature_seed * 1000 + i, so every
                                     # DDP rank (and every resumed run) holds the same features
    chunk_size: int = 64             # chunk of the causal linear-attention engine
    engine_kernel: str = "torch"     # linear variants: LinearRotaryAttention's kernel ('cpp': compiled decoding)
    rope_base: float = 10000.0
    abs_scale: float | None = None   # RMS of the sinusoidal positions; None = the embeddings' init RMS (0.02).
                                     # At unit scale they swamp the std-0.02 embeddings and a small model stays
                                     # at the unigram level (~4.9 bits per byte).
    init_std: float = 0.02
    max_len: int = 4096              # learned absolute positions: the table's length (positions 0..max_len-1)
    t5_buckets: int = 32             # T5 relative bias: buckets, half exact, half logarithmic up to
    t5_max_distance: int = 128       # this distance (T5's defaults)

    def __post_init__(self):
        if self.attention not in VARIANTS:
            raise ValueError(f"attention: expected one of {sorted(VARIANTS)}, got {self.attention!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        for name in ("n_layer", "dim", "heads", "mlp_ratio", "nb_features", "chunk_size", "max_len", "t5_max_distance"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"dim: expected a multiple of heads={self.heads}, got {self.dim}")
        if self.redraw_interval is not None:
            check_int("redraw_interval", self.redraw_interval, 1, "None or a positive integer (optimizer steps)")
        check_int("feature_seed", self.feature_seed, 0)
        check_int("t5_buckets", self.t5_buckets, 2)
        if self.abs_scale is not None and not self.abs_scale > 0:
            raise ValueError(f"abs_scale: expected None or a number > 0, got {self.abs_scale!r}")

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.attention]

    def to_dict(self) -> dict:
        return asdict(self)


def sequence_parallel_refusal(attention: str) -> str | None:
    """Why variant ``attention`` cannot run with a sequence-parallel group, or None if it can."""
    v = VARIANTS[attention]
    if v.kind != "linear":
        return "softmax attention (every rank would need every key and value: ring attention, not implemented)"
    if v.rope_learned:
        return "learned rotations (the library's LearnedRotary takes no group: sequence parallelism takes fixed ones)"
    return None


def sinusoidal_positions(n: int, dim: int, *, offset: int = 0, device=None) -> Tensor:
    """Transformer sinusoids (Vaswani et al. 2017): (n, dim), columns [sin(p w_i), cos(p w_i)], RMS 1/sqrt(2).

    Computed on the fly for any length, so models with absolute positions can be evaluated beyond the
    length they were trained at (``experiments/extrapolation.py``).
    """
    half = dim // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(offset, offset + n, dtype=torch.float64, device=device)[:, None] * inv_freq  # (n, dim/2)
    table = torch.cat((angles.sin(), angles.cos()), dim=-1)
    return F.pad(table, (0, dim - 2 * half)).float()  # odd dim: a zero column


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.dim, config.mlp_ratio * config.dim)
        self.proj = nn.Linear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


def t5_buckets(relative: Tensor, buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bucket of each causal relative position (key - query <= 0): distances below buckets/2 get one bucket
    each, longer ones share logarithmically sized buckets up to ``max_distance``, beyond it the last bucket."""
    n = (-relative).clamp_min(0)
    exact = buckets // 2
    far = exact + (torch.log(n.clamp_min(1).float() / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    return torch.where(n < exact, n, far.clamp_max(buckets - 1))


class T5Attention(nn.Module):
    """Causal softmax attention with T5's learned relative bias per head and bucket on the logits, through
    SDPA's float mask; the projections and ``KVCache`` of ``SoftmaxAttention`` (without RoPE)."""

    def __init__(self, dim: int, heads: int, buckets: int, max_distance: int):
        super().__init__()
        self.inner = SoftmaxAttention(dim, heads=heads, causal=True, rope=None)
        self.bias = nn.Embedding(buckets, heads)
        self.buckets, self.max_distance = buckets, max_distance

    @property
    def to_out(self) -> nn.Linear:  # the residual projection, scaled at init like every block's
        return self.inner.to_out

    def forward(self, x: Tensor, state: KVCache | None = None, return_state: bool = False):
        q, k, v, *_ = self.inner.inputs(x, None, None, state, return_state, None, None, None, None, KVCache)
        offset = 0 if state is None else state.offset
        if state is not None:
            k, v = torch.cat((state.k, k), 2), torch.cat((state.v, v), 2)
        rel = (torch.arange(k.shape[2], device=x.device)[None, :]
               - torch.arange(offset, offset + x.shape[1], device=x.device)[:, None])  # key - query, (N, M)
        bias = self.bias(t5_buckets(rel, self.buckets, self.max_distance)).permute(2, 0, 1)  # (H, N, M)
        bias = bias.masked_fill(rel > 0, float("-inf")).to(q.dtype)
        out = self.inner.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).to(x.dtype))
        return (out, KVCache(k, v, None, offset + x.shape[1])) if return_state else out


def rank_offset(group, n: int, device: torch.device) -> tuple[int, int]:
    """(positions before this rank's slice of n, positions of the whole sequence) across ``group``: one
    all-gather of every rank's slice length (on the GPU for nccl, whose collectives take CUDA tensors)."""
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([n], dtype=torch.int64, device=on)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    lengths = [int(t) for t in every]
    return sum(lengths[:dist.get_rank(group)]), sum(lengths)


class RotatedNormalizerAttention(LinearRotaryAttention):
    """Ablation of eq. 19: the normalizer rotated too, sum_n (R_m fq_m).(R_n fk_n) v_n / sum_n (R_m fq_m).(R_n fk_n),
    both sums from the same once-rotated features. Rotated, the normalizer can vanish or turn negative, which is why
    eq. 19 keeps it unrotated (``linear-rope-rotden``). Takes ``LinearRotaryAttention``'s arguments with
    rope='features' and fixed rotations."""

    rotate_normalizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.rope != "features" or self.rope_learned:
            raise ValueError(f"rope: the rotated-normalizer ablation rotates features: expected rope='features' "
                             f"without learned rotations, got rope={self.rope!r}, rope_learned={self.rope_learned}")

    def attend(self, q, k, v, rotary, kwargs):
        positions, key_positions = kwargs["positions"], kwargs["key_positions"]
        qf, _ = self.feature_map(q, is_query=True)
        kf, ks = self.feature_map(k, is_query=False)
        qf, kf = rotary.rotate(qf, positions), rotary.rotate(kf, positions if key_positions is None else key_positions)
        return linear_attention(qf, kf, v, rotary=None, k_logscale=ks, **{**kwargs, "key_positions": None})


def make_attention(config: ModelConfig, layer: int, group=None) -> nn.Module:
    """The causal attention layer of block ``layer`` for ``config.attention``; input and output (B, N, C).
    ``group``: sequence parallelism (linear variants only, see ``ByteLM``)."""
    v = config.variant
    dim_head = config.dim // config.heads
    if v.t5:
        return T5Attention(config.dim, config.heads, config.t5_buckets, config.t5_max_distance)
    if v.kind == "softmax":
        return SoftmaxAttention(config.dim, heads=config.heads, dim_head=dim_head, causal=True, rope=v.rope,
                                rope_base=config.rope_base)
    cls = RotatedNormalizerAttention if v.rotate_normalizer else LinearRotaryAttention
    return cls(config.dim, heads=config.heads, dim_head=dim_head, nb_features=config.nb_features, causal=True,
               feature_map=config.feature_map, rope=v.rope, rope_base=config.rope_base,
               redraw_interval=config.redraw_interval, seed=config.feature_seed * 1000 + layer,
               chunk_size=config.chunk_size, decay=v.decay, rope_learned=v.rope_learned, group=group,
               gate=v.gate, selective=v.selective, kernel=config.engine_kernel)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, group=None):
        super().__init__()
        self.norm1 = RMSNorm(config.dim)
        self.attn = make_attention(config, layer, group)
        self.norm2 = RMSNorm(config.dim)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, state=None, return_state: bool = False):
        """x (B, N, C) -> (B, N, C); with ``return_state``, also the attention's decoding state after x."""
        a = self.attn(self.norm1(x), state=state, return_state=return_state)
        if return_state:
            a, state = a
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return (x, state) if return_state else x


class ByteLM(nn.Module):
    """Causal byte-level language model: ``forward(idx)`` maps bytes (B, N) to next-byte logits (B, N, 256).

    ``group``: sequence parallelism, a ``torch.distributed`` process group (linear variants only): ``idx`` is this
    rank's contiguous slice of each sequence (slices in rank order), the attention layers exchange their states
    across the group (``LinearRotaryAttention(group=...)``), absolute positions (sinusoidal or learned) start at
    the slice's global offset, and the logits are this rank's slice of the whole sequence's. Every rank of the
    group makes the same calls. Parameters and ``state_dict`` are those of the model without a group; a
    parameter's gradient on one rank is that rank's share (their sum over the group is the whole sequence's).
    """

    def __init__(self, config: ModelConfig, group=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        refusal = None if group is None else sequence_parallel_refusal(config.attention)
        if refusal:
            raise ValueError(f"group: variant {config.attention!r} has no sequence-parallel path: {refusal}; use "
                             f"another linear variant, e.g. 'linear-rope'")
        self.config = config
        self.group = group  # not a parameter or buffer
        self.embed = nn.Embedding(VOCAB_SIZE, config.dim)
        self.blocks = nn.ModuleList(Block(config, i, group) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim)
        # The sinusoid is scaled to the embeddings' RMS: at unit RMS it drowns the token signal at init.
        self.abs_scale = (config.abs_scale if config.abs_scale is not None else config.init_std) * math.sqrt(2)
        self.pos_embed = nn.Embedding(config.max_len, config.dim) if config.variant.learned else None
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 n_layer) so the residual stream's variance stays put.
        for block in self.blocks:
            for proj in (block.attn.to_out, block.mlp.proj):
                nn.init.normal_(proj.weight, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, states: list | None = None, return_states: bool = False):
        """Bytes (B, N) -> next-byte logits (B, N, 256).

        Decoding: ``return_states=True`` also returns each block's state (eq. 19 ``AttentionState``s, constant
        size; ``KVCache``s for softmax), and ``states`` continues from them: the logits are those of one pass
        over the whole sequence.
        """
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            what = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"idx: expected a (B, N) int64 tensor of bytes, got {what}")
        if states is not None and (not isinstance(states, (list, tuple)) or len(states) != len(self.blocks)):
            raise ValueError(f"states: expected a list of {len(self.blocks)} block states (from return_states=True), "
                             f"got {type(states).__name__}")
        offset = 0 if states is None else states[0].offset
        end = offset + idx.shape[1]  # one past the last position of the whole sequence
        if self.group is not None and (self.config.variant.absolute or self.pos_embed is not None):
            before, total = rank_offset(self.group, idx.shape[1], idx.device)
            offset, end = offset + before, offset + total
        x = self.embed(idx)  # (B, N, C)
        if self.config.variant.absolute:
            pe = sinusoidal_positions(idx.shape[1], self.config.dim, offset=offset, device=idx.device)
            x = x + self.abs_scale * pe.to(x.dtype)
        if self.pos_embed is not None:
            if end > self.config.max_len:  # the whole sequence's end: every rank of a group raises alike
                raise ValueError(f"idx: positions up to {end - 1} need max_len > that; learned "
                                 f"absolute positions stop at max_len = {self.config.max_len}")
            x = x + self.pos_embed(torch.arange(offset, offset + idx.shape[1], device=idx.device))
        new_states = []
        for i, block in enumerate(self.blocks):
            if return_states or states is not None:
                x, st = block(x, state=None if states is None else states[i], return_state=True)
                new_states.append(st)
            else:
                x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()  # tied embeddings: (B, N, C) x (C, V) -> (B, N, V)
        return (logits, new_states) if return_states else logits

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue the bytes ``idx`` (B, N) by ``max_new_tokens`` sampled bytes; returns (B, N + max_new_tokens).

        The prompt runs once; each new byte then costs one single-token step through the blocks' states
        (eq. 19: O(1) per token whatever the context; softmax: a KV cache, O(context)). ``temperature`` 0 picks
        the most likely byte; ``top_k`` keeps only the k most likely before sampling.
        """
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
        temperature = check_number("temperature", temperature, lambda t: t >= 0, "a number >= 0 (0: greedy)")
        if top_k is not None:
            top_k = check_int("top_k", top_k, minimum=1)
        logits, states = self(idx, return_states=True)
        out = [idx]
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()  # (B, V)
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None and top_k < last.shape[-1]:
                    kth = last.topk(top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(last.softmax(-1), 1, generator=generator)
            out.append(nxt)
            logits, states = self(nxt, states=states, return_states=True)
        return torch.cat(out, 1)

    def step_projections(self, step: int) -> int:
        """``redraw_projections(self, step)``: after optimizer step ``step``, redraw the layers whose
        ``redraw_interval`` (``config.redraw_interval``) divides it; returns how many were redrawn."""
        return redraw_projections(self, step)

    def projections(self) -> list[Tensor]:
        """The random feature projections of the linear layers (empty for softmax and 'elu'), for checks."""
        return [m.projection for m in self.modules() if hasattr(m, "projection") and isinstance(m.projection, Tensor)]
