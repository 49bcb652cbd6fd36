"""The README's results block is the committed quick run: its summary table and figure, as
``python experiments/readme.py`` writes them (``lab.readme``)."""

from pathlib import Path

import pytest

from lab.readme import BEGIN, END, QUICK_RESULTS, results_block, update_readme, with_block

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_block_is_the_committed_quick_run():
    readme = (ROOT / "README.md").read_text()
    assert with_block(readme, results_block(ROOT)) == readme
    block = readme.split(BEGIN)[1].split(END)[0]
    summary = (ROOT / QUICK_RESULTS / "summary.md").read_text()
    table = [ln for ln in summary.splitlines() if ln.startswith("|")]
    assert table and all(ln in block.splitlines() for ln in table)
    assert f"]({QUICK_RESULTS.as_posix()}/long_context.png)" in block
    assert (ROOT / QUICK_RESULTS / "long_context.png").exists()
    with pytest.raises(ValueError, match="readme: expected one"):
        with_block("no markers", "x")


def test_block_is_replaced_between_the_markers_only(tmp_path):
    results = tmp_path / QUICK_RESULTS
    results.mkdir(parents=True)
    (results / "summary.md").write_text("# t\n\nTrained on: here (1 runs).\n\n| variant | bpb |\n|---|---|\n"
                                        "| a | 1.0 |\n\nvs X: the variant's mean.\n")
    (tmp_path / "README.md").write_text(f"top\n{BEGIN}\nold\n{END}\nbottom\n")
    assert not update_readme(tmp_path, check=True) and "old" in (tmp_path / "README.md").read_text()
    assert not update_readme(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(f"top\n{BEGIN}\n![") and text.endswith(f"\n{END}\nbottom\n")
    assert "Trained on: here (1 runs).\n\n| variant | bpb |\n|---|---|\n| a | 1.0 |\n\nvs X:" in text
    assert update_readme(tmp_path)  # now current


def test_readme_hugging_face_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Hugging Face models")[1].split("```python\n")[1].split("```")[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 12
    monkeypatch.chdir(tmp_path)
    fast = code.replace("steps=100, finetune_steps=100", "steps=3, finetune_steps=2")  # the same calls, shorter
    assert fast != code
    env = {}
    exec(compile(fast, "README.md", "exec"), env)
    assert type(env["model"]).__name__ == "LinropeLlamaForCausalLM" and 16 < env["out"].shape[1] <= 80
    assert (tmp_path / "llama-eq19" / "config.json").exists()
