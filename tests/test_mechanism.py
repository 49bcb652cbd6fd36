"""lab.mechanism: the selectivity solver, the kernel formula against the library, copy pairing, the toys."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from linrope.functional import favor_attention
from lab import mechanism as M
from linrope.rotary import RotaryEmbedding

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "mechanism.py"


# ------------------------------------------------------------------------------------------------- the solver
def test_cone_lstsq_matches_projected_gradient_and_kkt():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 8))
    t = rng.standard_normal(20)
    nonneg = np.array([True] * 4 + [False] * 4)
    x, info = M.cone_lstsq(A, t, nonneg)
    assert (x[nonneg] >= 0).all() and info["kkt"] < 1e-9
    assert np.allclose(x, M.cone_lstsq_pgd(A, t, nonneg, steps=5000), atol=1e-6)
    assert (x[nonneg] == 0).any()  # the constraint binds in this draw: otherwise the test would not test it
    free, _ = M.cone_lstsq(A, t, np.zeros(8, bool))
    assert np.allclose(free, np.linalg.lstsq(A, t, rcond=None)[0])


def test_one_pair_by_brute_force():
    """One frequency: K(Delta) = |c| cos(theta Delta + phi) with phi = arg c in [-pi/2, pi/2] (positive features)
    or any phi (free phase); the best SNR over a fine grid of phi must equal the solver's."""
    theta, n, target = 0.3, 64, 8
    d = np.arange(n)

    def grid(lo, hi):
        best = 0.0
        for phi in np.linspace(lo, hi, 20001):
            best = max(best, M.snr_of(np.cos(theta * d + phi), target))
        return best

    for cone, (lo, hi) in (("positive", (-math.pi / 2, math.pi / 2)), ("free", (-math.pi, math.pi))):
        got = M.best_selectivity(np.array([theta]), n=n, target=target, cone=cone, ridge=0.0)
        assert got["snr"] == pytest.approx(grid(lo, hi), rel=1e-6)
    # copy pairing: c real >= 0, K = a cos(theta Delta); with one pair the sign is fixed by cos(8 theta) alone
    got = M.best_selectivity(np.array([theta]), n=n, target=target, cone="copy", ridge=0.0)
    assert got["snr"] == pytest.approx(M.snr_of(np.cos(theta * d), target), rel=1e-9)


def test_exact_indicator_in_the_span():
    """Frequencies 2 pi k / 128, k = 1..64, on 64 distances span R^64: the indicator of distance 8 is reachable,
    with any phase and with Re c >= 0 alike, so the SNR is unbounded (to float64)."""
    theta = M.linear_frequencies(128)
    for cone in ("free", "positive"):
        got = M.best_selectivity(theta, n=64, target=8, cone=cone, ridge=0.0)
        assert got["snr"] > 1e12
        assert np.allclose(got["K"] / got["K"][8], np.eye(64)[8], atol=1e-6)


def test_constraint_holds_and_orders_the_cones():
    theta = M.rope_frequencies(32)
    res = {cone: M.best_selectivity(theta, cone=cone, ridge=1e-4) for cone in M.CONES}
    assert (res["positive"]["c"].real >= 0).all()
    assert (res["copy"]["c"].real >= 0).all() and (res["copy"]["c"].imag == 0).all()
    assert not (res["free"]["c"].real >= 0).all()  # the free optimum needs a phase positivity forbids
    assert res["copy"]["snr"] <= res["positive"]["snr"] <= res["free"]["snr"]
    assert 0.1 < res["positive"]["snr"] < 0.3  # r=32, base 10000: about 0.19 at this ridge
    assert res["positive"]["snr"] == pytest.approx(M.best_selectivity(theta, ridge=1e-4, solver="pgd")["snr"],
                                                   rel=1e-3)


def test_peak_reach():
    theta = np.array([1.0, math.pi / 16, math.pi / 8])  # 8 theta mod 2 pi: 1.72 (out), pi/2 (edge), pi (out)
    assert M.peak_reach(theta, 8).tolist() == [False, True, False]


