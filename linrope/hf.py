"""Hugging Face ``transformers`` models with linrope attention: ``linearize`` a pretrained softmax causal LM into
eq. 19 (or RoPE before phi), keep its weights and API, then ``attention_transfer`` to recover the teacher.

    from transformers import AutoModelForCausalLM
    from linrope.hf import linearize, from_pretrained

    teacher = AutoModelForCausalLM.from_pretrained("path/to/llama")
    model = linearize(teacher, feature_map="hedgehog", decay="multiscale")   # a copy; the teacher is untouched
    out = model.generate(input_ids, max_new_tokens=100)                      # a constant-size state per layer
    model.save_pretrained("llama-eq19")
    model = from_pretrained("llama-eq19")

Supported families (by ``config.model_type``): Llama, Mistral, Qwen2 (q/k/v/o projections, GQA) and GPT-NeoX (fused
query_key_value, partial rotary). Every self-attention becomes a ``_LinearizedAttention``: the model's own
projections (same modules, same names, so LoRA and weight tooling still find them), and a
``LinearRotaryAttention`` built without projections (``projections=False``) doing the attention between them.
Where the RoPE goes follows ``rope``:

* ``'features'`` (eq. 19, the default): the model's RoPE (base, linear or YaRN scaling, partial rotary,
  half-split pairs) acts on the r features, the normalizer unrotated;
* ``'inputs'``: q and k rotated by the model's own cos/sin (whatever its RoPE type) before the feature map, as
  LoLCATs, Hedgehog and Liger linearize;
* ``None``: no positions in attention.

Decoding keeps one ``AttentionState`` per layer in a ``LinropeCache`` (memory constant in the generated length),
which the converted model creates itself for ``generate`` and for ``use_cache=True``. Padding comes from the 2-D
``attention_mask`` the model's ``forward`` receives; the converted model never builds the (N, N) softmax mask.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:
    from transformers.cache_utils import Cache
except ImportError as err:  # the extra names what to install
    raise ImportError("linrope.hf needs Hugging Face transformers: pip install 'linrope[hf]' "
                      "(or pip install transformers)") from err

from .attention import LinearRotaryAttention
from .functional import AttentionState
from .rotary import apply_rotary

__all__ = ["linearize", "from_pretrained", "attention_transfer", "attention_pairs", "LinropeCache", "SUPPORTED",
           "LAYER_OPTIONS", "attention_parameters"]

# The LinearRotaryAttention keywords linearize passes on; the others come from the model's config.
LAYER_OPTIONS = ("nb_features", "feature_map", "decay", "rope_learned", "gate", "selective", "seed", "orthogonal",
                 "chunk_size", "group_size", "kernel", "redraw_interval")
FROM_CONFIG = ("dim", "heads", "dim_head", "kv_heads", "causal", "qkv_bias", "rope_base", "interleaved",
               "rope_scale", "rope_scaling", "rope_original_length", "rotary_fraction", "projections")


@dataclass(frozen=True)
class _Family:
    """Where a family keeps its decoder layers and attention, and how its attention projects."""

    layers: Callable[[nn.Module], nn.ModuleList]  # the causal LM -> its decoder layers
    attention: str  # the decoder layer's attribute holding the attention
    projections: tuple[str, ...]  # q, k, v, o; or GPT-NeoX's fused qkv, then the output


_LLAMA = _Family(lambda m: m.model.layers, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
FAMILIES = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gpt_neox": _Family(lambda m: m.gpt_neox.layers, "attention", ("query_key_value", "dense")),
}
SUPPORTED = tuple(FAMILIES)


def _rope_options(config, rope) -> dict:
    """The RotaryEmbedding keywords of the model's RoPE on the features (rope='features')."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    opts = dict(rope_base=float(params.get("rope_theta", 10000.0)), interleaved=False,
                rotary_fraction=float(params.get("partial_rotary_factor", 1.0)))
    if rope != "features" or kind == "default":
        return opts
    if kind == "linear":
        return {**opts, "rope_scale": float(params["factor"]), "rope_scaling": "linear"}
    if kind == "yarn":
        unusual = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k)}
        unusual |= {k: params[k] for k, d in (("beta_fast", 32.0), ("beta_slow", 1.0)) if params.get(k, d) != d}
        if not unusual:
            original = params.get("original_max_position_embeddings") or config.max_position_embeddings
            return {**opts, "rope_scale": float(params["factor"]), "rope_scaling": "yarn",
                    "rope_original_length": int(original)}
        kind = f"yarn with {unusual}"
    raise ValueError(f"rope: the model's RoPE ({kind}) has no feature-space counterpart here (rope='features' "
                     f"takes RoPE types 'default', 'linear' and 'yarn' with its default factors); rope='inputs' "
                     f"applies the model's own RoPE, whatever its type")


