"""The chunked engine behind ``linear_attention`` and ``favor_attention`` (private: use ``linrope.functional``).

* ``feature_sources.py``: where a group's features come from (FAVOR+ computed on the fly, or given), the
  rotation R_n on interleaved pairs, reusable workspace buffers, and ``NEG`` (the log-scale of "no key").
* ``chunked.py``: one group (chunks, normalizer sub-chunks), the causal and bidirectional drivers over groups,
  and the autograd Functions that ``linrope.functional`` calls.
* ``parallel.py``: sequence parallelism (``group=``): layout checks, the all-gather of key states, their
  combination weights, the all-reduce of their gradients (the engine calls them inside its Function).
* ``tuning.py``: group sizes: defaults per CPU / GPU and the measured ``"auto"`` choice, cached per machine.
* ``triton_kernels.py``: the experimental ``kernel="triton"``: a group's chunk products fused on CUDA, beside
  their float64 reference.
"""

from .chunked import JUMP_LIMIT, Call, EngineConfig, Inputs, empty_state, run

__all__ = ["Call", "EngineConfig", "Inputs", "run", "empty_state", "JUMP_LIMIT"]
