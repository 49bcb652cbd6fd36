"""The same benchmark points timed with this checkout's library and with an earlier commit's, interleaved.

``python experiments/bench.py --compare REV`` (e.g. ``--compare HEAD~3``): the earlier library is extracted with
``git archive REV linrope`` into a temporary folder; both versions then run the cases of
``lab.bench.cases`` (which use only the public API) in fresh processes, round-robin over points and
versions, so a drifting machine hits both alike. The earlier version is imported ahead of this checkout's
editable install by a ``sitecustomize`` that drops the editable finder, with the working directory outside the
repository. Reported: each point's median seconds and peak MiB for both, and their ratio (now / then).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from .. import profiling
from . import cases

__all__ = ["COMPARE_POINTS", "compare"]

COMPARE_POINTS = (
    ("causal eq. 19, N=16384", "linrope", dict(n=16384)),
    ("causal, no RoPE, N=16384", "linrope", dict(n=16384, rope=None)),
    ("bidirectional eq. 19, N=16384", "linrope", dict(n=16384, causal=False)),
    ("layer LinearRotaryAttention, N=16384", "layer", dict(n=16384)),
    ("causal eq. 19, N=4096", "linrope", dict(n=4096)),
    ("causal eq. 19, learned rotations + multiscale decay, N=16384", "linrope",
     dict(n=16384, rope="learned", decay="multiscale")),
    ("causal eq. 19, N=512 (the byte LM's B=8, H=4, d=32, r=64)", "linrope", dict(n=512, b=8, h=4, d=32, r=64)),
)

_DROP_EDITABLE = '''import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                    and "editable" not in type(f).__module__.lower()]
'''


def _prepare(rev: str, root: Path, work: Path) -> dict:
    """Folders for both versions; returns the PYTHONPATH of each."""
    then, shim_then, shim_now = work / "then", work / "shim_then", work / "shim_now"
    for d in (then, shim_then, shim_now):
        d.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "linrope"], capture_output=True)
    if archive.returncode:
        raise ValueError(f"compare: expected a git revision of this repository, got {rev!r} "
                         f"({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(then)], input=archive.stdout, check=True)
    for shim in (shim_then, shim_now):
        (shim / "ab_cases.py").write_text(Path(cases.__file__).read_text())  # imports only linrope
        (shim / "ab_profiling.py").write_text(Path(profiling.__file__).read_text())
    (shim_then / "sitecustomize.py").write_text(_DROP_EDITABLE)
    return {"then": f"{shim_then}{os.pathsep}{then}", "now": str(shim_now)}


def compare(rev: str, points=COMPARE_POINTS, *, rounds: int = 3, repeats: int = 3, on_record=None) -> list[dict]:
    """Rows (point, then/now seconds and MiB, now / then) for ``points`` of (name, case, params)."""
    root = Path(__file__).resolve().parents[3]
    work = Path(tempfile.mkdtemp(prefix="linrope-compare-"))
    here = os.getcwd()
    try:
        paths = _prepare(rev, root, work)
        os.chdir(work)  # the repository's own linrope/ must not shadow the earlier version
        runs = {}
        for k in range(rounds):
            for name, case, params in points:
                for version in ("then", "now"):
                    env = dict(os.environ, PYTHONPATH=paths[version])
                    rec = profiling.run_point(f"ab_cases:case_{case}", params, repeats=repeats, memory=k == 0,
                                              env=env, runner="ab_profiling", timeout=900)
                    runs.setdefault((name, version), []).append(rec)
                    if on_record:
                        on_record(name, version, rec)
    finally:
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, _, params in points:
        row = dict(point=name, params=params)
        for version in ("then", "now"):
            recs = runs[(name, version)]
            ok = [r.seconds for r in recs if r.status == "ok" and r.seconds is not None]
            row[f"{version}_s"] = statistics.median(ok) if ok else None
            row[f"{version}_mib"] = recs[0].peak_mib
            row[f"{version}_status"] = recs[0].status
        if row["then_s"] and row["now_s"]:
            row["now_over_then"] = row["now_s"] / row["then_s"]
        rows.append(row)
    return rows
