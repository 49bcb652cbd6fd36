"""linrope.hf: Hugging Face causal LMs linearized. Each family's conversion against eq. 19 written out in
float64 on the model's own q, k, v (captured from the teacher's attention), generate against full passes,
padding, GQA and partial rotary, save/load, checkpointing, attention transfer, and errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AttentionInterface, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,  # noqa: E402
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from linrope.hf import (LinropeCache, attention_parameters, attention_transfer, from_pretrained,  # noqa: E402
                        linearize)
from reference import assert_close, eq19_weighted, favor_log_features, rotation_from_angles  # noqa: E402

COMMON = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)
FAMILIES = {  # GQA in three of them, partial rotary (a quarter of the head) in GPT-NeoX
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_key_value_heads=2, **COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, **COMMON)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON)),
}


def teacher(family="llama", dtype=torch.float64):
    torch.manual_seed(0)
    model = FAMILIES[family]().to(dtype).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens: no early stop on a random model
    return model


def batch(B=2, N=10, pad=3):
    ids = torch.randint(0, 48, (B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, :pad] = 0  # left padding
    return ids, mask


_SEEN = {}


def _capture(module, q, k, v, mask, **kwargs):
    _SEEN["qkv"] = (q, k, v)
    return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype), None


AttentionInterface.register("linrope_test_capture", _capture)


def own_qkv(model, attn, hidden, rotate, position_ids):
    """The teacher's q (B, H, N, d), k, v (B, kv, N, d) as its own attention computes them, rotated by its RoPE
    or not (cos 1, sin 0)."""
    cos, sin = model.model.rotary_emb(hidden, position_ids) if hasattr(model, "model") else \
        model.gpt_neox.rotary_emb(hidden, position_ids)
    if not rotate:
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "linrope_test_capture"
    try:
        attn(hidden, position_embeddings=(cos, sin), attention_mask=None, position_ids=position_ids)
    finally:
        model.config._attn_implementation = impl
    return _SEEN["qkv"]


def layer_io(model, layer_index, ids, mask):
    """(input, output) of one linearized attention in a forward of ``model``."""
    family_attn = "attention" if hasattr(model, "gpt_neox") else "self_attn"
    layers = model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers
    got = {}
    hook = getattr(layers[layer_index], family_attn).register_forward_hook(
        lambda m, args, kwargs, out: got.update(x=kwargs.get("hidden_states", args[0] if args else None), y=out[0]),
        with_kwargs=True)
    model(input_ids=ids, attention_mask=mask)
    hook.remove()
    return got["x"], got["y"]


@pytest.mark.parametrize("rope", ["features", "inputs"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_conversion_equals_eq19_on_the_models_own_qkv(family, rope):
    t = teacher(family)
    s = linearize(t, rope=rope, nb_features=16, seed=0)
    ids, mask = batch()
    N = ids.shape[1]
    t_layers = t.gpt_neox.layers if family == "gpt_neox" else t.model.layers
    t_attn = t_layers[1].attention if family == "gpt_neox" else t_layers[1].self_attn
    s_attn = (s.gpt_neox.layers if family == "gpt_neox" else s.model.layers)[1]
    s_attn = s_attn.attention if family == "gpt_neox" else s_attn.self_attn
    x, y = layer_io(s, 1, ids, mask)
    pos = torch.arange(N)[None]
    q, k, v = own_qkv(t, t_attn, x.detach(), rope == "inputs", pos)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    W = s_attn.linrope.feature_map.projection
    lq, lk = favor_log_features(q, W), favor_log_features(k, W)
    qf, kf = torch.exp(lq - lq.amax(-1, keepdim=True)), torch.exp(lk - lk.amax((-1, -2), keepdim=True))
    R = None
    if rope == "features":  # the model's RoPE on the 16 features: its base, half-split pairs, its partial rotary
        params = t.config.rope_parameters
        pairs = max(1, round(params.get("partial_rotary_factor", 1.0) * 8))
        theta = torch.tensor([params["rope_theta"] ** (-2 * i / 16) if i < pairs else 0.0 for i in range(8)],
                             dtype=torch.float64)
        R = rotation_from_angles(torch.arange(N, dtype=torch.float64)[:, None] * theta, interleaved=False)
    out = eq19_weighted(qf, kf, v, Rq=R, Rk=R, weights=torch.ones(N, N, dtype=torch.float64).tril(),
                        mask=mask.bool())
    proj = t_attn.dense if family == "gpt_neox" else t_attn.o_proj
    ref = proj(out.transpose(1, 2).flatten(2))
    assert_close(f"{family} rope={rope}", ref, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_generate_is_the_argmax_of_full_passes_with_left_padding(family):
    s = linearize(teacher(family), nb_features=16, seed=1, decay="multiscale")
    ids, mask = batch(pad=4)
    got = s.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    full, m = ids, mask
    for _ in range(6):
        nxt = s(input_ids=full, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        full, m = torch.cat((full, nxt), 1), torch.cat((m, torch.ones_like(nxt)), 1)
    assert torch.equal(got, full)
    alone = s.generate(ids[1:, 4:], max_new_tokens=6, do_sample=False, pad_token_id=0)  # the padded example alone
    assert torch.equal(alone[0, -6:], got[1, -6:])


def test_sampling_with_the_cache_equals_sampling_without():
    s = linearize(teacher(), nb_features=16, seed=2)
    ids, mask = batch()
    out = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        out.append(s.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0,
                              use_cache=use_cache, pad_token_id=0))
    assert torch.equal(*out)


def test_decoding_state_is_constant_in_the_generated_length():
    s = linearize(teacher(dtype=torch.float32), nb_features=16, seed=3)
    ids = torch.randint(0, 48, (1, 5))
    cache = s(input_ids=ids, use_cache=True).cache
    assert isinstance(cache, LinropeCache) and cache.get_seq_length() == 5

    def nbytes(c):
        return sum(t.numel() * t.element_size() for st in c.states.values()
                   for t in (st.numerator, st.key_sum, st.log_ref))

    size = nbytes(cache)
    step = ids[:, -1:]
    for _ in range(40):
        out = s(input_ids=step, cache=cache, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        assert nbytes(out.cache) == size
    assert cache.get_seq_length() == 45


def assert_steps_are_the_full_pass(model, N: int, prefix: int) -> None:
    """A prefix with use_cache, then one token at a time through the cache: the logits of one full pass."""
    ids = torch.randint(0, 48, (2, N))
    full = model(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :prefix], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(prefix, N):
        out = model(input_ids=ids[:, t:t + 1], cache=cache)
        steps.append(out.logits)
    assert_close("stepped", full, torch.cat(steps, 1), rtol=1e-9, atol=1e-11)


def test_each_decoding_step_equals_the_full_pass():
    s = linearize(teacher(), nb_features=16, seed=4, feature_map="hedgehog", rope_learned=True, decay=0.9)
    assert_steps_are_the_full_pass(s, 12, 7)


def test_decoding_with_the_compiled_step_and_a_gate_equals_the_full_pass():
    s = linearize(teacher(), nb_features=16, seed=4, rope_learned=True, gate=True, kernel="cpp")
    assert_steps_are_the_full_pass(s, 12, 7)


def test_save_and_load_restore_the_model_exactly(tmp_path):
    s = linearize(teacher(dtype=torch.float32), nb_features=16, seed=5, feature_map="hedgehog",
                  rope_learned=True, decay="multiscale")
    with torch.no_grad():
        for p in attention_parameters(s):
            p.add_(0.1 * torch.randn_like(p))  # as after training
    s.save_pretrained(tmp_path)
    back = from_pretrained(tmp_path)
    assert type(back).__name__ == type(s).__name__ and back.config.linrope == s.config.linrope
    ids, mask = batch()
    assert torch.equal(s(input_ids=ids, attention_mask=mask).logits, back(input_ids=ids, attention_mask=mask).logits)
    sd, bd = s.state_dict(), back.state_dict()
    assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd)


def test_the_teacher_is_untouched():
    t = teacher()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ids, mask = batch()
    logits = t(input_ids=ids, attention_mask=mask).logits
    s = linearize(t, feature_map="hedgehog", nb_features=16)
    attention_transfer(t, s, [ids], steps=2, finetune_steps=1)
    assert type(t) is LlamaForCausalLM and not hasattr(t.config, "linrope")
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    assert torch.equal(logits, t(input_ids=ids, attention_mask=mask).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    s = linearize(teacher(), nb_features=16, seed=6, feature_map="hedgehog")
    ids = torch.randint(0, 48, (2, 10))
    grads = []
    for ckpt in (False, True):
        s.train()
        if ckpt:
            s.activation_checkpointing_enable()
        s.zero_grad()
        s(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".linrope." in n for n in grads[0])
    for n in grads[0]:
        assert_close(n, grads[0][n], grads[1][n], rtol=1e-10, atol=1e-14)


def test_attention_transfer_trains_only_the_new_map_then_fine_tunes():
    t = teacher(dtype=torch.float32)
    with torch.no_grad():  # peaked attention, as in a trained model (a random init's is near uniform)
        for layer in t.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    s = linearize(t, feature_map="hedgehog", nb_features=16, seed=7)
    base = {n: p.clone() for n, p in s.named_parameters() if ".linrope." not in f".{n}"}
    batches = [torch.randint(0, 48, (4, 24)) for _ in range(4)]
    hist = attention_transfer(t, s, batches, steps=60, lr=3e-2)
    assert sum(hist["transfer"][-5:]) < 0.7 * sum(hist["transfer"][:5]), hist["transfer"][::10]
    assert all(torch.equal(p, base[n]) for n, p in s.named_parameters() if n in base)
    hist = attention_transfer(t, s, batches, steps=0, finetune_steps=5, finetune_lr=1e-2)
    assert len(hist["finetune"]) == 5 and hist["transfer"] == []
    assert any(not torch.equal(p, base[n]) for n, p in s.named_parameters() if n in base)


def test_plain_pytorch_training_loop():
    s = linearize(teacher(dtype=torch.float32), nb_features=16, seed=8, decay="multiscale")
    ids = torch.randint(0, 48, (4, 16))
    opt = torch.optim.AdamW(s.parameters(), lr=3e-3)
    s.train()
    losses = []
    for _ in range(15):
        loss = s(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_bad_input_gets_a_clear_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no rotary position embedding"):
        linearize(gpt2)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel .* not supported; supported: .*llama.*gpt_neox"):
        linearize(gpt2, rope=None)
    t = teacher()
    with pytest.raises(ValueError, match=r"heads.*come from the model's config"):
        linearize(t, heads=8)
    with pytest.raises(ValueError, match="unexpected \\['nb_feature'\\]"):
        linearize(t, nb_feature=8)
    with pytest.raises(ValueError, match="rope: expected"):
        linearize(t, rope="both")
    s = linearize(t, nb_features=16)
    with pytest.raises(ValueError, match="already linearized"):
        linearize(s)
    with pytest.raises(TypeError, match="cache: expected a linrope.hf.LinropeCache"):
        s(input_ids=torch.zeros(1, 3, dtype=torch.long), cache=transformers.DynamicCache(config=s.config))
    yarn = LlamaForCausalLM(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64}, **COMMON))
    with pytest.raises(ValueError, match="rope='inputs' applies the model's own RoPE"):
        linearize(yarn)
    linearize(yarn, rope="inputs")  # its own cos/sin: any RoPE type


def test_beam_search_and_several_sequences_reorder_and_repeat_the_states():
    s = linearize(teacher(), nb_features=16, seed=9, decay="multiscale")
    ids, mask = batch()
    for kwargs in (dict(num_beams=3, do_sample=False), dict(num_return_sequences=2, do_sample=True, top_k=0)):
        out = []
        for use_cache in (True, False):
            torch.manual_seed(11)
            out.append(s.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=use_cache, pad_token_id=0,
                                  **kwargs))
        assert torch.equal(*out), kwargs


@pytest.mark.parametrize("options", [dict(gate=True), dict(selective=True, gate=True, decay="multiscale")])
def test_gated_and_selective_linearizations_decode_as_their_full_pass(options):
    s = linearize(teacher(), nb_features=16, seed=10, **options)
    names = [n for n, _ in s.named_parameters() if ".linrope." in f".{n}"]
    assert any("gate_proj" in n for n in names)
    assert ("selective" not in options) or any("clock_proj" in n for n in names)
    assert_steps_are_the_full_pass(s, 9, 5)


def test_a_bfloat16_model_keeps_its_dtype_and_float32_attention_parameters():
    s = linearize(teacher(dtype=torch.bfloat16), nb_features=16, seed=12, feature_map="hedgehog", gate=True)
    assert all(p.dtype == torch.float32 for p in attention_parameters(s))
    ids = torch.randint(0, 48, (2, 8))
    out = s(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in attention_parameters(s))
    assert s.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 11)
