"""Group sizes: the cache-sized default and ``group_size="auto"`` (measured once per shape class, cached)."""

import json
import os

import pytest
import torch

from linrope import LinearRotaryAttention
from linrope._engine import tuning
from linrope.features import gaussian_orthogonal_matrix
from linrope.functional import favor_attention, linear_attention
from linrope.rotary import LearnedRotary, RotaryEmbedding

B, H, N, d, r = 1, 2, 200, 16, 32


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINROPE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_MEMORY", {})
    # buffers of 4-16 KiB: several candidate sizes for these small shapes (the real budgets give them one group)
    monkeypatch.setattr(tuning, "BUDGETS", (2**10, 2**11, 2**12))
    return tmp_path / "group_sizes.json"


def _inputs(grad=True):
    q, k, v = (torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    return q, k, v, gaussian_orthogonal_matrix(r, d).double()


def test_auto_matches_a_fixed_size_and_is_cached(cache, monkeypatch):
    q, k, v, W = _inputs()
    rot = RotaryEmbedding(r)
    state = torch.random.get_rng_state()
    out = favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, group_size="auto")
    assert torch.equal(state, torch.random.get_rng_state())  # the probe draws from its own generator
    assert q.grad is None  # and differentiates its own tensors
    entries = json.loads(cache.read_text())
    (key, G), = entries.items()
    assert G % 16 == 0 and "favor|interleaved|causal|B=1|H=2" in key and "r=32" in key
    ref = favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, group_size=16)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    calls = []
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: calls.append(1) or 0.0)
    favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, group_size="auto")
    assert not calls  # from memory
    monkeypatch.setattr(tuning, "_MEMORY", {})
    favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, group_size="auto")
    assert not calls  # from the file: a new process measures nothing


def test_auto_picks_the_fastest_candidate(cache):
    slow = {64: 0.03, 128: 0.01, 256: 0.02}
    clock = [0.0]

    def fake_measure(G):
        clock[0] += slow[G]

    orig = tuning.time.perf_counter
    try:
        tuning.time.perf_counter = lambda: clock[0]
        assert tuning.tune("k", [64, 128, 256], fake_measure) == 128
    finally:
        tuning.time.perf_counter = orig
    assert json.loads(cache.read_text()) == {"k": 128}
    tuning._MEMORY.clear()
    assert tuning.lookup("k", [64, 128, 256]) == 128  # from the file
    tuning._MEMORY.clear()
    assert tuning.lookup("k", [64, 256]) is None  # a kept size that is no longer a candidate is measured again


def test_auto_leaves_learned_rotations_untouched(cache):
    q, k, v, W = _inputs()
    rot = LearnedRotary(r, H).double()
    out = favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, group_size="auto")
    assert rot.theta.grad is None and rot.phase.grad is None
    out.sum().backward()
    g_auto = rot.theta.grad.clone()
    rot.zero_grad()
    favor_attention(q, k, v, W, causal=True, rotary=rot, chunk_size=16, group_size=16).sum().backward()
    torch.testing.assert_close(g_auto, rot.theta.grad, rtol=1e-10, atol=1e-10)


