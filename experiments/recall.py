"""Multi-query associative recall (key-value pairs, then queries) against sequence length for every variant: the
standard probe of how much a linear-attention state can retrieve.

    python experiments/recall.py                                     # lengths 64,128,256, pairs = length/8
    python experiments/recall.py --lengths 128,512 --pairs 16 --seeds 0,1
    python experiments/recall.py --task mqar --steps 20000 --device cuda   # Zoology's two-token MQAR

The default task, pair-recall, writes each pair as one token so that the lookup is a single attention hop a tiny
model learns in a few hundred CPU steps; MQAR (two tokens per pair) first needs an induction head, which takes
thousands of steps.

Writes summary.md / summary.csv, final.csv, results.csv and recall.png to --out.
"""

import argparse
from pathlib import Path

from linrope.models import VARIANTS
from linrope.train import leave_distributed
from linrope.sweeps import parse_list, run_recall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["pair-recall", "mqar"], default="pair-recall")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--lengths", default="64,128,256", help="comma-separated sequence lengths")
    p.add_argument("--pairs", type=int, help="key-value pairs per sequence (default: length // 8)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "recall"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    try:
        run_recall(task=a.task, variants=parse_list(a.variants, str, "variants"),
                   lengths=parse_list(a.lengths, int, "lengths"), pairs=a.pairs,
                   seeds=parse_list(a.seeds, int, "seeds"), steps=a.steps, batch_size=a.batch_size, device=a.device, out=a.out, resume=a.resume,
                   progress=not a.no_progress)
    except ValueError as e:  # a bad argument: say which, with the usage
        p.error(str(e))
    leave_distributed()  # under torchrun: wait for rank 0's tables and plots, then leave the process group


if __name__ == "__main__":
    main()
