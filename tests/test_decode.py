import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linrope import AttentionState, KVCache
from lab.decode import build_layer, decode_point, decode_profile, state_bytes, write_decode


def test_state_bytes_counts_the_tensors():
    st = AttentionState(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8), torch.zeros(1, 2), 5)
    assert state_bytes(st) == 4 * (64 + 16 + 2)
    kv = KVCache(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4, dtype=torch.float64), None, 10)
    assert state_bytes(kv) == 80 * 4 + 80 * 8
    with pytest.raises(TypeError, match="state: expected an AttentionState or a KVCache, got tuple"):
        state_bytes((1, 2))


def test_preallocated_step_equals_the_layer_step():
    """The floor measured for softmax decoding computes what the layer computes (without the copy)."""
    from lab.decode import _prealloc_step, _state_at
    layer = build_layer("softmax", 16, 2, 8, 8)
    cache = _state_at(layer, "softmax", 30, torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(_prealloc_step(layer, cache)(x)[0], layer(x, state=cache), rtol=1e-5, atol=1e-6)


def test_linear_state_is_constant_and_the_cache_grows_with_the_context():
    kw = dict(dim=16, heads=2, dim_head=8, nb_features=8, tokens=2, warmup=1)
    lin = [decode_point("linear", n, **kw) for n in (3, 40)]
    sm = [decode_point("softmax", n, **kw) for n in (3, 40)]
    assert lin[0]["state_bytes"] == lin[1]["state_bytes"] == 4 * (2 * 8 * 8 + 2 * 8) + 8 * 2  # log_ref: float64
    assert sm[1]["state_bytes"] == 40 / 3 * sm[0]["state_bytes"] == 2 * 40 * 2 * 8 * 4


def test_profile_skips_caches_over_budget_and_writes_files(tmp_path):
    rows = decode_profile((4, 64), max_cache_gib=1e-6, dim=16, heads=2, dim_head=8, nb_features=8, tokens=1,
                          warmup=0)
    assert [(r["kind"], r["status"].split(":")[0]) for r in rows] == [
        ("linear", "ok"), ("linear-cpp", "ok"), ("softmax", "ok"), ("softmax-prealloc", "ok"),
        ("linear", "ok"), ("linear-cpp", "ok"), ("softmax", "skipped"), ("softmax-prealloc", "skipped")]
    assert rows[0]["token_vs_softmax"] > 0 and rows[1]["token_vs_prealloc"] > 0 and rows[4]["token_vs_shortest"] > 0
    write_decode(rows, tmp_path, dict(dim=16, heads=2, nb_features=8))
    assert {p.name for p in tmp_path.iterdir()} == {"decode.csv", "decode.json", "decode.png"}


def test_build_layer_rejects_an_unknown_kind():
    phrase = r"kind: expected one of \('linear', 'linear-cpp', 'softmax', 'softmax-prealloc'\), got 'flash'"
    with pytest.raises(ValueError, match=phrase):
        build_layer("flash", 16, 2, 8, 8)


def test_script_help():
    script = Path(__file__).resolve().parents[1] / "experiments" / "decode.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "ms per generated token" in out.stdout