# -------------------------------------------------------------------------------------- the kernel and the library
def test_kernel_formula_matches_linear_attention():
    g = torch.Generator().manual_seed(1)
    qf, kf = (torch.rand(16, generator=g, dtype=torch.float64) + 0.05 for _ in range(2))
    c = ((qf[0::2] + 1j * qf[1::2]) * (kf[0::2] - 1j * kf[1::2])).numpy()
    K = M.kernel_from_attention(qf, kf, RotaryEmbedding(16), n=40).numpy()
    assert np.allclose(K, M.kernel(c, M.rope_frequencies(16), n=40), rtol=1e-10, atol=1e-12)
    assert np.allclose(K, M.design_matrix(M.rope_frequencies(16), 40) @ np.r_[c.real, c.imag])


def test_copy_pairing_never_peaks_away_from_zero():
    got = M.copy_pairing_check(draws=20, r=16, d=8, n=48)
    assert got["max_rel_excess_copy"] <= 1e-9 and got["frac_peak_away_copy"] == 0
    assert got["frac_peak_away_plain"] > 0  # plain eq. 19 features can peak elsewhere


# ------------------------------------------------------------------------------------------------------ the toys
def test_learned_toy_starts_at_eq19_and_its_phase_enters_the_numerator():
    q, k = torch.randn(2, 1, 24, 8, dtype=torch.float64), torch.randn(2, 1, 24, 8, dtype=torch.float64)
    v = torch.randn(2, 1, 24, 3, dtype=torch.float64)
    attn = M.ToyAttention("linear-rope-learned", 8, 16, seed=0).double()
    assert attn.learned.theta.shape == (1, 8) and torch.allclose(attn.learned.theta[0].double(),
                                                                  torch.tensor(M.rope_frequencies(16)))
    ref = favor_attention(q, k, v, attn.projection, causal=True, rotary=RotaryEmbedding(16))
    assert torch.allclose(attn(q, k, v), ref, atol=1e-10)
    with torch.no_grad():
        attn.learned.phase.fill_(0.3)
    assert not torch.allclose(attn(q, k, v), ref, atol=1e-3)  # the phase enters the numerator
    assert not M.ToyAttention("linear-rope-phase", 8, 16, seed=0).learned.theta.requires_grad


@pytest.mark.parametrize("name", list(M.ATTENTIONS))
def test_toy_shapes_and_content_free(name):
    cfg = M.ToyConfig(attention=name, length=16, distance=3, d=8, dv=8, r=8)
    model = M.OneLayerToy(cfg)
    x, y = cfg.batch(2, torch.Generator().manual_seed(0))
    assert model(x).shape == (2, 16, cfg.symbols)
    q, k, _ = model.qkv(x)
    assert (q == q[:, :, :1]).all() and (k == k[:, :, :1]).all()  # the same q, k at every position
    w = model.weights_last_row()
    assert w.shape == (16,) and np.isfinite(w).all()


def test_toy_trains_three_steps():
    for name, task in (("linear-rope-learned", "lookback"), ("linear-rope", "pair-recall")):
        cfg = M.ToyConfig(attention=name, task=task, length=16, distance=3, num_pairs=4, d=8, dv=8, r=8, steps=3,
                          eval_at=(3,), eval_sequences=4, batch_size=4)
        res = M.train_toy(cfg)
        assert [s for s, _ in res["curve"]] == [3] and 0 <= res["curve"][0][1] <= 1
    assert "theta" in M.train_toy(M.ToyConfig(attention="linear-rope-theta", length=16, distance=3, d=8, dv=8, r=8,
                                              steps=3, eval_at=(3,), eval_sequences=4, batch_size=4))


def test_decay_toy_is_the_library_call_with_decay():
    """The toy's decay variant is favor_attention(decay=gamma): its last-row weights decay with the distance."""
    toy = M.OneLayerToy(M.ToyConfig(attention="linear-nope-decay", gamma=0.5, length=16, d=8, dv=8, r=8))
    w = toy.weights_last_row()  # content-free, no RoPE: the weight at distance t is gamma^t / sum
    assert abs(w.sum() - 1) < 1e-5 and abs(w[1] / w[0] - 0.5) < 1e-5 and abs(w[5] / w[4] - 0.5) < 1e-5


