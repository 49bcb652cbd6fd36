import math

import pytest
import torch

from linrope.lab.bench import causal_flops, combine_rounds, evaluate, memory_profile, plot_profile
from linrope.lab.profiling import Record, measure, run_point, run_series


def test_measure_returns_a_record_with_time_and_memory():
    rec = measure(lambda: torch.ones(4096, 1024).sum(), case="ones", repeats=3)
    assert rec.status == "ok" and len(rec.times) == 3 and rec.seconds == sorted(rec.times)[1]
    assert rec.peak_mib is not None and rec.peak_mib >= 0


def test_run_point_measures_in_a_fresh_process_and_reports_failures():
    rec = run_point("linrope.lab.bench.cases:case_linrope", dict(n=256, h=2, d=16, r=32), repeats=1, timeout=120)
    assert rec.status == "ok" and rec.seconds > 0 and rec.peak_mib > 0
    bad = run_point("linrope.lab.bench.cases:no_such_case", dict(n=1), repeats=1)
    assert bad.status.startswith("failed") and "no_such_case" in bad.status


def test_rounds_take_the_median_of_the_processes_medians_and_keep_the_first_memory():
    a = Record("c", {}, "ok", 1.0, [0.9, 1.0, 1.1], 100.0)
    b = Record("c", {}, "ok", 3.0, [3.0, 3.0, 3.0], 500.0)  # one slow process: the median shrugs it off
    c = Record("c", {}, "ok", 1.2, [1.2, 1.2, 1.3], 400.0)
    out = combine_rounds(combine_rounds(a, b), c)
    assert out.rounds == [1.0, 3.0, 1.2] and out.seconds == 1.2 and out.peak_mib == 100.0 and len(out.times) == 9
    assert a.rounds == [] and a.seconds == 1.0  # inputs untouched
    failed = combine_rounds(a, Record("c", {}, "timeout after 9 s"))
    assert failed.status == "round failed: timeout after 9 s"


def test_series_stops_at_the_time_budget():
    recs = run_series("linrope.lab.bench.cases:case_sdpa", [64, 128, 256], dict(h=1, d=8), time_budget=0.0, repeats=1)
    assert recs[0].status == "ok" and all(r.status.startswith("skipped") for r in recs[1:])


def test_memory_profile_writes_a_plot(tmp_path):
    recs = memory_profile([128], series=["eq.19 causal", "sdpa causal"], modes=["fwd+bwd"], repeats=1)
    assert {r.params["series"] for r in recs} == {"eq.19 causal", "sdpa causal"}
    plot_profile(recs, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"series: unknown \['flash-linear'\]; expected some of \["):
        memory_profile([128], series=["flash-linear"])


def test_targets_are_ratios_of_the_records():
    def rec(s, m):
        return Record("c", {}, "ok", s, [s], m)
    recs = {"ours": rec(1.0, 100), "ours_norope": rec(0.8, 90), "ours_2n": rec(2.0, 201), "ours_mem": rec(0.2, 50),
            "ours_bidir": rec(0.5, 80), "sdpa": rec(6.0, 200), "layer_linear": rec(1.5, 600),
            "layer_softmax": rec(6.0, 500), "matmul": rec(2 * 2048**3 / 160e9, 1), "ft": rec(2.5, 1000),
            "performer_noncuda_mem": rec(6.0, 2400), "performer_bidir": rec(1.7, 880)}
    t = {x.name.split(",")[0]: x for x in evaluate(recs)}
    assert t["speed-up over FAVOR+ features + fast-transformers causal kernel"].measured == pytest.approx(2.5)
    assert t["speed-up over SDPA causal"].met
    assert t["memory growth 32768/16384"].measured == pytest.approx(2.01) and t["memory growth 32768/16384"].met
    assert t["RoPE overhead"].measured == pytest.approx(1.25) and not t["RoPE overhead"].met
    assert t["layer peak memory vs SoftmaxAttention"].measured == pytest.approx(1.2)
    assert t["useful FLOP rate / square-matmul rate"].measured == pytest.approx(causal_flops(16384) / 1.0 / 160e9)
    del recs["ft"]
    assert {x.name.split(",")[0]: x for x in evaluate(recs)}[
        "speed-up over FAVOR+ features + fast-transformers causal kernel"].met is None


def test_flop_count_matches_the_formula_by_hand():
    # d = r = dv = C = 2, one position, one head, no RoPE
    fwd = 4 * 4 + 2 * 4 + 2 * 4 + 4 * 4 + 5 * 2
    bwd = 4 * 4 + 4 * 4 + 4 * 4 + 8 * 4 + 6 * 2
    assert causal_flops(1, heads=1, d=2, r=2, dv=2, chunk=2, rotary=False) == fwd + bwd
    assert math.isclose(causal_flops(16384) / causal_flops(8192), 2.0)


def test_profile_update_replaces_only_the_remeasured_series(tmp_path):
    from linrope.lab.bench import merge_profile, read_profile, write_profile

    def rec(series, mode, n, s):
        return Record("c", dict(series=series, mode=mode, n=n), "ok", s, [s], 1.0)
    old = [rec("sdpa causal", "fwd", 1024, 1.0), rec("eq.19 causal", "fwd", 1024, 2.0)]
    write_profile(old, str(tmp_path))
    merged = merge_profile(read_profile(str(tmp_path)), [rec("eq.19 causal", "fwd", 1024, 0.5)])
    assert [(r.params["series"], r.seconds) for r in merged] == [("sdpa causal", 1.0), ("eq.19 causal", 0.5)]


def test_compare_times_an_earlier_commit_beside_this_checkout():
    """The A/B harness behind BENCHMARKS.md's before/after tables: both versions run, each in its own process
    with its own library (the earlier one extracted with git archive), and the ratio is reported."""
    from linrope.lab.bench.compare import compare
    rows = compare("HEAD", points=(("tiny", "linrope", dict(n=64, h=1, r=8, d=4)),), rounds=1, repeats=1)
    (row,) = rows
    assert row["then_status"] == row["now_status"] == "ok", row
    assert row["then_s"] > 0 and row["now_s"] > 0 and row["now_over_then"] > 0
    with pytest.raises(ValueError, match="compare: expected a git revision of this repository, got 'no-such-rev'"):
        compare("no-such-rev", points=(), rounds=1)
