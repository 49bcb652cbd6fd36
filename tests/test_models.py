import math

import pytest
import torch

from lab.models import VARIANTS, ByteLM, ModelConfig, RotatedNormalizerAttention, sinusoidal_positions
from linrope import LinearRotaryAttention

TINY = dict(n_layer=1, dim=16, heads=2, nb_features=8, chunk_size=8)


def tiny(attention, **kw):
    return ByteLM(ModelConfig(attention=attention, **{**TINY, **kw}))


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_every_variant_is_causal_and_gives_256_logits(attention):
    model = tiny(attention).eval()
    x = torch.randint(0, 256, (2, 21))
    logits = model(x)
    assert logits.shape == (2, 21, 256) and torch.isfinite(logits).all()
    x2 = x.clone()
    x2[:, 13:] = torch.randint(0, 256, (2, 8))
    assert torch.allclose(model(x2)[:, :13], logits[:, :13], atol=1e-6)
    assert not torch.allclose(model(x2)[:, 13:], logits[:, 13:], atol=1e-6)


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_every_variant_fits_a_fixed_batch(attention):
    model = tiny(attention)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (2, 33))
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("feature_map", ["favor+", "trig", "relu", "elu"])
def test_feature_maps_of_the_linear_variants_train(feature_map):
    model = tiny("linear-rope", feature_map=feature_map)
    x = torch.randint(0, 256, (2, 17))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.blocks[0].attn.feature_map_name == feature_map


def test_variants_build_the_documented_layers():
    def attn(name):
        return tiny(name).blocks[0].attn
    assert attn("linear-rope").rope == "features" and not isinstance(attn("linear-rope"), RotatedNormalizerAttention)
    assert attn("linear-rope-inputs").rope == "inputs"
    assert isinstance(attn("linear-rope-rotden"), RotatedNormalizerAttention)
    assert attn("linear-nope").rope is None and attn("linear-abs").rope is None
    assert type(attn("softmax-rope")).__name__ == "SoftmaxAttention" and attn("softmax-rope").rope == "inputs"
    assert attn("softmax-abs").rope is None


def test_absolute_positions_are_scaled_to_the_embedding_init():
    model = tiny("linear-abs", dim=64)
    table = model.abs_scale * sinusoidal_positions(512, 64)
    rms = table.pow(2).mean().sqrt().item()
    assert abs(rms - model.config.init_std) < 1e-3
    assert abs(model.embed.weight.std().item() - model.config.init_std) < 3e-3
    # positions change the output of linear-abs, and not of linear-nope built from the same seed
    x = torch.full((1, 8), 65)
    assert not torch.allclose(model(x)[0, 0], model(x)[0, -1])
    torch.manual_seed(0)
    nope = tiny("linear-nope", dim=64)
    assert torch.allclose(nope(x)[0, 0], nope(x)[0, -1], atol=1e-6)


def test_sinusoidal_positions_values():
    t = sinusoidal_positions(5, 6, offset=3)
    assert t.shape == (5, 6)
    assert torch.allclose(t[0, 0], torch.tensor(3.0).sin()) and torch.allclose(t[0, 3], torch.tensor(3.0).cos())
    assert sinusoidal_positions(4, 7)[:, -1].abs().max() == 0  # odd width: a zero column


def test_feature_projections_follow_the_feature_seed():
    a, b = tiny("linear-rope", n_layer=2), tiny("linear-rope", n_layer=2)
    c = tiny("linear-rope", n_layer=2, feature_seed=1)
    pa, pb, pc = a.projections(), b.projections(), c.projections()
    assert len(pa) == 2 and all(torch.equal(u, v) for u, v in zip(pa, pb))
    assert not torch.equal(pa[0], pa[1]) and not torch.equal(pa[0], pc[0])
    assert tiny("softmax-rope").projections() == []


