import pytest
import torch

from linrope.models import VARIANTS, ByteLM, ModelConfig, sinusoidal_positions

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
    assert attn("linear-rope").rope == "features" and not attn("linear-rope").rotate_normalizer
    assert attn("linear-rope-inputs").rope == "inputs"
    assert attn("linear-rope-rotden").rotate_normalizer
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
    a.step_projections(1)  # what the training loop calls after optimizer step 1
    assert not any(torch.equal(u, v) for u, v in zip(before, a.projections()))
    b = tiny("linear-rope", redraw_interval=1, feature_seed=5)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 19))
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_tied_embeddings_receive_the_output_gradient():
    model = tiny("softmax-rope")
    assert sum(p.numel() for p in model.parameters()) == model.num_params()
    assert not any(n.startswith("head") for n, _ in model.named_parameters())
    model(torch.randint(0, 256, (1, 5)))[0, -1, 7].backward()
    assert model.embed.weight.grad[7].abs().sum() > 0


@pytest.mark.parametrize("kw, name", [(dict(attention="linear-rope-nope"), "attention"),
                                      (dict(feature_map="softmax"), "feature_map"),
                                      (dict(dim=30, heads=4), "dim"), (dict(n_layer=0), "n_layer"),
                                      (dict(abs_scale=-1.0), "abs_scale")])
def test_bad_config_names_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**kw)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="idx"):
        tiny("linear-rope")(torch.randn(2, 5))
    with pytest.raises(TypeError, match="config"):
        ByteLM(dict(attention="linear-rope"))
