"""The linearization experiment (``lab.linearize``) on a tiny preset: every file it writes, the rows it reports,
the attention errors it measures, and its script's help."""

import csv
import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from lab.linearize import PRESETS, attention_errors, run, teacher_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = replace(PRESETS["quick"], dim=32, layers=1, heads=2, kv_heads=1, length=32, batch=4, teacher_steps=4,
               transfer_steps=2, finetune_steps=2, nb_features=8, seeds=(0, 1), eval_windows=4,
               decode_contexts=(16, 64), decode_tokens=2)


def test_tiny_run_writes_every_file_and_pairs_seeds(tmp_path):
    rows = run(TINY, tmp_path, placements=["eq19-decay", "rope-inputs"], maps=["hedgehog"], progress=False)
    for name in ("results.csv", "decode.csv", "summary.md", "linearize.png", "config.json", "attention_error.csv",
                 "attention_error.md", "runs/teacher.pt"):
        assert (tmp_path / name).exists(), name
    stages = [(r["placement"], r["seed"], r["stage"]) for r in rows if r["model"] != "teacher"]
    assert stages.count(("rope-inputs", 1, "scratch")) == 1 and len(stages) == 2 * 2 * 4
    assert all(r["bpb_1x"] > 0 for r in rows)
    with open(tmp_path / "decode.csv") as f:
        decode = list(csv.DictReader(f))
    linear = [int(r["cache_bytes"]) for r in decode if "eq. 19" in r["model"]]
    softmax = [int(r["cache_bytes"]) for r in decode if "softmax" in r["model"]]
    assert linear[0] == linear[1] and softmax[1] * 18 == softmax[0] * 66  # a state; a cache of prompt + 2 tokens
    text = (tmp_path / "summary.md").read_text()
    assert "| rope-inputs | hedgehog |" in text and "Best after fine-tuning" in text


def test_attention_errors_shrink_as_favor_features_approach_the_teachers_kernel():
    from linrope.hf import linearize
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    t = LlamaForCausalLM(teacher_config(TINY)).eval()
    ids = torch.randint(0, 256, (2, 16))
    errs = {r: attention_errors(t, linearize(t, rope="inputs", nb_features=r, seed=1), ids)[0] for r in (8, 4096)}
    assert 0 < errs[4096] < errs[8] / 3, errs  # RoPE before phi: FAVOR+ estimates the teacher's own softmax


def test_script_help(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["linearize.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "experiments" / "linearize.py"), run_name="__main__")
    assert "--mechanism" in capsys.readouterr().out
