"""The experiment harness around the library, a client of its public API; it is not in the wheel. The scripts in
experiments/ import it as ``lab`` (their folder is on ``sys.path``), e.g. ``from lab.models import ByteLM``.

* ``models``: a small byte-level language model with every attention variant (``VARIANTS``);
* ``data``: byte corpora and synthetic tasks that need no download;
* ``train``: training, evaluation and checkpoints of one run;
* ``sweeps``: grids of runs (variant x length x seed) with their tables and figures, behind ``experiments/*.py``;
* ``plots``: reading and writing result rows, and the figures drawn from them;
* ``accuracy``: eq. 19 against an exact float64 reference as q and k grow;
* ``profiling``: time and peak memory of a callable in fresh processes;
* ``bench``: benchmark cases, the FLOP model, the performance targets and the memory profile.
"""
