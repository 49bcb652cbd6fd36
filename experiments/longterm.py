"""Long-term decay (RoFormer sec. 3.4.3, Fig. 2) in feature space (issue 13 section 4): does eq. 19 keep it?
Definitions are in ``lab.longterm``'s docstring.

    python experiments/longterm.py                 # (a) + (b) + (c): about 12 minutes on one thread
    python experiments/longterm.py --quick         # a smoke run of everything in about a minute
    python experiments/longterm.py --skip-models   # the bound and the kernels alone (seconds)

(a) the paper's relative upper bound (1/P) sum_i |S_i(Delta)| for RoPE on a d = 64 head and on r = 64, 256 random
features; (b) the measured kernel relative to distance 0 for random q, k through FAVOR+: eq. 19's K(Delta)/D
against RoPE before the map (FAVOR+ estimate and exact exp); (c) small causal byte LMs (the quick preset's model)
trained for --steps steps per variant, and their float64 attention weights on held-out windows against distance.

Writes bound.csv, kernel.csv, kernel_summary.csv, profiles.csv, trained_summary.csv, row_sums.csv, models.csv,
summary.json, stdout.txt, bound.png, kernel.png, trained.png to --out (training runs under --out/runs/, not
committed).
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lab.longterm import QUICK, LongtermConfig, run  # noqa: E402
from lab.sweeps import parse_list, run_script, variant_listing  # noqa: E402


def main():
    d = LongtermConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=variant_listing())
    p.add_argument("--quick", action="store_true",
                   help=f"smoke preset: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (out: <out>/quick)")
    p.add_argument("--out", help="output folder (default experiments/results/longterm, or .../longterm/quick)")
    p.add_argument("--d", type=int, help=f"head dim of q, k in (a) and (b) (default {d.d})")
    p.add_argument("--rs", help=f"numbers of random features r (default {','.join(map(str, d.rs))})")
    p.add_argument("--base", type=float, help=f"RoPE base (default {d.base:g})")
    p.add_argument("--max-delta", type=int, help=f"largest distance of (a) and (b) (default {d.max_delta})")
    p.add_argument("--draws", type=int, help=f"(b): random (q, k) draws per kernel (default {d.draws})")
    p.add_argument("--variants", help=f"(c): comma-separated (below; default {','.join(d.variants)})")
    p.add_argument("--seeds", help=f"(c): comma-separated seeds (default {','.join(map(str, d.seeds))})")
    p.add_argument("--steps", type=int, help=f"(c): training steps per model (default {d.steps})")
    p.add_argument("--length", type=int, help=f"(c): sequence length (default {d.length})")
    p.add_argument("--eval-windows", type=int, help=f"(c): held-out windows measured (default {d.eval_windows})")
    p.add_argument("--skip-models", action="store_true", help="only (a) and (b)")
    p.add_argument("--resume", action="store_true", help="(c): reuse finished runs, continue interrupted ones")
    p.add_argument("--progress", action="store_true", help="(c): tqdm bars")
    a = p.parse_args()
    base = Path(__file__).parent / "results" / "longterm"
    given = dict(d=a.d, rs=parse_list(a.rs, int, "rs"), base=a.base, max_delta=a.max_delta, draws=a.draws,
                 variants=parse_list(a.variants, str, "variants"), seeds=parse_list(a.seeds, int, "seeds"),
                 steps=a.steps, length=a.length, eval_windows=a.eval_windows)
    fields = {**(QUICK if a.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    out = a.out or str(base / "quick" if a.quick else base)
    run_script(p, lambda: run(LongtermConfig(**fields, out=out, skip_models=a.skip_models, resume=a.resume,
                                             progress=a.progress)))


if __name__ == "__main__":
    main()
