"""``precision=``: the attention products in TF32 or bfloat16 (tensor cores) with everything else in float32.

Without a GPU the lowered precisions run *emulated* (``products.EMULATE``: the products' inputs rounded as tensor
cores round them, then float32 products), the same arithmetic up to the order of the sums; on a CUDA machine the
same tests run the real tensor-core products. Each precision is held to a budget derived from its rounding u
(2^-11 for TF32, 2^-8 for bfloat16): a row may move by what rounding the inputs of its products moves it,
4 u kappa_m (``eq19_condition`` with each rotated product term rounded: the two features, the value, and the score
or state they meet again), and no more; the distance-0 terms and the normalizer are float32 (an error of u
relative to a row's whole normalizer would not fit)."""

import pytest
import torch

from linrope import LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope._engine import products
from linrope.features import favor_plus, gaussian_orthogonal_matrix
from reference import eq19_condition, favor_eq19, favor_log_features

LOWERED = ("tf32", "bfloat16")
UNIT = {"tf32": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff of the products' inputs
CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def lowered(monkeypatch):
    """The lowered precisions: on a CPU, emulated."""
    if not CUDA:
        monkeypatch.setattr(products, "EMULATE", True)


def _round(x, precision):
    """x rounded to ``precision`` as the tensor cores take it, in float64."""
    if precision == "bfloat16":
        return x.to(torch.bfloat16).double()
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()


def _row_errors(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)


def _inputs(sigma, seed, B=1, H=2, N=200, d=32, r=64, dv=32):
    g = torch.Generator().manual_seed(seed)
    q, k = (sigma * torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g, dtype=torch.float64)
    return q, k, v, gaussian_orthogonal_matrix(r, d, generator=g).double()


def _kappa(q, k, v, W, causal, rope):
    """Per row, how far rounding each rotated product term (features, value, score or state) by a relative u
    may move it, over u: ``eq19_condition`` on the exact FAVOR+ features, every rotated term counted in full."""
    lq, lk = favor_log_features(q, W), favor_log_features(k, W)
    qf, kf = torch.exp(lq - lq.amax(-1, keepdim=True)), torch.exp(lk - lk.amax((-1, -2), keepdim=True))
    pos = torch.arange(q.shape[2]) if rope else torch.zeros(q.shape[2])
    return eq19_condition(qf, kf, v, causal=causal, positions=pos, rotation_rounding=1.0)


@pytest.mark.usefixtures("lowered")
@pytest.mark.parametrize("precision", LOWERED)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("rope", [None, "interleaved"])
@pytest.mark.parametrize("sigma", [1.0, 3.0, 5.0])
def test_each_precision_moves_a_row_by_the_rounding_of_its_products_only(precision, causal, rope, sigma):
    q, k, v, W = _inputs(sigma, seed=int(sigma * 10) + causal)
    rot = None if rope is None else RotaryEmbedding(W.shape[0])
    ref = favor_eq19(q, k, v, W, causal=causal, rope=rope)
    bound = 4 * UNIT[precision] * _kappa(q, k, v, W, causal, rope) / ref.norm(dim=-1) + 1e-5
    x = [t.float().to(DEVICE) for t in (q, k, v, W)]
    got = favor_attention(*x, causal=causal, rotary=rot, precision=precision, chunk_size=32)
    err = _row_errors(got, ref)
    worst = int((err / bound).argmax())
    assert (err <= bound).all(), (f"row {worst}: {err.flatten()[worst]:.2e} > {bound.flatten()[worst]:.2e}")
    exact = favor_attention(*x, causal=causal, rotary=rot, chunk_size=32)
    assert _row_errors(exact, ref).max() < err.max() / 4  # the products do round: the test can tell


@pytest.mark.usefixtures("lowered")
@pytest.mark.parametrize("precision", LOWERED)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gradients_keep_to_the_error_of_rounded_inputs(precision, causal):
    """The gradients of q, k and v against float64 ones, each within twice the change that rounding q, k and v
    to the precision makes to the float64 gradient, plus a constant."""
    q, k, v, W = _inputs(2.0, seed=5, N=96)
    rot = RotaryEmbedding(W.shape[0])
    g_out = torch.randn(*v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(q, k, v, fn):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fn(*x).backward(g_out.to(x[0].device, x[0].dtype))
        return [t.grad.double().cpu() for t in x]

    def reference(q, k, v):
        return favor_eq19(q, k, v, W, causal=causal, rope="interleaved")

    ref = grads(q, k, v, reference)
    rounded = grads(*(_round(t, precision) for t in (q, k, v)), reference)
    got = grads(*(t.float().to(DEVICE) for t in (q, k, v)),
                lambda *x: favor_attention(*x, W.float().to(DEVICE), causal=causal, rotary=rot, precision=precision,
                                           chunk_size=32))
    for name, a, b, c in zip("qkv", got, rounded, ref):
        scale = c.abs().max()
        err, budget = (a - c).abs().max() / scale, 2 * (b - c).abs().max() / scale + 1e-4
        assert err <= budget, (name, float(err), float(budget))


def test_float32_is_the_default_bit_for_bit():
    q, k, v, W = (t.float() for t in _inputs(2.0, seed=3, N=70))
    rot = RotaryEmbedding(W.shape[0])
    for causal in (True, False):
        a = favor_attention(q, k, v, W, causal=causal, rotary=rot)
        b = favor_attention(q, k, v, W, causal=causal, rotary=rot, precision="float32")
        assert torch.equal(a, b)


@pytest.mark.usefixtures("lowered")
def test_the_layer_and_linear_attention_take_the_precision():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64, device=DEVICE)
    exact = LinearRotaryAttention(64, heads=4, nb_features=32, causal=True).to(DEVICE)
    low = LinearRotaryAttention(64, heads=4, nb_features=32, causal=True, precision="bfloat16").to(DEVICE)
    low.load_state_dict(exact.state_dict())
    a, b = exact(x), low(x)
    assert 0 < float((a - b).abs().max()) < 0.05 * float(a.detach().abs().max())
    q, k, v, W = (t.float().to(DEVICE) for t in _inputs(1.0, seed=4, N=50))
    (fq, _), (fk, ks) = favor_plus(q, W, is_query=True), favor_plus(k, W, is_query=False)
    a = linear_attention(fq, fk, v, k_logscale=ks, causal=True)
    b = linear_attention(fq, fk, v, k_logscale=ks, causal=True, precision="tf32")
    assert 0 < float((a - b).abs().max()) < 0.01 * float(a.abs().max())


def test_a_precision_that_cannot_run_is_refused_by_name():
    q, k, v, W = (t.float() for t in _inputs(1.0, seed=6, N=8))
    with pytest.raises(ValueError, match="precision: expected \"float32\", \"tf32\" or \"bfloat16\", got 'fp16'"):
        favor_attention(q, k, v, W, causal=True, precision="fp16")
    with pytest.raises(ValueError, match="precision: expected"):
        LinearRotaryAttention(32, heads=2, precision="half")
    if not CUDA:
        with pytest.raises(ValueError, match="precision='bfloat16': a CUDA tensor-core format; got cpu tensors"):
            favor_attention(q, k, v, W, causal=True, precision="bfloat16")
        layer = LinearRotaryAttention(32, heads=2, causal=True, precision="tf32")
        with pytest.raises(ValueError, match="precision='tf32': a CUDA tensor-core format"):
            layer(torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="precision='tf32': lowers the products of float32 compute, but these "
                                         "inputs compute in torch.float64"):
        favor_attention(q.double(), k.double(), v.double(), W.double(), causal=True, precision="tf32")
    with pytest.raises(ValueError, match="precision='bfloat16': the \"torch\" kernel only"):
        favor_attention(q, k, v, W, causal=True, precision="bfloat16", kernel="cpp")