class _LinearizedAttention(nn.Module):
    """A family's self-attention with linrope between its projections: hidden (B, N, D) -> (B, N, D).

    Holds the original projection modules under their own names and ``linrope``, a ``LinearRotaryAttention``
    without projections. ``forward`` takes the keywords the family's decoder layer passes (``position_ids``,
    ``position_embeddings``, the cache under any of its names) and ``linrope_padding``, the 2-D mask the
    converted model forwards (its 4-D ``attention_mask`` is never built: None here)."""

    def __init__(self, attn: nn.Module, family: _Family, config, rope, options: dict, layer_idx: int):
        super().__init__()
        for name in family.projections:
            setattr(self, name, getattr(attn, name))
        self.family_projections = family.projections
        self.layer_idx = layer_idx
        self.rope = rope
        heads = config.num_attention_heads
        kwargs = dict(_rope_options(config, rope)) if rope == "features" else {}
        self.linrope = LinearRotaryAttention(
            config.hidden_size, heads, getattr(config, "head_dim", None) or config.hidden_size // heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads, causal=True,
            rope="features" if rope == "features" else None, projections=False, **kwargs, **options)

    def qkv(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, heads, N, d), k and v (B, kv_heads, N, d), as the family projects them."""
        B, N, _ = hidden.shape
        H, Hkv, d = self.linrope.heads, self.linrope.kv_heads, self.linrope.dim_head
        if len(self.family_projections) == 2:  # GPT-NeoX: per head [q, k, v] in one projection
            return self.query_key_value(hidden).view(B, N, H, 3 * d).transpose(1, 2).chunk(3, dim=-1)
        q = self.q_proj(hidden).view(B, N, H, d).transpose(1, 2)
        k = self.k_proj(hidden).view(B, N, Hkv, d).transpose(1, 2)
        v = self.v_proj(hidden).view(B, N, Hkv, d).transpose(1, 2)
        return q, k, v

    def output(self, out: Tensor) -> Tensor:
        proj = getattr(self, self.family_projections[-1])
        return proj(out.transpose(1, 2).flatten(2))

    def forward(self, hidden_states: Tensor, attention_mask=None, position_ids: Tensor | None = None,
                position_embeddings: tuple[Tensor, Tensor] | None = None, cache=None, past_key_values=None,
                layer_past=None, linrope_padding: Tensor | None = None, **kwargs):
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        if cache is not None and not isinstance(cache, LinropeCache):
            raise TypeError(f"cache: expected a linrope.hf.LinropeCache (a linearized model keeps one state per "
                            f"layer, not keys and values), got {type(cache).__name__}; the model creates its own "
                            f"when use_cache=True")
        if attention_mask is not None:
            raise ValueError("attention_mask: a linearized layer takes the 2-D padding mask from the model's "
                             "forward (call the converted causal LM, not its inner model, with attention_mask)")
        q, k, v = self.qkv(hidden_states)
        N = q.shape[2]
        if self.rope == "inputs":
            q, k = (_rotate_like_hf(t, *position_embeddings) for t in (q, k))
        positions = None
        if position_ids is not None:
            positions = position_ids[0] if position_ids.shape[0] == 1 else position_ids
        mask = None
        if linrope_padding is not None:
            mask = linrope_padding[:, -N:].to(device=q.device, dtype=torch.bool)
        state = None if cache is None else cache.states.get(self.layer_idx)
        log_gates, clock = self.linrope.input_signals(hidden_states)  # gate and selective clock, if any
        kw = dict(key_padding_mask=mask, positions=positions, log_gates=log_gates, clock=clock)
        if cache is None:
            out = self.linrope.forward_heads(q, k, v, **kw)
        else:
            out, cache.states[self.layer_idx] = self.linrope.forward_heads(q, k, v, state=state, return_state=True,
                                                                           **kw)
        return self.output(out.to(hidden_states.dtype)), None


def _rotate_like_hf(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The model's own RoPE on x (B, H, N, d): its cos/sin (B or 1, N, rot) rotate the first rot dims in
    half-split pairs (HF's rotate_half layout, with its attention scaling already in cos and sin)."""
    rot = cos.shape[-1]
    cos, sin = cos[..., : rot // 2], sin[..., : rot // 2]
    if cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]
    turned = apply_rotary(x[..., :rot], cos.to(x.dtype), sin.to(x.dtype), interleaved=False)
    return turned if rot == x.shape[-1] else torch.cat((turned, x[..., rot:]), dim=-1)


