"""Benchmarks of linrope (``experiments/bench.py``, ``experiments/memory.py``), by concern:

* ``cases.py``: the measured configurations (``case_*`` factories, named in ``CASES``) and the FLOP model;
* ``targets.py``: the performance targets, as ratios of points measured in one run;
* ``memory.py``: the memory and speed profile against sequence length;
* ``compare.py``, ``fusion.py``, ``breakdown.py``: this checkout against an earlier commit, torch.compile of the
  elementwise passes, and where the engine's time goes (products, other ops, the rest);
* ``cli.py``: the targets' command line behind ``python experiments/bench.py``.

Timing and memory measurement itself is ``lab.profiling``.
"""

from .cases import CASES, causal_flops, peers_available
from .memory import PROFILE_SERIES, memory_profile, merge_profile, plot_profile, read_profile, write_profile
from .targets import Target, combine_rounds, evaluate, targets

__all__ = ["CASES", "causal_flops", "peers_available", "Target", "targets", "evaluate", "combine_rounds",
           "PROFILE_SERIES", "memory_profile", "plot_profile", "write_profile", "read_profile", "merge_profile"]
