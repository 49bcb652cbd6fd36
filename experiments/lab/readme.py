"""The README's results block, written from the committed quick run so that it never drifts from it.

The block sits between ``BEGIN`` and ``END`` in README.md: the figure of ``experiments/results/long_context/quick``
and the table of its ``summary.md`` (where the runs trained, the variants best first with their differences to
softmax-rope and eq. 19). ``python experiments/readme.py`` rewrites it; ``--check`` only says whether it is current.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BEGIN", "END", "QUICK_RESULTS", "results_block", "with_block", "update_readme"]

BEGIN, END = "<!-- quick-results -->", "<!-- /quick-results -->"
QUICK_RESULTS = Path("experiments") / "results" / "long_context" / "quick"  # relative to the repository root


def results_block(root: str | Path, results: str | Path = QUICK_RESULTS) -> str:
    """The lines between the markers: the run's figure, its 'Trained on' line and its table (with the line under
    it that says how the differences read), all from ``root / results``."""
    summary = (Path(root) / results / "summary.md").read_text().splitlines()
    trained = [ln for ln in summary if ln.startswith("Trained on:")]
    start = next((i for i, ln in enumerate(summary) if ln.startswith("| variant |")), None)
    if start is None:
        raise ValueError(f"results: no table in {Path(results) / 'summary.md'}")
    end = start
    while end < len(summary) and summary[end].startswith("|"):
        end += 1
    table = summary[start:end]
    note = [ln for ln in summary[end:] if ln.startswith("vs X:")]
    figure = (Path(results) / "long_context.png").as_posix()
    return "\n".join([f"![validation bits per byte of the quick preset]({figure})", "", *trained, "", *table,
                      *([""] + note if note else [])])


def with_block(text: str, block: str) -> str:
    """``text`` (a README) with whatever stood between the markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"readme: expected one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"


def update_readme(root: str | Path, check: bool = False) -> bool:
    """Rewrite README.md's block under ``root`` from the committed quick run (``check``: write nothing); returns
    whether the README was already current."""
    path = Path(root) / "README.md"
    text = path.read_text()
    new = with_block(text, results_block(root))
    if new != text and not check:
        path.write_text(new)
    return new == text
