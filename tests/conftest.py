import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# the experiment harness is not in the wheel: it is the package ``lab`` in experiments/, beside the scripts
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
# group_size="auto" caches its measurements: never in the user's ~/.cache from a test run
os.environ["LINROPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="linrope-test-cache-")
# Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/test_triton_kernels.py). It must be on
# before anything imports triton: torch.compile (inductor) does, and triton's own @jit helpers (tl.sum, ...) are
# then built for the compiler and refuse to run inside interpreted kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["torch", "cpp"])
def engine_kernel(request, monkeypatch):
    """A test twice: with the torch engine, then with the compiled causal pass (``kernel="cpp"``,
    linrope/_engine/causal_cpu.cpp) in its place for every engine call it covers, which must meet the same
    references (float64 definitions, the engine's own properties). Use with ``pytestmark``."""
    if request.param == "cpp":
        from dataclasses import replace

        from linrope._engine import compiled

        covers = compiled.covers
        monkeypatch.setattr(compiled, "covers",
                            lambda call, x: covers(replace(call, cfg=replace(call.cfg, kernel="cpp")), x))
    return request.param
