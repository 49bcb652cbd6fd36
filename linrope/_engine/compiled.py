"""The compiled CPU decoding step (``kernel="cpp"``), built from ``step_cpu.cpp`` on first use (private).

``torch.utils.cpp_extension.load`` compiles the source with the machine's C++ compiler and ninja into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that carries a hash
of the source, the torch version and the CPU's vector extensions: a copy built on another CPU kind or torch is
never loaded, and later processes load the cached build in a fraction of a second. The first build takes a minute
or so. It is asked for explicitly and fails loudly: a machine without a compiler gets an error saying what is
missing, never the eager step in its place.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("step_cpu.cpp")
_LOCK = threading.Lock()
_MODULE = None


def _cpu_tag() -> str:
    """The CPU's flags line (``-march=native`` compiles for its vector extensions); ``_build`` hashes it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return flags or platform.processor() or platform.machine()


def module():
    """The built extension (built and loaded once per process). Raises RuntimeError naming what is missing."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is None:
            _MODULE = _build()
    return _MODULE


def _build():
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + torch.__version__.encode() + _cpu_tag().encode()).hexdigest()[:12]
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f'kernel="cpp": no C++ compiler found ({compiler!r} is not on PATH; set CXX or install '
                           'g++); kernel="torch" runs everywhere')
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise RuntimeError('kernel="cpp": building the compiled step needs ninja (pip install ninja); '
                           'kernel="torch" runs everywhere') from None
    flags = ["-O3", "-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]
    try:
        return cpp_extension.load(f"linrope_step_{digest}", [str(SOURCE)], extra_cflags=flags, verbose=False)
    except Exception as error:  # the compiler's own message is in the chained error
        raise RuntimeError(f'kernel="cpp": building {SOURCE.name} failed ({type(error).__name__}: '
                           f'{str(error)[-400:]}); kernel="torch" runs everywhere') from error