def test_specs_and_optimum_needs_lookback():
    assert M.parse_spec("linear-rope@r=32,steps=300") == ("linear-rope", {"r": 32, "steps": 300})
    with pytest.raises(ValueError):
        M.parse_spec("linear-rope@r=x")
    with pytest.raises(ValueError):
        M.parse_spec("no-such")
    assert M.parse_spec("linear-rope-decay@gamma=0.95+distance=32") == ("linear-rope-decay",
                                                                        {"gamma": 0.95, "distance": 32})
    for bad in ("linear-rope-decay@gamma=1.5", "linear-rope-decay@gamma=fast"):
        with pytest.raises(ValueError, match="gamma= in"):
            M.parse_spec(bad)
    with pytest.raises(ValueError):
        M.OneLayerToy(M.ToyConfig(attention="linear-rope-optimum", task="pair-recall"))


def test_script_help():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--attentions" in res.stdout and "linear-rope-learned" in res.stdout


def test_run_writes_everything(tmp_path):
    lines = []
    cfg = M.MechanismConfig(out=str(tmp_path), rs=(8,), attentions=("linear-rope", "linear-rope-c@r=16"), seeds=(0,),
                            steps=3, recall_attentions=("linear-rope",), recall_seeds=(0,), recall_steps=3, d=8, r=8)
    summary = M.run(cfg, log=lines.append)
    for name in ("capacity.csv", "capacity.png", "toys.csv", "toys_summary.csv", "toys.json", "toys.png",
                 "summary.json", "stdout.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert lines[0].startswith("CPU: ") and any("linear-rope-c@r=16" in line for line in lines)
    assert {r["attention"] for r in summary["toys"]} == {"linear-rope", "linear-rope-c@r=16"}


def test_trained_frequencies_read_the_learned_rotations_of_checkpoints(tmp_path):
    """Rows per layer and head of the runs with learned rotations (other runs are skipped); the counts and the
    selectivity follow from theta as the docstring defines them, checked here on frequencies set by hand."""
    from lab.sweeps import run_positions
    from lab.train import load_model
    run_positions(variants=("linear-rope-learned-decay", "linear-rope"), length=16, distance=2, seeds=(0,), steps=2,
                  out=tmp_path / "pos", progress=False)
    path = tmp_path / "pos" / "runs" / "linear-rope-learned-decay_n16_s0" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    theta = torch.full((2, 16), 0.01)
    theta[1, :5] = 0.5  # head 1: five pairs turn by >= 1 rad over 16 positions
    key = next(k for k in ckpt["model"] if k.endswith("rotary.theta"))
    ckpt["model"][key] = theta
    torch.save(ckpt, path)
    rows = M.trained_frequencies(tmp_path / "pos" / "runs", n=16, target=2)
    model, _ = load_model(path)
    assert len(rows) == len(model.blocks) * 2 and {r["run"] for r in rows} == {"linear-rope-learned-decay_n16_s0"}
    first = [r for r in rows if r["layer"] == int(key.split(".")[1])]
    init = RotaryEmbedding(32).frequencies().double().numpy()
    assert [r["live"] for r in first] == [0, 5] and first[0]["live_init"] == int((np.abs(init) * 16 >= 1).sum())
    assert first[1]["gamma"] == pytest.approx(1 - 2 ** -6)
    assert first[1]["snr"] == pytest.approx(M.best_selectivity(theta[1].double().numpy(), n=16, target=2, cone="free",
                                                               gamma=1 - 2 ** -6)["snr"])
    assert 0 <= rows[0]["accuracy"] <= 1
    assert "live pairs" in M.trained_frequencies_markdown(rows)
    with pytest.raises(ValueError, match="runs: no checkpoint with learned rotations under"):
        M.trained_frequencies(tmp_path / "pos" / "runs" / "linear-rope_n16_s0")
