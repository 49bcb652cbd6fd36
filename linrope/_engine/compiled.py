"""The compiled CPU paths (``kernel="cpp"``), built from ``step_cpu.cpp`` and ``causal_cpu.cpp`` on first use
(private): the one-position decoding step, and the causal pass with FAVOR+ features (forward and backward).

``torch.utils.cpp_extension.load`` compiles the source with the machine's C++ compiler and ninja into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that carries a hash
of the sources, the torch version and the CPU's vector extensions: a copy built on another CPU kind or torch is
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

SOURCES = tuple(Path(__file__).with_name(name) for name in ("step_cpu.cpp", "causal_cpu.cpp"))
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

    # -fopenmp: at::parallel_for is an OpenMP loop compiled here (without the flag it runs on one thread)
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
    source = b"".join(path.read_bytes() for path in SOURCES)
    digest = hashlib.sha256(source + " ".join(flags).encode() + torch.__version__.encode() +
                            _cpu_tag().encode()).hexdigest()[:12]
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f'kernel="cpp": no C++ compiler found ({compiler!r} is not on PATH; set CXX or install '
                           'g++); kernel="torch" runs everywhere')
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise RuntimeError('kernel="cpp": building the compiled step needs ninja (pip install ninja); '
                           'kernel="torch" runs everywhere') from None
    try:
        return cpp_extension.load(f"linrope_cpu_{digest}", [str(p) for p in SOURCES], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # the compiler's own message is in the chained error
        names = " and ".join(p.name for p in SOURCES)
        raise RuntimeError(f'kernel="cpp": building {names} failed ({type(error).__name__}: {str(error)[-400:]}); '
                           'kernel="torch" runs everywhere') from error


# ---------------------------------------------------------------------------------------------- the causal pass
def covers(call, x) -> bool:
    """Whether ``kernel="cpp"`` runs this engine call (``chunked.Call``, ``chunked.Inputs``) compiled: causal,
    FAVOR+ features, float32 compute on the CPU, RoPE from cos/sin tables or none, one process. The other calls
    (given features, learned or selective angles, float64, sequence parallelism, the bidirectional path) run the
    torch engine: a rule of the arguments, written in ``linear_attention``'s docstring."""
    return (call.cfg.kernel == "cpp" and call.cfg.causal and call.features == "favor"
            and call.cfg.dtype == torch.float32 and call.parallel is None and x.theta is None
            and x.key_cos is None and x.v.device.type == "cpu")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) as float32 with contiguous rows, any other strides (the compiled pass reads views of the
    layer's projection and broadcast kv heads as they are): the tensor itself when it already is one."""
    t = t.to(torch.float32)
    rows = t.stride(-1) == 1 and t.stride(-2) >= t.shape[-1]  # BLAS reads rows at a stride of at least their size
    return t if rows else t.contiguous()


def _mask(m):
    """The (BH, N) key padding mask as contiguous bools (a broadcast one is a view with stride 0), or None."""
    return None if m is None else m.contiguous()


def _table(t):
    """A cos or sin table (N, r/2) or (B, N, r/2) as contiguous float32 (Bc, N, r/2), or None."""
    return None if t is None else t.reshape(-1, *t.shape[-2:]).to(torch.float32).contiguous()


def _inputs(src, x) -> tuple:
    """The arguments both passes start with: q, k, v, the scaled projection, the keys' half-norms less their
    log-biases, the padding mask and the cos/sin tables."""
    return (_rows(x.q), _rows(x.k), _rows(x.v), src.Ws.contiguous(), src.half_sq.contiguous(), _mask(src.mask),
            _table(x.cos), _table(x.sin))


def _save_every(cfg) -> int:
    """Positions between the states the forward keeps for the backward: two of the engine's groups, as many
    states as the torch engine keeps (every other group)."""
    return 2 * cfg.group_size


def causal_forward(src, x, cfg, S0, z0, M0):
    """Causal eq. 19 over the whole call through ``causal_cpu.cpp``. ``src``: the call's ``FavorFeatures``
    (its scaled projection, key half-norms less the log-biases, padding mask); S0 (BH, r, dv), z0 (BH, r), M0 (BH,)
    the engine's state. Returns out (BH, N, dv) in v's dtype, den (BH, N), the final S, z, M and the states
    ``causal_backward`` replays from (None when nothing is differentiated)."""
    out, den, S, z, M, Ss, zs, Ms, bad = module().causal_forward(
        *_inputs(src, x), S0.to(torch.float32).contiguous(), z0.to(torch.float32).contiguous(), M0.contiguous(),
        cfg.chunk_size, _save_every(cfg), cfg.needs_grad)
    return out.to(x.v.dtype), den, S, z, M, (Ss, zs, Ms, bad) if cfg.needs_grad else None


def causal_backward(src, x, cfg, out, den, states, dout, dS, dz):
    """Gradients of ``causal_forward`` (its out, den and states) given those of out, S and z: dq, dk (BH, N, d),
    dv (BH, N, dv) in float32, the keys' log-bias gradient (BH, N) and those of the starting state S0, z0."""
    BH = src.BH
    Ss, zs, Ms, bad = states
    return module().causal_backward(*_inputs(src, x), out.reshape(BH, -1, out.shape[-1]).to(torch.float32).contiguous(),
                                    den, _rows(dout.reshape(x.v.shape)), dS.contiguous(), dz.contiguous(), Ss, zs,
                                    Ms, bad, cfg.chunk_size, _save_every(cfg), src.scale2)
