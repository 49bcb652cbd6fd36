"""Two houses: the library (``linrope/``, the wheel; tests/test_layout.py builds it and checks what it holds) and
its client, experiments/ (the scripts and the lab, ``experiments/lab/``), which may use the library's public
names only: no ``linrope._*`` module and no ``_``-prefixed name taken from linrope, however it is reached."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = sorted(p for p in (ROOT / "experiments").rglob("*.py")
                if not {"results", "__pycache__"} & set(p.relative_to(ROOT).parts))


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def private_uses(source: str) -> list[str]:
    """The private uses of linrope in ``source``: imports of a ``linrope._*`` module (at any depth), ``_``-names
    imported from linrope, and ``_``-attributes read from anything imported from linrope (``reference._f``)."""
    found, bound = [], set()  # bound: local names that stand for linrope or something taken from it
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "linrope":
                    bound.add(alias.asname or "linrope")
                    if _private(alias.name):
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "linrope":
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _private(f"{node.module}.{alias.name}"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in bound):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("source, private", [
    ("from linrope._checks import check_int", True),
    ("from linrope._engine.parallel import rank_offset", True),
    ("from linrope import _engine", True),
    ("import linrope._engine.chunked as c", True),
    ("from linrope.reference import _relative_scores", True),
    ("def f():\n    from linrope.reference import _relative_scores", True),
    ("import linrope\nlinrope._checks.check_int('n', 1)", True),
    ("from linrope import reference as R\nR._relative_scores", True),
    ("from linrope import favor_attention, LinearRotaryAttention", False),
    ("from linrope.reference import linear_attention_naive\nimport linrope\nlinrope.__version__", False),
    ("from .checks import _helper\nfrom . import _x", False),  # the lab's own private names are its business
    ("import torch\ntorch._C", False),
])
def test_the_checker_finds_private_uses(source, private):
    assert bool(private_uses(source)) == private, private_uses(source)


def test_experiments_and_the_lab_use_only_public_names_of_linrope():
    assert len(CLIENT) > 20 and ROOT / "experiments" / "lab" / "models.py" in CLIENT
    bad = {p.relative_to(ROOT).as_posix(): uses for p in CLIENT if (uses := private_uses(p.read_text()))}
    assert bad == {}


def test_the_library_does_not_import_the_lab():
    for path in (ROOT / "linrope").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("lab", "experiments") for n in names), (path, node.lineno)


# ---------------------------------------------------------------- one home per idea inside the lab
def _defined_functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_one_variant_registry_for_the_models_and_the_toys():
    from lab import mechanism, models
    assert mechanism.ATTENTIONS is models.TOY_VARIANTS
    for view in (models.VARIANTS, models.TOY_VARIANTS):
        assert all(models.ALL_VARIANTS[name] is v for name, v in view.items())
    assert set(models.VARIANTS) | set(models.TOY_VARIANTS) == set(models.ALL_VARIANTS)
    toy_only = sorted(set(models.TOY_VARIANTS) - set(models.VARIANTS))
    assert toy_only and all(not models.ALL_VARIANTS[name].in_models for name in toy_only)
    with pytest.raises(ValueError, match="attention: expected one of"):
        models.ModelConfig(attention=toy_only[0])
    with pytest.raises(ValueError, match="attention: expected one of"):
        mechanism.ToyAttention("softmax-abs", 8, 8, seed=0)  # absolute positions: the models' alone


def test_the_lab_draws_through_one_pyplot_and_keeps_no_eq19_reference_of_its_own():
    lab = ROOT / "experiments" / "lab"
    users = {p.relative_to(lab).as_posix() for p in lab.rglob("*.py") if "matplotlib" in p.read_text()}
    assert users == {"plots.py"}
    test_reference = _defined_functions(ROOT / "tests" / "reference.py")
    assert not _defined_functions(lab / "accuracy.py") & test_reference
    assert "favor_attention_naive" in (lab / "accuracy.py").read_text()  # the library's reference instead