def test_state_dict_round_trip_restores_outputs_and_projections():
    a = tiny("linear-rope", redraw_interval=1)
    before = [p.clone() for p in a.projections()]
    a.train()
    a(torch.randint(0, 256, (1, 9)))  # forwards do not redraw: optimizer steps do
    assert all(torch.equal(u, v) for u, v in zip(before, a.projections()))
    assert a.step_projections(1) == 1  # what the training loop does after optimizer step 1
    assert not any(torch.equal(u, v) for u, v in zip(before, a.projections()))
    b = tiny("linear-rope", redraw_interval=1, feature_seed=5)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 19))
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_redraw_interval_is_counted_in_optimizer_steps_by_every_layer():
    model = tiny("linear-rope", n_layer=3, redraw_interval=2)
    assert [blk.attn.feature_map.redraw_interval for blk in model.blocks] == [2, 2, 2]
    history = [[p.clone() for p in model.projections()]]
    counts = [model.step_projections(step) for step in range(1, 6)]
    assert counts == [0, 3, 0, 3, 0]
    assert [int(blk.attn.feature_map.redraws) for blk in model.blocks] == [2, 2, 2]
    history.append(model.projections())
    assert not any(torch.equal(u, v) for u, v in zip(*history))
    assert tiny("linear-rope", n_layer=2).step_projections(4) == 0  # redraw_interval=None: never
    assert tiny("softmax-rope", redraw_interval=1).step_projections(1) == 0  # nothing random to redraw


def test_checkpoints_written_before_redraws_moved_to_optimizer_steps_still_load():
    a = tiny("linear-rope", n_layer=2, redraw_interval=2)
    a.step_projections(2)
    old = a.state_dict()
    for i in range(2):  # the per-layer forward counter that used to be saved
        old[f"blocks.{i}.attn.feature_map.steps"] = torch.tensor(0)
    b = tiny("linear-rope", n_layer=2, redraw_interval=2, feature_seed=3)
    b.load_state_dict(old)  # strict
    assert all(torch.equal(u, v) for u, v in zip(a.projections(), b.projections()))
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_tied_embeddings_receive_the_output_gradient():
    model = tiny("softmax-rope")
    assert sum(p.numel() for p in model.parameters()) == model.num_params()
    assert not any(n.startswith("head") for n, _ in model.named_parameters())
    model(torch.randint(0, 256, (1, 5)))[0, -1, 7].backward()
    assert model.embed.weight.grad[7].abs().sum() > 0


@pytest.mark.parametrize("kw, error, match", [
    pytest.param(dict(attention="linear-rope-nope"), ValueError, r"attention: expected one of \[.*'linear-rope'.*\], "
                 r"got 'linear-rope-nope'", id="unknown-attention"),
    pytest.param(dict(feature_map="softmax"), ValueError,
                 r"feature_map: expected one of \['elu', 'favor\+', 'hedgehog', 'relu', 'trig'\], got 'softmax'",
                 id="unknown-feature_map"),
    pytest.param(dict(dim=30, heads=4), ValueError, r"dim: expected a multiple of heads=4, got 30",
                 id="indivisible-dim"),
    pytest.param(dict(n_layer=0), ValueError, r"n_layer: expected a positive integer, got 0", id="zero-n_layer"),
    pytest.param(dict(nb_features=2.5), ValueError, r"nb_features: expected a positive integer, got 2\.5",
                 id="float-nb_features"),
    pytest.param(dict(abs_scale=-1.0), ValueError, r"abs_scale: expected None or a number > 0, got -1\.0",
                 id="negative-abs_scale"),
    pytest.param(dict(redraw_interval=0), ValueError,
                 r"redraw_interval: expected None or a positive integer \(optimizer steps\), got 0",
                 id="zero-redraw_interval"),
    pytest.param(dict(feature_seed=-1), ValueError, r"feature_seed: expected an integer >= 0, got -1",
                 id="negative-feature_seed"),
])
def test_bad_config_names_the_argument_and_what_was_expected(kw, error, match):
    with pytest.raises(error, match=match):
        ModelConfig(**kw)