class LinropeCache(Cache):
    """The decoding cache of a linearized model: one ``AttentionState`` per layer (``states[layer_idx]``), whose
    size does not grow with the context. ``generate`` and ``forward(use_cache=True)`` create it; pass it back as
    ``cache=`` (or ``past_key_values=``) to continue. Beam search and ``num_return_sequences`` reorder and repeat
    it along the batch."""

    is_compileable = False

    def __init__(self):
        super().__init__(layers=[])
        self.states: dict[int, AttentionState] = {}

    def __repr__(self) -> str:
        return f"LinropeCache(layers={len(self.states)}, seen={self.get_seq_length()})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        state = self.states.get(layer_idx)
        return 0 if state is None else int(state.offset)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0  # a state holds the past: the softmax mask never spans it (and is never built)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_initialized(self) -> bool:
        return bool(self.states)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.states)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.states)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.states)

    @property
    def batch_size(self) -> int:
        return next(iter(self.states.values())).numerator.shape[0]

    def _map(self, fn) -> None:
        self.states = {i: s.map(fn) for i, s in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.states = {}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LinropeCache: a state sums the past, so it cannot be cropped (assisted and "
                                  "speculative decoding need a cache of keys and values)")


def _linear_class(base: type) -> type:
    """The converted model's class: ``base`` with a LinropeCache for decoding and the 2-D mask sent to the
    attention layers."""
    if base in _CLASSES:
        return _CLASSES[base]

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and kwargs.get("cache") is None and not (self.training and torch.is_grad_enabled()):
            kwargs["cache"] = LinropeCache()
        if use_cache is False or (self.training and torch.is_grad_enabled() and kwargs.get("cache") is None):
            kwargs["use_cache"] = False  # training: no state to carry (and none the base would create)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask: expected a 2-D padding mask (B, seen + N) with 1 = keep, got "
                                 f"shape {tuple(attention_mask.shape)}")
            kwargs["linrope_padding"] = attention_mask
        return base.forward(self, input_ids, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kw):
        if model_kwargs.get("past_key_values") is not None:
            model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = LinropeCache()

    cls = type(f"Linrope{base.__name__}", (base,), {
        "forward": forward, "_prepare_cache_for_generation": _prepare_cache_for_generation,
        "_supports_default_dynamic_cache": classmethod(lambda c: False), "__module__": __name__,
        "__doc__": f"{base.__name__} whose self-attentions are linrope's (see linrope.hf.linearize)."})
    _CLASSES[base] = cls
    return cls


_CLASSES: dict[type, type] = {}