def test_auto_forward_only_and_features(cache):
    qf, kf = torch.rand(B, H, N, r) + 0.1, torch.rand(B, H, N, r) + 0.1
    v = torch.randn(B, H, N, d)
    with torch.no_grad():
        out = linear_attention(qf, kf, v, causal=False, rotary=RotaryEmbedding(r), chunk_size=16, group_size="auto")
    ref = linear_attention(qf, kf, v, causal=False, rotary=RotaryEmbedding(r), group_size=64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert "features|interleaved|bidirectional|B=1" in next(iter(json.loads(cache.read_text())))


def test_auto_is_the_same_with_and_without_gradients(cache):
    """A checkpointed layer runs its first pass without gradients and recomputes with them: one size for both."""
    q, k, v, W = _inputs()
    with torch.no_grad():
        favor_attention(q, k, v, W, causal=True, chunk_size=16, group_size="auto")
    with torch.inference_mode():
        out = favor_attention(q, k, v, W, causal=True, chunk_size=16, group_size="auto")
    favor_attention(q, k, v, W, causal=True, chunk_size=16, group_size="auto").sum().backward()
    assert len(json.loads(cache.read_text())) == 1 and torch.isfinite(out).all()


def test_unwritable_cache_warns_and_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LINROPE_CACHE_DIR", str(blocker / "sub"))  # a folder below a file cannot be made
    monkeypatch.setattr(tuning, "_MEMORY", {})
    monkeypatch.setattr(tuning, "BUDGETS", (2**10, 2**11, 2**12))
    q, k, v, W = _inputs(grad=False)
    with pytest.warns(UserWarning, match="LINROPE_CACHE_DIR"):
        out = favor_attention(q, k, v, W, causal=True, group_size="auto", chunk_size=16)
    assert torch.isfinite(out).all()


def test_layer_takes_group_size(cache):
    x = torch.randn(2, 100, 32)
    layer = LinearRotaryAttention(32, heads=2, nb_features=16, causal=True, chunk_size=16, seed=0)
    ref = layer(x)
    for G in (16, 48, "auto"):
        layer.group_size = G
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -64, 1.5, "big", True])
def test_bad_group_size(bad):
    q, k, v, W = _inputs(grad=False)
    with pytest.raises(ValueError, match='group_size: expected a positive integer, "auto" or None'):
        favor_attention(q, k, v, W, causal=True, group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        LinearRotaryAttention(32, heads=2, causal=True, group_size=bad)


def test_default_group_size(monkeypatch):
    assert tuning.DEFAULT_ELEMENTS == 2**18  # 1 MiB of float32 per (B*H, G, r) buffer
    assert tuning.group_size_for(2**18, 8, 256, 64) == 128
    assert tuning.group_size_for(2**10, 8, 256, 64) == 64  # at least one chunk
    cpu = torch.device("cpu")
    sizes = lambda: [tuning.default_group_size(N, 8, 256, 64, cpu) for N in (512, 1024, 1025, 16384)]  # noqa: E731
    monkeypatch.setattr(tuning, "l2_bytes", lambda: 2 * 2**20)  # the Xeon: L2 2 MiB per core
    assert sizes() == [128, 128, 256, 256]  # more than 8 groups of 128: 2 MiB buffers
    # a GPU: the CPU's L2 is not its; launches, not caches, set the size
    assert tuning.default_group_size(16384, 8, 256, 64, torch.device("cuda")) == \
        tuning.group_size_for(tuning.GPU_ELEMENTS, 8, 256, 64) > 1024
    monkeypatch.setattr(tuning, "l2_bytes", lambda: 32 * 2**20)
    assert sizes()[-1] == 512  # at most 4 MiB
    for l2 in (2**20, 2**19, None):  # the Zen 4 (1 MiB), the AVX2 EPYC (512 KiB), unreadable: 1 MiB throughout
        monkeypatch.setattr(tuning, "l2_bytes", lambda: l2)
        assert sizes() == [128] * 4


def test_machine_key_names_the_processor():
    key = tuning.machine(torch.device("cpu"))
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    assert os.environ["LINROPE_CACHE_DIR"]  # conftest keeps test runs out of ~/.cache


def test_auto_layer_under_checkpointing(cache):
    """The first pass (no gradients, reentrant checkpoint) tunes; the recomputation reads the same size."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layer = LinearRotaryAttention(32, heads=2, nb_features=16, causal=True, chunk_size=16, seed=0,
                                  group_size="auto").double()
    x = torch.randn(2, 100, 32, dtype=torch.float64, requires_grad=True)
    checkpoint(layer, x, use_reentrant=True).square().sum().backward()
    g_ckpt = x.grad.clone()
    x.grad = None
    layer.group_size = 16
    layer(x).square().sum().backward()
    torch.testing.assert_close(g_ckpt, x.grad, rtol=1e-10, atol=1e-12)
    assert len(json.loads(cache.read_text())) == 1
