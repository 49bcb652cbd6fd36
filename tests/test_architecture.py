"""ARCHITECTURE.md against the tree: every module, folder and test it names exists, every library module is named
in it, and the library's imports follow the rule it states (a module imports only modules listed before it, plus
``_checks`` and ``_engine``; ``_checks`` imports nothing of linrope; ``_engine`` nothing outside itself)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "linrope"
DOC = (ROOT / "ARCHITECTURE.md").read_text()
# where a name in the document may live: the library, its engine, the lab, the scripts, the tests, the root
PLACES = [LIB, LIB / "_engine", ROOT / "experiments" / "lab", ROOT / "experiments", ROOT / "tests", ROOT]
NAMED = set(re.findall(r"`([^`\s]+)`", DOC))


def module_names() -> list[str]:
    """The library's modules, as ARCHITECTURE.md names them: paths under linrope/."""
    return sorted(p.relative_to(LIB).as_posix() for p in LIB.rglob("*.py"))


def listed_order() -> list[str]:
    """The library table's modules in the document's reading order."""
    return re.findall(r"^\| `([^`]+\.py)` \|", DOC, flags=re.M)


def linrope_imports(path: Path) -> set[tuple[int, str]]:
    """(level, dotted name) of every import of linrope in ``path``: relative ones, and absolute ``linrope...``
    (level 0)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = node.module or ""
                found |= {(node.level, f"{base}.{a.name}".strip(".") if not base else base) for a in node.names}
            elif (node.module or "").split(".")[0] == "linrope":
                found.add((0, node.module))
        elif isinstance(node, ast.Import):
            found |= {(0, a.name) for a in node.names if a.name.split(".")[0] == "linrope"}
    return found


def test_every_path_and_test_the_document_names_exists():
    paths = [n for n in NAMED if (n.endswith(".py") or n.endswith("/")) and "*" not in n]
    assert len(paths) > 20
    missing = [n for n in paths if not any((place / n).exists() for place in PLACES)]
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"
    tests = [n for n in NAMED if re.fullmatch(r"test_\w+", n)]
    assert len(tests) > 15
    assert not [t for t in tests if not (ROOT / "tests" / f"{t}.py").exists()]


def test_every_library_module_is_named():
    unnamed = [m for m in module_names() if m not in NAMED]
    assert not unnamed, f"library modules missing from ARCHITECTURE.md: {unnamed}"
    listed = listed_order()
    assert sorted(listed) == sorted(m for m in module_names() if not m.endswith("__init__.py"))


def test_library_imports_follow_the_stated_rule():
    order = [m for m in listed_order() if "/" not in m and m != "_checks.py"]
    for i, module in enumerate(order):
        before = {m.removesuffix(".py") for m in order[:i]} | {"_checks", "_engine"}
        for level, name in linrope_imports(LIB / module):
            assert level == 1 and name.split(".")[0] in before, \
                f"linrope/{module} imports {'.' * level}{name}, not listed before it in ARCHITECTURE.md"
    assert not linrope_imports(LIB / "_checks.py"), "_checks.py imports linrope"
    for path in (LIB / "_engine").glob("*.py"):
        outside = {(level, name) for level, name in linrope_imports(path) if level != 1}
        assert not outside, f"linrope/_engine/{path.name} imports outside _engine: {outside}"


def test_the_import_checker_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from . import parallel\nfrom .rotary import x\nfrom .. import functional\n"
                   "import linrope.features\ndef f():\n    from ._checks import check_int\n")
    assert linrope_imports(src) == {(1, "parallel"), (1, "rotary"), (2, "functional"), (0, "linrope.features"),
                                    (1, "_checks")}
