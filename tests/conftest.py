import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# group_size="auto" caches its measurements: never in the user's ~/.cache from a test run
os.environ["LINROPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="linrope-test-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