def test_bad_input_names_the_argument_and_what_was_expected():
    with pytest.raises(ValueError, match=r"idx: expected a \(B, N\) int64 tensor of bytes, got torch\.float32"):
        tiny("linear-rope")(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"idx: expected a \(B, N\) int64 tensor of bytes, got list"):
        tiny("linear-rope")([[1, 2]])
    with pytest.raises(TypeError, match=r"config: expected a ModelConfig, got dict"):
        ByteLM(dict(attention="linear-rope"))
    with pytest.raises(ValueError, match=r"step: expected an integer >= 1 \(optimizer steps done\), got 0"):
        tiny("linear-rope").step_projections(0)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoding_with_states_gives_the_logits_of_full_passes(variant):
    """Prompt once, then one byte at a time through the blocks' states (eq. 19: AttentionState; softmax:
    KVCache): every step's logits equal the full pass over the sequence so far (float64, 1e-9)."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(attention=variant, dim=32, n_layer=2, heads=2, nb_features=16)).double().eval()
    idx = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        logits, states = model(idx, return_states=True)
        assert len(states) == 2 and states[0].offset == 7
        seq = idx
        for _ in range(5):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), 1)
            logits, states = model(nxt, states=states, return_states=True)
            full = model(seq)
            torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=1e-9, atol=1e-9)
    greedy = model.generate(idx, 5, temperature=0)
    assert torch.equal(greedy, seq)


def test_generate_samples_reproducibly_and_checks_its_arguments():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(attention="linear-rope", dim=32, n_layer=1, heads=2, nb_features=16)).eval()
    idx = torch.randint(0, 256, (1, 4))
    a = model.generate(idx, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 10) and torch.equal(a, b) and torch.equal(a[:, :4], idx)
    with torch.no_grad():  # top_k=1 is greedy
        assert torch.equal(model.generate(idx, 3, top_k=1), model.generate(idx, 3, temperature=0))
    for kwargs, phrase in ((dict(max_new_tokens=-1), r"max_new_tokens: expected an integer >= 0, got -1"),
                           (dict(max_new_tokens=2, temperature=-1.0), r"temperature: expected a number >= 0"),
                           (dict(max_new_tokens=2, top_k=0), r"top_k: expected a positive integer, got 0")):
        with pytest.raises(ValueError, match=phrase):
            model.generate(idx, **kwargs)
    with pytest.raises(ValueError, match=r"states: expected a list of 1 block states"):
        model(idx, states="nope")


# ---------------------------------------------------------------------------------------------- position baselines
def test_t5_buckets_follow_the_definition():
    """Distances 0..15 get their own bucket; 16..127 share logarithmic buckets 16..31; beyond 128, bucket 31;
    a later key (positive relative position) counts as distance 0 (the causal mask removes it)."""
    from lab.models import t5_buckets
    n = torch.arange(0, 300)
    got = t5_buckets(-n)
    expected = [d if d < 16 else min(31, 16 + int(math.log(d / 16) / math.log(128 / 16) * 16)) for d in n.tolist()]
    assert got.tolist() == expected
    assert got[:16].tolist() == list(range(16)) and got[128:].eq(31).all() and t5_buckets(torch.tensor([3]))[0] == 0


def test_t5_attention_equals_the_explicit_biased_softmax():
    torch.manual_seed(1)
    model = tiny("softmax-t5").double().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    W = attn.inner.to_qkv.weight
    q, k, v = ((x @ W[i * 16:(i + 1) * 16].t()).view(2, 40, 2, 8).transpose(1, 2) for i in range(3))
    from lab.models import t5_buckets
    rel = torch.arange(40)[None, :] - torch.arange(40)[:, None]
    bias = attn.bias.weight[t5_buckets(rel)].permute(2, 0, 1).masked_fill(rel > 0, float("-inf"))
    s = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    ref = attn.to_out((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 40, 16))
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-12)


def test_learned_positions_stop_at_max_len():
    model = tiny("linear-learned", max_len=16).eval()
    assert model(torch.randint(0, 256, (1, 16))).shape == (1, 16, 256)
    with pytest.raises(ValueError, match=r"idx: positions up to 16 need max_len > that; learned absolute positions "
                                         r"stop at max_len = 16"):
        model(torch.randint(0, 256, (1, 17)))


def test_rotated_normalizer_ablation_differs_from_eq19_and_refuses_other_placements():
    torch.manual_seed(0)
    a = LinearRotaryAttention(32, heads=2, dim_head=16, nb_features=16, causal=True, seed=0).double()
    torch.manual_seed(0)
    b = RotatedNormalizerAttention(32, heads=2, dim_head=16, nb_features=16, causal=True, seed=0).double()
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    assert (a(x) - b(x)).abs().max() > 1e-3
    for kw in (dict(rope="inputs"), dict(rope_learned=True, causal=True)):
        with pytest.raises(ValueError, match=r"rope: the rotated-normalizer ablation rotates features"):
            RotatedNormalizerAttention(32, heads=2, **kw)
