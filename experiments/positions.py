"""Which position scheme carries relative position? Train each variant to copy the symbol a fixed distance back
(content gives no hint, only position does) and report validation accuracy per variant over seeds. Minutes on a CPU.

    python experiments/positions.py                                  # every variant, 3 seeds
    python experiments/positions.py --variants linear-rope,linear-rope-inputs,linear-nope --seeds 0,1,2

Writes summary.md / summary.csv, results.csv (accuracy curves), final.csv and positions.png to --out.
"""

import argparse
from pathlib import Path

from linrope.models import VARIANTS
from linrope.train import leave_distributed
from linrope.sweeps import parse_list, run_positions


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--length", type=int, default=64, help="sequence length")
    p.add_argument("--distance", type=int, default=8, help="copy the symbol this many places back")
    p.add_argument("--symbols", type=int, default=16, help="alphabet size (chance = 1/symbols)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "positions"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    try:
        run_positions(variants=parse_list(a.variants, str, "variants"), length=a.length, distance=a.distance,
                      symbols=a.symbols, seeds=parse_list(a.seeds, int, "seeds"), steps=a.steps,
                      batch_size=a.batch_size, device=a.device, out=a.out, resume=a.resume,
                      progress=not a.no_progress)
    except ValueError as e:  # a bad argument: say which, with the usage
        p.error(str(e))
    leave_distributed()  # under torchrun: wait for rank 0's tables and plots, then leave the process group


if __name__ == "__main__":
    main()
