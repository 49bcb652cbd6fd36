"""The library on a CUDA GPU: exactness against the float64 references (computed on the CPU), the layer under
bfloat16 autocast, checkpointing, ``torch.compile`` and ``.to()``, streaming against the full pass, memory
linear in N, and no host synchronisation inside the engine beyond its one deferred check per forward.

Every case here needs a GPU; on CPU-only machines (CI) the module is skipped with that reason. The same cases on
the CPU are in the other test files.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from linrope import AttentionState, LinearRotaryAttention, RotaryEmbedding, favor_attention, linear_attention
from linrope.features import FavorPlus
from lab.bench.gpu import sync_sites
from reference import assert_close, eq19, favor_eq19, rotation_matrices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
CUDA = "cuda"


def _on(device, *ts, dtype=torch.float32):
    return [t.to(device, dtype).requires_grad_() for t in ts]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("scale", [1.0, 4.0], ids=["std1", "std4"])
def test_favor_eq19_on_cuda_matches_the_float64_reference(causal, scale):
    """float32 on the GPU against eq. 19 on exact FAVOR+ features in float64 on the CPU, outputs and gradients,
    at activations where the features span many decades (std 4 inputs, d=16)."""
    torch.manual_seed(0)
    q, k = (scale * torch.randn(2, 3, 300, 16, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 300, 8, dtype=torch.float64)
    W = FavorPlus(16, 32, seed=1).double().projection
    for t in (q, k, v):
        t.requires_grad_()
    ref = favor_eq19(q, k, v, W, causal=causal, rope="interleaved")
    g = torch.randn_like(ref)
    dref = torch.autograd.grad(ref, (q, k, v), g)
    qc, kc, vc = _on(CUDA, q.detach(), k.detach(), v.detach())
    got = favor_attention(qc, kc, vc, W.float().to(CUDA), causal=causal, rotary=RotaryEmbedding(32), chunk_size=32,
                          group_size=64)
    assert got.device.type == CUDA
    assert_close("cuda out", ref, got.cpu(), rtol=2e-5 if scale == 1 else 2e-4)
    for name, a, b in zip("qkv", dref, torch.autograd.grad(got, (qc, kc, vc), g.float().to(CUDA))):
        assert_close(f"cuda d{name}", a, b.cpu(), rtol=1e-4 if scale == 1 else 2e-3)


def test_linear_attention_with_mask_holes_on_cuda_matches_the_reference():
    torch.manual_seed(0)
    qf, kf = (torch.rand(2, 2, 130, 12, dtype=torch.float64) + 0.05 for _ in range(2))
    v = torch.randn(2, 2, 130, 5, dtype=torch.float64)
    mask = torch.rand(2, 130) > 0.3
    mask[:, 0] = False  # a leading hole: rows before the first key return 0
    R = rotation_matrices(torch.arange(130), 12)
    for causal in (True, False):
        ref = eq19(qf, kf, v, causal=causal, R=R, mask=mask)
        got = linear_attention(*(t.float().to(CUDA) for t in (qf, kf, v)), causal=causal, rotary=RotaryEmbedding(12),
                               key_padding_mask=mask.to(CUDA), chunk_size=16, group_size=32)
        assert_close(f"mask causal={causal}", ref, got.cpu(), rtol=1e-5)


def test_streaming_steps_on_cuda_equal_the_full_pass():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, device=CUDA) for _ in range(3))
    W = FavorPlus(8, 16, seed=0).projection.to(CUDA)
    rot = RotaryEmbedding(16)
    full = favor_attention(q, k, v, W, causal=True, rotary=rot)
    state, outs = None, []
    for t in range(40):
        o, state = favor_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], W, causal=True,
                                   rotary=rot, initial_state=state, return_state=True)
        outs.append(o)
    assert isinstance(state, AttentionState) and state.numerator.device.type == CUDA
    assert_close("steps", full.double().cpu(), torch.cat(outs, 2).cpu(), rtol=1e-5)


def test_the_engine_synchronises_once_per_forward_and_never_in_the_backward():
    """Many groups (N=4096, groups of 256): one host read per forward (the deferred jump check), none per group
    and none in the backward."""
    q, k, v = (torch.randn(1, 4, 4096, 32, device=CUDA, requires_grad=True) for _ in range(3))
    W = FavorPlus(32, 64, seed=0).projection.to(CUDA)
    rot = RotaryEmbedding(64)
    run = lambda: favor_attention(q, k, v, W, causal=True, rotary=rot, group_size=256)  # noqa: E731
    out = run()
    out.sum().backward()  # warm-up: RoPE tables, workspace sizes
    sync_sites(run)  # the process's first watched call: torch adds one of its own (in torch.cuda) there
    box = []
    where = sync_sites(lambda: box.append(run()))
    assert len(where) == 1, where
    where = sync_sites(lambda: box[0].sum().backward())
    assert where == [], where


def test_the_layer_with_decay_synchronises_once_per_forward():
    """The layer around the engine adds no host reads (its decay rates are checked on the CPU and copied without
    one): forward one (the engine's), backward none."""
    torch.manual_seed(0)
    layer = LinearRotaryAttention(64, heads=4, dim_head=16, nb_features=32, causal=True, decay="multiscale").to(CUDA)
    x = torch.randn(2, 2048, 64, device=CUDA, requires_grad=True)
    layer(x).sum().backward()
    sync_sites(lambda: layer(x))  # the process's first watched call may add torch's own
    box = []
    where = sync_sites(lambda: box.append(layer(x)))
    assert len(where) == 1, where
    where = sync_sites(lambda: box[0].sum().backward())
    assert where == [], where


# ---------------------------------------------------------------------------------------------- the layer
def _layer():
    torch.manual_seed(0)
    return LinearRotaryAttention(64, heads=4, dim_head=16, nb_features=32, causal=True)


def test_layer_to_cuda_matches_cpu_and_autocast_tracks_float32():
    layer = _layer()
    x = torch.randn(2, 100, 64)
    ref = layer(x)
    layer_gpu = _layer().to(CUDA)
    layer_gpu.load_state_dict(layer.state_dict())
    xg = x.to(CUDA).requires_grad_()
    y = layer_gpu(xg)
    assert_close("layer cuda", ref.double(), y.cpu(), rtol=1e-5)
    y.square().sum().backward()
    g32 = xg.grad.clone()
    xg.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb = layer_gpu(xg)
    assert yb.dtype == torch.bfloat16
    yb.float().square().sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert ((yb.float() - y).abs().max() / y.abs().max()).item() < 3e-2
    assert ((xg.grad - g32).abs().max() / g32.abs().max()).item() < 5e-2


def test_layer_checkpointed_and_compiled_on_cuda_match_eager():
    layer = _layer().to(CUDA)
    x = torch.randn(2, 64, 64, device=CUDA)
    grad = torch.randn_like(x)

    def run(call):
        xx = x.clone().requires_grad_()
        y = call(xx)
        y.backward(grad)
        return y.detach(), xx.grad, [p.grad.clone() for p in layer.parameters()]

    eager = run(layer)
    layer.zero_grad()
    ckpt = run(lambda xx: checkpoint(layer, xx, use_reentrant=False))
    layer.zero_grad()
    comp = run(torch.compile(layer, dynamic=False))
    for name, other in (("checkpoint", ckpt), ("compile", comp)):
        assert torch.allclose(other[0], eager[0], rtol=1e-5, atol=1e-6), name
        assert torch.allclose(other[1], eager[1], rtol=1e-4, atol=1e-6), name


def test_engine_memory_on_cuda_grows_linearly_with_n():
    """Peak memory of forward+backward above the inputs: doubling N at most doubles it (plus slack), where
    softmax's N x N would quadruple."""
    W = FavorPlus(64, 256, seed=0).projection.to(CUDA)
    rot = RotaryEmbedding(256)
    peaks = []
    for n in (16384, 32768):
        q, k, v = (torch.randn(1, 8, n, 64, device=CUDA, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        favor_attention(q, k, v, W, causal=True, rotary=rot).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v
    assert peaks[1] / peaks[0] < 2.1, peaks
