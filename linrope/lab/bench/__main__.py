"""``python -m linrope.lab.bench``: the performance targets (see ``cli.py``)."""

from .cli import main

main(prog="python -m linrope.lab.bench")