def linearize(model: nn.Module, *, rope: str | None = "features", **options) -> nn.Module:
    """A copy of a Hugging Face causal LM whose every self-attention is linrope's linear attention.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``GPTNeoXForCausalLM``
            (any size, trained or not). It is left untouched.
        rope: 'features' (eq. 19, default), 'inputs' (the model's RoPE on q and k before the feature map) or None.
        options: ``LinearRotaryAttention`` keywords (``LAYER_OPTIONS``): ``nb_features`` (default 256),
            ``feature_map`` ('favor+' or 'hedgehog', the trained map for attention transfer), ``decay``,
            ``rope_learned``, ``gate`` (a forget gate read from the layer's input), ``selective`` (rotations
            turned by a clock read from the input), ``seed`` (layer i draws from seed + i), ``orthogonal``, ``chunk_size``,
            ``group_size``, ``kernel``, ``redraw_interval``. Heads, kv heads, head dim and the RoPE's base,
            scaling and partial rotary come from the model's config.

    Returns:
        the converted model, of a subclass of the model's class: same parameters and names (plus each layer's
        ``linrope`` module: the feature map's projection, trained maps, learned rotations), same
        ``forward`` (``attention_mask`` as 2-D padding, ``labels``), ``generate`` with a ``LinropeCache``,
        ``save_pretrained`` (load with ``from_pretrained``), gradient checkpointing. Its config carries the
        options under ``linrope``.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a Hugging Face causal LM (a transformers PreTrainedModel), got "
                        f"{type(model).__name__}")
    kind = getattr(model.config, "model_type", None)
    if type(model) in _CLASSES.values() or getattr(model.config, "linrope", None):
        raise ValueError(f"model: expected a softmax model, got one already linearized ({type(model).__name__})")
    if rope not in ("features", "inputs", None):
        raise ValueError(f"rope: expected 'features', 'inputs' or None, got {rope!r}")
    if rope is not None and not getattr(model.config, "rope_parameters", None):
        raise ValueError(f"rope: {type(model).__name__} has no rotary position embedding to place "
                         f"(rope={rope!r}); rope=None linearizes without positions in attention")
    if kind not in FAMILIES or not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(f"model: {type(model).__name__} (model_type {kind!r}) is not supported; supported: the "
                         f"causal LMs of {', '.join(SUPPORTED)}")
    unknown = sorted(set(options) - set(LAYER_OPTIONS))
    if unknown:
        fixed = [u for u in unknown if u in FROM_CONFIG]
        why = f" ({', '.join(fixed)} come from the model's config)" if fixed else ""
        raise ValueError(f"options: unexpected {unknown}{why}; expected some of {list(LAYER_OPTIONS)}")
    for name in ("rope_learned", "selective"):
        if options.get(name) and rope != "features":
            raise ValueError(f"{name}: expected rope='features' (learned rotations of the features), got rope={rope!r}")
    family = FAMILIES[kind]
    student = copy.deepcopy(model)
    layers = family.layers(student)
    for i, layer in enumerate(layers):
        layer_options = dict(options)
        if options.get("seed") is not None:
            layer_options["seed"] = options["seed"] + i
        old = getattr(layer, family.attention)
        new = _LinearizedAttention(old, family, student.config, rope, layer_options, i)
        # the linrope tensors stay float32 in a half-precision model: features are computed in float32 anyway
        setattr(layer, family.attention, new.to(device=next(old.parameters()).device))
    student.config.linrope = {"rope": rope, **options}
    student.__class__ = _linear_class(type(model))
    return student


def attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a linearization adds (trained feature maps, learned rotations, gates, clocks): what attention
    transfer trains."""
    return [p for name, p in model.named_parameters() if ".linrope." in f".{name}"]


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` from a linearized model: the base model from its files, the
    same linearization (``config.linrope``), then every linrope tensor (projections, trained maps, rotations)
    from the saved weights. ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``torch_dtype``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    options = getattr(config, "linrope", None)
    if not options:
        raise ValueError(f"path: {path} holds no linearized model (its config has no 'linrope' entry); "
                         "linearize() a softmax model instead")
    del config.linrope
    base = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    model = linearize(base, **options)
    files = sorted(str(p) for p in _weight_files(path))
    saved = {}
    for f in files:
        saved.update({k: v for k, v in load_file(f).items() if ".linrope." in f".{k}"})
    mine = {k for k in model.state_dict() if ".linrope." in f".{k}"}
    if set(saved) != mine:
        raise ValueError(f"path: the saved linrope tensors do not match the configuration: missing "
                         f"{sorted(mine - set(saved))[:4]}, unexpected {sorted(set(saved) - mine)[:4]}")
    model.load_state_dict(saved, strict=False)
    return model


def _weight_files(path) -> list:
    from pathlib import Path

    found = sorted(Path(path).glob("*.safetensors"))
    if not found:
        raise ValueError(f"path: no .safetensors weights in {path} (save with save_pretrained, safe "
                         f"serialization)")
    return found


def attention_transfer(teacher: nn.Module, student: nn.Module, batches: Iterable, steps: int, *, lr: float = 1e-2,
                       finetune_steps: int = 0, finetune_lr: float = 1e-4, finetune_batches: Iterable | None = None,
                       callback: Callable[[str, int, float], None] | None = None) -> dict:
    """Train the student's attention to match the teacher's, layer by layer; then, optionally, fine-tune it.

    Stage 1 (LoLCATs' attention transfer): each step runs the teacher on a batch, keeping every self-attention's
    input and output; each student attention takes the teacher's input of its layer and is trained to give the
    teacher's output (mean over layers of the per-layer MSE). Only ``attention_parameters(student)`` train (the
    trained feature maps and learned rotations; with FAVOR+ and fixed rotations there is nothing to train and
    stage 1 is skipped). Stage 2: the whole student on next-token loss for ``finetune_steps`` steps.

    Args:
        teacher: the softmax model the student was linearized from (same architecture); not modified.
        student: ``linearize(teacher, ...)``.
        batches: an iterable of ``input_ids`` (B, N) long tensors (cycled if shorter than ``steps``).
        steps: stage-1 steps (0 skips it); lr: its Adam learning rate.
        finetune_steps, finetune_lr, finetune_batches: stage 2 (AdamW over all parameters; batches default to
            ``batches``).
        callback: called as ``callback(stage, step, loss)`` after every step ('transfer' or 'finetune').

    Returns:
        {'transfer': [per-step MSE], 'finetune': [per-step loss]}.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected an integer >= 0, got {steps!r}")
    if not isinstance(finetune_steps, int) or isinstance(finetune_steps, bool) or finetune_steps < 0:
        raise ValueError(f"finetune_steps: expected an integer >= 0, got {finetune_steps!r}")
    _pair_family(teacher, student)
    history = {"transfer": [], "finetune": []}
    params = attention_parameters(student)
    it = _cycle(batches)
    if steps and params:
        opt = torch.optim.Adam(params, lr=lr)
        frozen = [p for p in student.parameters() if p.requires_grad and all(p is not q for q in params)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            student.train()
            for step in range(1, steps + 1):
                pairs = attention_pairs(teacher, student, next(it))
                loss = sum(torch.nn.functional.mse_loss(out.float(), target.float()) for out, target in pairs)
                _step(opt, loss / len(pairs), history, "transfer", step, callback)
        finally:
            for p in frozen:
                p.requires_grad_(True)
    if finetune_steps:
        ft = _cycle(finetune_batches if finetune_batches is not None else batches)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=finetune_lr)
        student.train()
        for step in range(1, finetune_steps + 1):
            ids = next(ft)
            _step(opt, student(input_ids=ids, labels=ids, use_cache=False).loss, history, "finetune", step, callback)
    student.eval()
    return history


def _step(opt, loss: Tensor, history: dict, stage: str, step: int, callback) -> None:
    """One optimizer step on ``loss``, recorded under ``stage``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    history[stage].append(loss.item())
    if callback is not None:
        callback(stage, step, history[stage][-1])


def _cycle(batches: Iterable):
    while True:
        got = False
        for ids in batches:
            got = True
            if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
                raise ValueError(f"batches: expected input_ids tensors (B, N) of dtype long, got "
                                 f"{getattr(ids, 'shape', type(ids).__name__)}")
            yield ids
        if not got:
            raise ValueError("batches: expected at least one batch")


def _pair_family(teacher: nn.Module, student: nn.Module) -> _Family:
    """The family of a teacher and its linearized student, checked."""
    kind = getattr(getattr(teacher, "config", None), "model_type", None)
    if kind not in FAMILIES or type(student) not in _CLASSES.values():
        raise ValueError(f"student: expected linearize(teacher) of a supported teacher, got {type(student).__name__}"
                         f" for a {type(teacher).__name__}")
    family = FAMILIES[kind]
    t_layers, s_layers = family.layers(teacher), family.layers(student)
    if len(t_layers) != len(s_layers):
        raise ValueError(f"student: expected {len(t_layers)} layers like the teacher, got {len(s_layers)}")
    return family


def attention_pairs(teacher: nn.Module, student: nn.Module, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer, (the student's attention output, the teacher's), both (B, N, D), the student's attention run on
    the teacher's own input to that layer: what attention transfer matches, and how far a linearization is from
    its teacher. The teacher runs in eval mode without gradients; the student's outputs keep theirs."""
    family = _pair_family(teacher, student)
    layers = family.layers(teacher)
    seen: list = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def hook(module, args, kwargs, out, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] = (hidden, kwargs.get("position_ids"), kwargs.get("position_embeddings"), out[0])
        hooks.append(getattr(layer, family.attention).register_forward_hook(hook, with_kwargs=True))
    was = teacher.training
    try:
        teacher.eval()
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)
    finally:
        teacher.train(was)
        for h in hooks:
            h.remove()
    return [(getattr(layer, family.attention)(hidden, position_ids=pos, position_embeddings=emb)[0], target)
            for layer, (hidden, pos, emb, target) in zip(family.layers(student), seen)]
