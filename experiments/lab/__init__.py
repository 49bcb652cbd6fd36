"""The experiment harness around the library, a client of its public API; it is not in the wheel. The scripts in
experiments/ import it as ``lab`` (their folder is on ``sys.path``), e.g. ``from lab.models import ByteLM``.

* ``models``: a small byte-level language model, and the one registry of attention variants (``ALL_VARIANTS``);
* ``data``: byte corpora and synthetic tasks that need no download;
* ``train``: training, evaluation and checkpoints of one run;
* ``sweeps``: grids of runs (variant x length x seed) with their tables and figures, behind ``experiments/*.py``;
* ``plots``: reading and writing result rows, and the figures drawn from them (``pyplot()``);
* ``readme``: the README's results block, written from the committed quick run;
* ``checks``: the lab's argument checks;
* ``accuracy``: eq. 19 against the library's float64 reference as q and k grow;
* ``mechanism``, ``longterm``: eq. 19's kernel, one-head toys, and attention weights against distance;
* ``decode``, ``demo``: decoding cost against context length; the layers on one long sequence;
* ``profiling``, ``parallel_profile``: time and peak memory in fresh processes (also across gloo ranks);
* ``bench``: benchmark cases, the FLOP model, the performance targets and the memory profile.
"""
