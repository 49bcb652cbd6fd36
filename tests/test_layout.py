"""The package's layout: ``import linrope`` loads the library alone, the wheel holds every library module and
nothing else (the lab, experiments/lab/, stays out), and the experiment scripts run from an installed wheel, not
only from a checkout."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))


def python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, **env})


def test_import_linrope_loads_the_library_alone(tmp_path):
    res = python("""
        import sys
        import linrope
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("lab", "matplotlib") or ".lab" in m))
    """, tmp_path, PYTHONPATH=str(ROOT / "experiments"))  # the lab importable, yet not imported
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (so the build leaves nothing in the checkout), experiments/
    included (without results), so that a package search that picked up the lab would show."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name, skip in (("linrope", ()), ("experiments", ("results",))):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", *skip))
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (path,) = out.glob("linrope-*.whl")
    return path


def test_wheel_holds_every_library_module_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    packed = {n for n in names if n.endswith(".py")}
    here = {p.relative_to(ROOT).as_posix() for p in (ROOT / "linrope").rglob("*.py")
            if "__pycache__" not in p.parts}
    assert {"linrope/__init__.py", "linrope/_engine/chunked.py"} <= here
    assert packed == here, (sorted(here - packed), sorted(packed - here))
    assert "linrope/_engine/step_cpu.cpp" in names  # kernel="cpp" compiles it where the wheel is installed
    assert [n for n in names if n.split("/")[0] != "linrope" and ".dist-info/" not in n] == []
    assert not any("lab" in n.split("/")[:-1] for n in names)


def test_experiment_scripts_run_from_the_installed_wheel(wheel, tmp_path):
    """Every script's --help, with linrope imported from the installed wheel (checked), not from the checkout, and
    the lab from experiments/ (a script's folder is first on sys.path when run as ``python experiments/x.py``)."""
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
                          "--target", str(site)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    res = python(f"""
        import runpy, sys
        sys.path.insert(0, {str(ROOT / "experiments")!r})
        import lab, linrope
        assert linrope.__file__.startswith({str(site)!r}), linrope.__file__
        assert lab.__file__.startswith({str(ROOT / "experiments")!r}), lab.__file__
        for name in {SCRIPTS!r}:
            sys.argv = [name, "--help"]
            try:
                runpy.run_path({str(ROOT / "experiments")!r} + "/" + name, run_name="__main__")
            except SystemExit as e:
                assert e.code == 0, (name, e.code)
            print("== done", name)
    """, tmp_path, PYTHONPATH=str(site))
    assert res.returncode == 0, res.stderr
    assert [ln.split()[-1] for ln in res.stdout.splitlines() if ln.startswith("== done")] == SCRIPTS


@pytest.mark.parametrize("name", ["long_context.py", "positions.py", "recall.py"])
def test_script_help_lists_each_variant_on_a_line_of_its_own(name, capsys, monkeypatch):
    from lab.models import VARIANTS

    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit):
        import runpy
        runpy.run_path(str(ROOT / "experiments" / name), run_name="__main__")
    starts = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    for variant in VARIANTS:
        assert variant in starts, variant
