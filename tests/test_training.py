import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lab.train as train_module
from lab.data import Corpus, LMTask, SyntheticTask
from lab.models import CORE_VARIANTS, RECOMMENDED, VARIANTS, ByteLM, ModelConfig
from lab.plots import plot_curves, plot_long_context, read_rows
from lab.sweeps import PRESETS, Preset, _markdown, parse_list, run_long_context, run_positions, summarize
from lab.train import TrainConfig, evaluate, load_model, lr_at, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=1, dim=16, heads=2, nb_features=8, chunk_size=8)


def text_corpus() -> Corpus:
    text = (b"def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 60)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return Corpus("tiny", data[:2400], data[2400:])


def fast(**kw):
    return TrainConfig(**{**dict(steps=6, batch_size=4, lr=1e-2, warmup=1, log_interval=1, eval_interval=3,
                                 ckpt_interval=100), **kw})


def losses(run_dir):
    return [(r["step"], r["split"], r["loss"], r.get("skipped")) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_every_variant_trains_and_round_trips_through_its_checkpoint(attention, tmp_path):
    task = LMTask(text_corpus(), 32, eval_windows=3)
    model, result = train(ModelConfig(attention=attention, **TINY), fast(), task, tmp_path, progress=False)
    train_losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0] - 0.3, train_losses
    assert result["finished"] and result["skipped"] == 0 and result["step"] == 6
    restored, ckpt = load_model(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["model_config"]["attention"] == attention
    x, y = task.val_batch()
    assert evaluate(restored, x, y) == evaluate(model, x, y)
    assert evaluate(restored, x, y)["loss"] == pytest.approx(result["val"]["loss"], abs=0)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["attention"] == attention


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_gives_the_same_loss_curve_as_an_uninterrupted_run(grad_accum, tmp_path):
    # redraws every 2 optimizer steps, logs every 2 steps and is interrupted at an odd step: the checkpoint must carry
    # the redraw counters, the data generator and the half-filled log interval
    task = LMTask(text_corpus(), 32, eval_windows=2)
    mc = ModelConfig(attention="linear-rope", redraw_interval=2, **TINY)
    cfg = fast(steps=7, log_interval=2, grad_accum=grad_accum)
    whole, _ = train(mc, cfg, task, tmp_path / "a", progress=False)
    _, first = train(mc, cfg, task, tmp_path / "b", stop_after=3, progress=False)
    assert first["step"] == 3 and not first["finished"] and not (tmp_path / "b" / "result.json").exists()
    resumed, second = train(mc, cfg, task, tmp_path / "b", resume=True, progress=False)
    assert second["finished"] and second["step"] == 7
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert [r["step"] for r in read_metrics(tmp_path / "b") if r["split"] == "train"] == [2, 4, 6, 7]
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert int(resumed.blocks[0].attn.feature_map.redraws) > 0


def test_resume_refuses_a_different_configuration(tmp_path):
    task = LMTask(text_corpus(), 32, eval_windows=2)
    mc = ModelConfig(attention="linear-nope", **TINY)
    train(mc, fast(steps=4), task, tmp_path, stop_after=2, progress=False)
    with pytest.raises(ValueError, match=r"resume: expected the same training config as the checkpoint, but "
                                         r"'lr' differs \(0\.01 saved, 0\.005 now\)"):
        train(mc, fast(steps=4, lr=5e-3), task, tmp_path, resume=True, progress=False)


def test_non_finite_steps_are_skipped_counted_and_reported(tmp_path, monkeypatch):
    calls = []
    real_loss = train_module._loss

    def sometimes_nan(logits, y):  # steps 2 and 4 blow up
        calls.append(1)
        loss = real_loss(logits, y)
        return loss * float("nan") if len(calls) in (2, 4) else loss

    monkeypatch.setattr(train_module, "_loss", sometimes_nan)
    model, result = train(ModelConfig(attention="linear-rope-rotden", **TINY), fast(), LMTask(text_corpus(), 32, 2),
                          tmp_path, progress=False)
    assert result["skipped"] == 2 and result["finished"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["skipped"] for r in read_metrics(tmp_path) if r["split"] == "train"] == [0, 1, 1, 2, 2, 2]
    row = {"variant": "v", "length": 32, "seed": 0, "steps": 6, "bpb": float("nan"), "skipped": 2, "s_per_step": 0.1}
    assert summarize([row], "bpb", unigram=4.0)[0]["flags"] == "nan skipped 2"
    stuck = {**row, "bpb": 3.9, "skipped": 0}
    assert summarize([stuck], "bpb", unigram=4.0)[0]["flags"] == "unigram"


def test_learning_rate_schedule_and_config_checks():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(55, cfg) == pytest.approx(0.55)
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of world size x grad_accum = 1 x 2, got 3"):
        train(ModelConfig(**TINY), TrainConfig(batch_size=3, grad_accum=2), LMTask(text_corpus(), 8), "/nonexistent")
    with pytest.raises(ValueError, match=r"variants: unknown \['linear-rope-features'\]; expected names from"):
        run_long_context(variants=("linear-rope", "linear-rope-features"))
    with pytest.raises(ValueError, match=r"lengths: expected a comma-separated list of int, got '512,x'"):
        parse_list("512,x", int, "lengths")
    with pytest.raises(ValueError, match=r"path: expected a checkpoint file, found none at"):
        load_model("/nonexistent/ckpt.pt")


@pytest.mark.parametrize("kw, match", [
    pytest.param(dict(steps=0), r"steps: expected a positive integer, got 0", id="zero-steps"),
    pytest.param(dict(grad_accum=1.5), r"grad_accum: expected a positive integer, got 1\.5", id="float-grad_accum"),
    pytest.param(dict(lr=0.0), r"lr: expected a number > 0, got 0\.0", id="zero-lr"),
    pytest.param(dict(lr=float("nan")), r"lr: expected a number > 0, got nan", id="nan-lr"),
    pytest.param(dict(min_lr_ratio=1.5), r"min_lr_ratio: expected a number in \[0, 1\], got 1\.5",
                 id="min_lr_ratio-above-1"),
    pytest.param(dict(warmup=-1), r"warmup: expected an integer >= 0, got -1", id="negative-warmup"),
    pytest.param(dict(weight_decay=-0.1), r"weight_decay: expected a number >= 0, got -0\.1",
                 id="negative-weight_decay"),
    pytest.param(dict(grad_clip=-1.0), r"grad_clip: expected a number >= 0, got -1\.0", id="negative-grad_clip"),
])
def test_bad_training_config_names_the_argument_and_what_was_expected(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_synthetic_task_trains_with_accuracy(tmp_path):
    task = SyntheticTask("lookback", 16, eval_windows=8, distance=2, symbols=4)
    _, result = train(ModelConfig(attention="softmax-rope", **TINY), fast(steps=3), task, tmp_path, progress=False)
    assert 0 <= result["val"]["accuracy"] <= 1 and result["finished"]


def run_script(name, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "experiments" / name), run_name="__main__")


@pytest.mark.parametrize("name, option", [("long_context.py", "--out"), ("positions.py", "--out"),
                                          ("recall.py", "--out"), ("extrapolation.py", "--out"),
                                          ("memory.py", "--update"), ("bench.py", "--json"), ("demo.py", "--length")])
def test_scripts_help(name, option, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_script(name, "--help", monkeypatch=monkeypatch)
    assert e.value.code == 0 and option in capsys.readouterr().out


def test_scripts_smoke_run_and_write_tables_and_plots(tmp_path, monkeypatch):
    preset = Preset(("linear-rope", "softmax-rope"), (16,), (0, 1), 64, 64, TINY, dict(steps=2, eval_interval=1))
    summary = run_long_context(preset, out=tmp_path / "lc", progress=False)
    assert [(r["variant"], r["seeds"], r["steps"]) for r in summary] == [("linear-rope", 2, 2), ("softmax-rope", 2, 2)]
    for f in ("summary.md", "summary.csv", "results.csv", "long_context.png", "config.json"):
        assert (tmp_path / "lc" / f).stat().st_size > 0
    rows = read_rows(tmp_path / "lc" / "results.csv")  # the figure can be redrawn from the CSV alone
    assert {(r["variant"], r["seed"]) for r in rows if r["split"] == "val" and r["step"] == 2} == \
        {(v, s) for v in ("linear-rope", "softmax-rope") for s in (0, 1)}
    plot_curves(rows, tmp_path / "redrawn.png")
    assert (tmp_path / "redrawn.png").stat().st_size > 0
    mtime = (tmp_path / "lc" / "runs" / "linear-rope_n16_s0" / "ckpt.pt").stat().st_mtime_ns
    run_long_context(preset, out=tmp_path / "lc", resume=True, progress=False)  # finished runs are skipped
    assert (tmp_path / "lc" / "runs" / "linear-rope_n16_s0" / "ckpt.pt").stat().st_mtime_ns == mtime
    # not silently reused with other settings
    with pytest.raises(ValueError, match=r"resume: expected the same training config as the checkpoint, but "
                                         r"'steps' differs \(2 saved, 3 now\)"):
        run_long_context(preset, steps=3, out=tmp_path / "lc", resume=True, progress=False)
    run_script("extrapolation.py", "--runs", str(tmp_path / "lc"), "--factors", "1,2", "--eval-tokens", "64",
               "--buckets", "2", "--out", str(tmp_path / "ex"), monkeypatch=monkeypatch)
    rows = (tmp_path / "ex" / "extrapolation.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2 and (tmp_path / "ex" / "extrapolation.png").exists()
    buckets = read_rows(tmp_path / "ex" / "buckets.csv")
    assert len(buckets) == 4 * 2 * 2 and all(float(r["attn_rms"]) > 0 for r in buckets)
    table = (tmp_path / "ex" / "summary.md").read_text().splitlines()  # variants x training lengths, seeds pooled
    assert table[0].endswith("bpb at 16 | bpb at 32 |") and len(table) == 2 + 2
    assert all(r.split(" | ")[2] == "2" for r in table[2:])
    run_script("positions.py", "--variants", "linear-rope", "--seeds", "0", "--steps", "2", "--length", "16",
               "--distance", "2", "--features", "8", "--rope-base", "32", "--out", str(tmp_path / "pos"),
               "--no-progress", monkeypatch=monkeypatch)
    model = json.loads((tmp_path / "pos" / "config.json").read_text())["model"]
    assert (model["nb_features"], model["rope_base"]) == (8, 32.0)
    assert "r = 8 random features (linear variants), RoPE base 32." in (tmp_path / "pos" / "summary.md").read_text()
    ckpt = torch.load(tmp_path / "pos" / "runs" / "linear-rope_n16_s0" / "ckpt.pt", weights_only=False)
    assert ckpt["model_config"]["nb_features"] == 8 and ckpt["model_config"]["rope_base"] == 32.0
    run_script("recall.py", "--variants", "linear-rope", "--lengths", "16,32", "--steps", "2", "--out",
               str(tmp_path / "rec"), "--no-progress", monkeypatch=monkeypatch)
    for d, png in (("pos", "positions.png"), ("rec", "recall.png")):
        assert (tmp_path / d / png).exists() and "accuracy" in (tmp_path / d / "summary.md").read_text()
    from lab.profiling import machine
    for d in ("lc", "pos", "rec"):  # every results table names where its runs trained
        assert f"Trained on: {machine()} (" in (tmp_path / d / "summary.md").read_text()
    by = read_rows(tmp_path / "rec" / "by_distance.csv")  # every scored query in one distance bucket
    assert (tmp_path / "rec" / "recall_distance.png").exists()
    assert {n: sum(int(r["count"]) for r in by if int(r["length"]) == n) for n in (16, 32)} == \
        {16: 256 * (16 - 2), 32: 256 * (32 - 4)}


@pytest.mark.parametrize("kw, match", [(dict(features=7), r"features: expected an even number of random "
                                                            r"features >= 2, got 7"),
                                       (dict(rope_base=1.0), r"rope_base: expected a number > 1, got 1.0")])
def test_synthetic_model_options_are_checked(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_positions(variants=("linear-rope",), length=16, distance=2, seeds=(0,), steps=1, out=tmp_path, **kw)


def test_presets_match_the_documented_configurations():
    paper = PRESETS["paper"]
    assert (paper.model["n_layer"], paper.model["dim"], paper.model["heads"]) == (12, 768, 12)
    assert paper.lengths == (1024,) and paper.train["lr"] == 1e-4 and paper.tokens_per_step // 1024 == 128
    quick = PRESETS["quick"].variants  # the story: the ceiling, eq. 19 and what fixes it, no positions
    assert {"softmax-rope", "linear-rope-inputs", "linear-rope", "linear-rope-decay", RECOMMENDED,
            "linear-nope"} <= set(quick) and "linear-rope-rotden" not in quick
    assert set(CORE_VARIANTS) <= set(VARIANTS)
    # every core variant quick leaves out runs at quick's scale in another preset
    assert set(CORE_VARIANTS) - set(quick) <= set(PRESETS["ablations"].variants)
    assert PRESETS["ablations"].train == PRESETS["quick"].train
    long = PRESETS["cpu-long"]
    assert len(long.seeds) >= 3 and "softmax-rope" in long.variants
    assert {v for v in CORE_VARIANTS if v.startswith("linear") and v != "linear-rope-rotden"} <= set(long.variants)


def summary_row(variant, bpb, flags="ok", seeds=1):
    return {"variant": variant, "length": 16, "bpb": bpb, "std": 0.0, "min": bpb, "max": bpb, "seeds": seeds,
            "steps": 2, "skipped": 0, "s_per_step": 0.1, "flags": flags}


def test_summary_table_lists_variants_best_first_with_differences_to_the_ceiling_and_eq19():
    summary = [summary_row("linear-rope", 3.4), summary_row("softmax-rope", 2.9),
               summary_row("linear-rope-rotden", 4.8, "unigram"), summary_row(RECOMMENDED, 3.1),
               summary_row("linear-nope", float("nan"), "nan")]
    lines = _markdown(summary, "bpb", ["# title"]).splitlines()
    assert lines[2] == ("| variant | what | N | bpb (mean ± std) | vs softmax-rope | vs linear-rope | seeds | "
                        "steps | s/step | flags |")
    rows = [ln.split(" | ") for ln in lines[4:9]]
    assert [r[0] for r in rows] == ["| softmax-rope", f"| {RECOMMENDED}", "| linear-rope", "| linear-rope-rotden",
                                    "| linear-nope"]
    assert [(r[4], r[5]) for r in rows] == [("—", "-0.500"), ("+0.200", "-0.300"), ("+0.500", "—"),
                                            ("+1.900", "+1.400"), ("—", "—")]
    assert rows[2][1] == "eq. 19" and lines[-1].startswith("vs X: the variant's mean bpb minus X's")
    accuracy = [{**summary_row("linear-rope", 0.5), "accuracy": 0.5}, {**summary_row("softmax-rope", 0.9),
                                                                        "accuracy": 0.9}]
    assert [ln.split(" | ")[0] for ln in _markdown(accuracy, "accuracy", [])[1:].splitlines()[2:4]] == \
        ["| softmax-rope", "| linear-rope"]  # higher accuracy first


def test_long_context_figure_fits_the_variants_that_train(tmp_path, monkeypatch):
    """A diverged variant is clipped to the axis and named so; the recommended one is drawn thick."""
    import matplotlib.figure

    rows = [{"variant": v, "length": 16, "seed": 0, "step": step, "split": "val", "bpb": value}
            for v, values in (("softmax-rope", (8.0, 3.0, 2.8)), (RECOMMENDED, (8.0, 3.4, 3.1)),
                              ("linear-rope-rotden", (8.0, 4.5, 5.0)))
            for step, value in zip((0, 10, 20), values)]
    summary = [summary_row("softmax-rope", 2.8), summary_row(RECOMMENDED, 3.1),
               summary_row("linear-rope-rotden", 5.0, "unigram")]
    saved = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.setdefault("fig", fig))
    plot_long_context(rows, summary, tmp_path / "f.png", reference=4.5, reference_label="unigram",
                      highlight=RECOMMENDED, title="t")
    ax = saved["fig"].axes[0]
    lo, hi = ax.get_ylim()
    assert 2.7 < lo < 2.8 and 3.4 < hi < 3.5  # the trained values after step 0 set the scale
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    failed = lines["linear-rope-rotden: diverged (5.00 bpb, clipped)"]
    assert max(failed.get_ydata()) == hi
    assert lines[f"{RECOMMENDED}: recommended"].get_linewidth() > 2 * lines["softmax-rope"].get_linewidth()
    assert "unigram 4.50 (off scale)" in lines


DDP_WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from lab.data import Corpus, LMTask
    from lab.models import ModelConfig
    from lab.train import TrainConfig, leave_distributed, read_metrics, train
    out = sys.argv[1]
    data = torch.frombuffer(bytearray(b"for i in range(10):\\n    print(i * i)\\n" * 80), dtype=torch.uint8)
    task = LMTask(Corpus("tiny", data[:2800], data[2800:]), 24, eval_windows=4)
    mc = ModelConfig(attention="linear-rope", n_layer=2, dim=16, heads=2, nb_features=8, redraw_interval=2)
    cfg = TrainConfig(steps=5, batch_size=8, grad_accum=2, lr=1e-2, warmup=1, log_interval=1, eval_interval=5)
    model, result = train(mc, cfg, task, out + "/a", progress=False)
    train(mc, cfg, task, out + "/b", stop_after=3, progress=False)  # interrupted, then resumed on 2 ranks
    resumed, _ = train(mc, cfg, task, out + "/b", resume=True, progress=False)
    first = task.train_batch(2, torch.Generator().manual_seed(cfg.seed * 65_537 + dist.get_rank() + 1))[0]

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()] + [p.flatten() for p in m.projections()])

    def gather(t):
        every = [torch.zeros_like(t) for _ in range(2)]
        dist.all_gather(every, t)
        return every

    params, batches = gather(flat(model)), gather(first)
    if dist.get_rank() == 0:
        curve = [(r["step"], r["split"], r["loss"]) for r in read_metrics(out + "/a")]
        json.dump({"same": torch.equal(*params), "different_data": not torch.equal(*batches),
                   "resumed_same": torch.equal(flat(resumed), params[0]),
                   "resumed_curve": curve == [(r["step"], r["split"], r["loss"]) for r in read_metrics(out + "/b")],
                   "redraws": [int(m.feature_map.redraws) for m in (b.attn for b in model.blocks)],
                   "world": json.load(open(out + "/a/config.json"))["world_size"], "step": result["step"]},
                  open(out + "/ddp.json", "w"))
    leave_distributed()
""")


def test_ddp_two_cpu_ranks_keep_parameters_and_feature_projections_identical_and_resume(tmp_path):
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "experiments"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(tmp_path / "worker.py"), str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.communicate()
        pytest.fail("the 2-rank run hung: the ranks went through different collectives")
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "run" / "ddp.json").read_text())
    # 5 optimizer steps (of 2 micro-batches each), a redraw every 2 steps: after steps 2 and 4, on both ranks
    assert report == {"same": True, "different_data": True, "resumed_same": True, "resumed_curve": True,
                      "redraws": [2, 2], "world": 2, "step": 5}


def test_position_losses_attention_rms():
    """The attention outputs' RMS by position equals the blocks' attention outputs computed by hand."""
    from lab.train import position_losses
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(attention="linear-rope-decay", **dict(TINY, n_layer=2))).eval()
    x = torch.randint(0, 256, (3, 24))
    loss, rms = position_losses(model, x, x, batch_size=2, attention_rms=True)
    assert loss.shape == (24,) and rms.shape == (len(model.blocks), 24)
    with torch.no_grad():
        h = model.embed(x)
        want = []
        for block in model.blocks:
            a = block.attn(block.norm1(h))
            want.append(a.double().square().mean(-1).mean(0).sqrt())
            h = block(h)
    torch.testing.assert_close(rms, torch.stack(want), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(position_losses(model, x, x), loss)  # the hooks are gone again


def test_paired_differences_match_by_seed_and_length():
    from lab.sweeps import paired_differences
    finals = [{"variant": v, "length": n, "seed": s, "bpb": b}
              for v, n, s, b in [("linear-rope", 8, 0, 3.0), ("linear-rope", 8, 1, 3.2), ("linear-rope", 8, 2, 2.9),
                                 ("linear-rope-decay", 8, 0, 2.5), ("linear-rope-decay", 8, 1, 3.3),
                                 ("linear-rope-decay", 8, 3, 1.0),  # no base run with seed 3: not paired
                                 ("linear-rope-inputs", 8, 0, 2.4), ("linear-nope", 16, 0, 3.5)]]
    rows = paired_differences(finals, "bpb")
    by = {(r["base"], r["variant"]): r for r in rows}
    r = by["linear-rope", "linear-rope-decay"]
    assert (r["seeds"], r["better"], r["min"], r["max"]) == (2, 1, -0.5, 0.1) and abs(r["mean"] + 0.2) < 1e-9
    assert ("linear-rope-inputs", "linear-rope-decay") not in by  # one common seed is no spread
    assert not any(r["variant"] == "linear-nope" for r in rows)  # other length, nothing to pair with
    acc = paired_differences([{**f, "accuracy": f["bpb"]} for f in finals], "accuracy")
    assert {(r["base"], r["variant"]): r["better"] for r in acc}["linear-rope", "linear-rope-decay"] == 1


def test_weight_decay_spares_norms_biases_and_learned_rotations():
    """Learned frequencies and phases are (heads, r/2) matrices, but angles: weight decay would pull them to 0."""
    from lab.train import decay_groups
    from linrope.rotary import LearnedRotary
    model = ByteLM(ModelConfig(attention="linear-rope-learned-decay", **TINY))
    decay, rest = decay_groups(model)
    angles = {id(p) for m in model.modules() if isinstance(m, LearnedRotary) for p in m.parameters()}
    assert angles and angles <= {id(p) for p in rest} and not angles & {id(p) for p in decay}
    assert len(decay) + len(rest) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in decay) and any(p.dim() >= 2 for p in rest)


def test_position_lr_gives_rotations_and_gates_their_own_rate(tmp_path):
    mc = ModelConfig(attention="linear-rope-learned-gated", **TINY)
    model = ByteLM(mc)
    found = {id(p) for p in train_module.position_parameters(model)}
    named = {n for n, p in model.named_parameters() if id(p) in found}
    assert named and all(("rotary" in n) or ("gate_proj" in n) for n in named)
    assert any("gate_proj" in n for n in named) and any("theta" in n for n in named)
    _, result = train(mc, fast(position_lr=1e-1), LMTask(text_corpus(), 16, 2), tmp_path, progress=False)
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert sorted(len(g["params"]) for g in groups)[0] == len(found)
    with pytest.raises(ValueError, match="position_lr"):
        TrainConfig(position_lr=0)


def test_gate_lr_takes_the_gates_apart_from_the_rotations():
    model = ByteLM(ModelConfig(attention="linear-rope-selective-gated", **TINY))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = train_module.parameter_groups(model, TrainConfig(lr=1e-3, position_lr=3e-2, gate_lr=2e-3))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))  # every parameter once
    gates, rotations = groups[2], groups[3]
    assert gates["lr_scale"] == pytest.approx(2.0) and rotations["lr_scale"] == pytest.approx(30.0)
    assert {names[id(p)].split(".")[-2] for p in gates["params"]} == {"gate_proj", "clock_proj"}
    assert all("rotary" in names[id(p)] for p in rotations["params"])
    only_gates = train_module.parameter_groups(model, TrainConfig(lr=1e-3, gate_lr=2e-3))
    assert len(only_gates) == 3 and len(only_gates[2]["params"]) == len(gates["params"])
    with pytest.raises(ValueError, match="gate_lr"):
        TrainConfig(gate_lr=-1.0)
