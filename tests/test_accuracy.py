"""The accuracy harness (experiments/lab/accuracy.py, experiments/accuracy.py): its float64 reference, its metric, and
that the script runs and writes its files. Fast: tiny shapes only."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import accuracy as acc
from lab.plots import read_rows
from linrope import RotaryEmbedding
from linrope.reference import linear_attention_naive

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "accuracy.py"


# ---------------------------------------------------------------- eq. 19 written plainly (float64, no stabilizing)
def rotation_matrices(n, r, interleaved):
    """Explicit block-diagonal R_m (n, r, r): pair i = (2i, 2i+1) or (i, i + r/2) turned by m 10000^(-2i/r)."""
    R = torch.zeros(n, r, r, dtype=torch.float64)
    m = torch.arange(n, dtype=torch.float64)
    for i in range(r // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + r // 2)
        ang = m * 10000.0 ** (-2 * i / r)
        R[:, a, a], R[:, a, b], R[:, b, a], R[:, b, b] = ang.cos(), -ang.sin(), ang.sin(), ang.cos()
    return R


def plain_features(x, W):
    x = x.double() * x.shape[-1] ** -0.25
    return torch.exp(x @ W.double().t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(W.shape[0])


def plain_eq19(qf, kf, v, *, causal, R=None, mask=None):
    N = qf.shape[2]
    keep = torch.ones(N, N, dtype=torch.float64)
    if causal:
        keep = keep.tril()
    keep = keep if mask is None else keep * mask[:, None, None, :].double()
    den = (qf @ kf.transpose(-1, -2)) * keep
    num = den
    if R is not None:
        rq, rk = torch.einsum("nij,bhnj->bhni", R, qf), torch.einsum("nij,bhnj->bhni", R, kf)
        num = (rq @ rk.transpose(-1, -2)) * keep
    return (num @ v.double()) / den.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pairing", [None, "interleaved", "half"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_reference_matches_plain_float64(causal, pairing, masked, sigma):
    # At small sigma the features exp(W x~ - |x~|^2/2) / sqrt(r) are safe to form directly: eq. 19 evaluated
    # plainly (explicit block-diagonal rotation matrices, no max subtraction) must agree to float64 rounding.
    B, H, N, d, r = 2, 2, 12, 8, 16
    zq, zk, v, W = acc.make_inputs(B, H, N, d, r, seed=3)
    q, k = zq * sigma, zk * sigma
    mask = acc.make_mask(B, N, 0.3, seed=3) if masked else None
    got = acc.reference_eq19(q, k, v, W, causal=causal, pairing=pairing, key_padding_mask=mask)
    R = None if pairing is None else rotation_matrices(N, r, interleaved=pairing == "interleaved")
    qf, kf = plain_features(q, W), plain_features(k, W)
    want = plain_eq19(qf, kf, v, causal=causal, R=R, mask=mask)
    if masked:  # rows that see no key: 0 in the harness, 0/0 in the plain formula
        sees = torch.ones(B, 1, N, N, dtype=torch.bool).tril() if causal else torch.ones(B, 1, N, N, dtype=torch.bool)
        sees = (sees & mask[:, None, None, :]).any(-1)  # (B, 1, N)
        assert causal or sees.all()
        assert not causal or not sees.all()  # causal: the mask does leave rows without keys
        want = torch.where(sees[..., None], want, torch.zeros_like(want))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_stays_finite_where_plain_float64_fails():
    # sigma 40 at d = 64: exp(-|x~|^2/2) underflows float64 (|x~|^2/2 ~ 6400), the stable evaluation does not.
    zq, zk, v, W = acc.make_inputs(1, 1, 16, 64, 32, seed=0)
    q, k = zq * 40, zk * 40
    qf = plain_features(q, W)
    assert (qf == 0).all()
    out = acc.reference_eq19(q, k, v, W, causal=True, pairing="interleaved")
    assert torch.isfinite(out).all() and (out.norm(dim=-1) > 0).all()
    # one key only (row 0, causal): the output is exactly that key's value, whatever the scale
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :].double())


def library_scores(fq, fk, pairing):
    """(R_m fq_m).(R_n fk_n) for all m, n (B, N, N) from the library's float64 reference, the harness's: eq. 19 with
    one-hot values is each score over its row's unrotated normalizer, multiplied back here (one rounding)."""
    n, r = fq.shape[-2], fq.shape[-1]
    onehot = torch.eye(n, dtype=torch.float64).expand(fq.shape[0], 1, n, n)
    rot = RotaryEmbedding(r, interleaved=pairing == "interleaved")
    a = linear_attention_naive(fq[:, None], fk[:, None], onehot, rotary=rot)[:, 0]
    return a * (fq @ fk.transpose(-1, -2)).sum(-1, keepdim=True)


def test_relative_scores_match_explicit_rotation_matrices():
    fq, fk = torch.rand(2, 9, 12, dtype=torch.float64), torch.rand(2, 9, 12, dtype=torch.float64)
    for pairing in acc.PAIRINGS:
        R = rotation_matrices(9, 12, interleaved=pairing == "interleaved")
        rq, rk = torch.einsum("nij,bnj->bni", R, fq), torch.einsum("nij,bnj->bni", R, fk)
        torch.testing.assert_close(library_scores(fq, fk, pairing), rq @ rk.transpose(-1, -2))


def test_relative_scores_are_exact_at_distance_zero_for_extreme_features():
    """Features weighing on different members of a pair: (R q).(R k) rounds to ~1e-16 |q| |k| in float64 when
    rotated absolutely; at distance 0 the exact value is the unrotated q . k."""
    fq = torch.tensor([[[1.0, 1e-30, 1.0, 1e-30]]], dtype=torch.float64).expand(1, 3, 4).clone()
    fk = torch.tensor([[[1e-30, 1.0, 1e-30, 1.0]]], dtype=torch.float64).expand(1, 3, 4).clone()
    for pairing in acc.PAIRINGS:
        diag = library_scores(fq, fk, pairing).diagonal(0, -2, -1)
        torch.testing.assert_close(diag, (fq * fk).sum(-1), rtol=1e-14, atol=0)


def test_row_errors_by_hand():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[3.0, 4.5], [1.0, 0.0], [0.0, 0.0], [0.6, 0.8], [float("nan"), 2.0]])
    err = acc.row_errors(out, ref)
    # 0.5 / 5; exact; 0 for a zero row matched; absolute 1.0 for a zero reference row; NaN -> inf
    assert err.tolist() == pytest.approx([0.1, 0.0, 0.0, 1.0, math.inf])
    s = acc.error_stats(err, threshold=1e-3)
    assert (s["rows"], s["rows_off"], s["frac_off"], s["worst"], s["nonfinite_rows"]) == (5, 3, 0.6, math.inf, 1)
    # shapes (B, H, N, dv) are flattened to rows over the last dim
    e4 = acc.row_errors(out.reshape(1, 1, 5, 2), ref.reshape(1, 1, 5, 2))
    assert e4.shape == (5,) and e4[0] == pytest.approx(0.1)


def _load_script():
    spec = importlib.util.spec_from_file_location("accuracy_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_main_tiny(tmp_path, capsys):
    _load_script().main(["--sigmas", "0.5,4", "--n", "24", "--d", "8", "--r", "16", "--batch", "1", "--heads",
                         "2", "--methods", "linrope,linrope-naive", "--pairing", "both", "--mask-holes", "0.3",
                         "--out", str(tmp_path)])
    for name in ("accuracy.csv", "summary.json", "summary.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = read_rows(tmp_path / "accuracy.csv")
    # 2 sigmas x (causal, bidir) x (none, interleaved, half) x (unmasked, masked) x 2 methods
    assert len(rows) == 2 * 2 * 3 * 2 * 2
    assert {r["method"] for r in rows} == {"linrope", "linrope-naive"}
    measured = [r for r in rows if r["status"] == "ok"]
    assert measured and all(r["rows"] == 1 * 2 * 24 for r in measured)
    small = [r for r in measured if r["sigma"] == 0.5]  # nothing is hard at sigma 0.5
    assert small and all(r["rows_off"] == 0 for r in small)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["seed"] == 0 and summary["config"]["n"] == 24
    out = capsys.readouterr().out
    assert "## linrope:" in out and acc.cpu_name() in out  # the header names the CPU


def test_performer_missing_is_skipped_with_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "performer_pytorch", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "performer_pytorch.performer_pytorch", None)
    rows = acc.run_accuracy(sigmas=(1.0,), n=8, d=4, r=8, batch=1, heads=1, methods=("performer-pytorch",),
                            pairings=(), out=tmp_path)
    assert rows and all(r["status"].startswith("skipped: performer-pytorch not usable") for r in rows)
    assert "performer-pytorch not usable" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(ValueError, match="methods"):
        acc.run_accuracy(methods=("nope",), out="/nonexistent")
    with pytest.raises(ValueError, match="sigmas"):
        acc.run_accuracy(sigmas=(0.0,), out="/nonexistent")
    with pytest.raises(ValueError, match="r:"):
        acc.run_accuracy(r=15, out="/nonexistent")


def test_script_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60,
                         env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for flag in ("--sigmas", "--n", "--d", "--r", "--seed", "--out", "--methods", "--mask-holes"):
        assert flag in res.stdout
