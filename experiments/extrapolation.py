"""Length extrapolation: evaluate language-model checkpoints trained at length N at N, 2N, 4N, 8N, and the loss by
position bucket (does the loss rise past the trained length?).

    python experiments/long_context.py --preset cpu-long            # trains the checkpoints first
    python experiments/extrapolation.py --runs experiments/results/long_context/cpu-long

Writes extrapolation.csv, buckets.csv and extrapolation.png to --out.
"""

import argparse
from pathlib import Path

from lab.sweeps import parse_list, run_extrapolation, run_script


def main():
    here = Path(__file__).parent / "results"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=[str(here / "long_context" / "cpu-long")],
                   help="directories searched for ckpt.pt, or checkpoint files")
    p.add_argument("--factors", default="1,2,4,8", help="evaluation lengths as multiples of the training length")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens per evaluation length")
    p.add_argument("--buckets", type=int, default=8, help="position buckets per evaluation length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(here / "extrapolation"))
    a = p.parse_args()
    run_script(p, lambda: run_extrapolation(a.runs, factors=parse_list(a.factors, int, "factors"),
                                            eval_tokens=a.eval_tokens, buckets=a.buckets, device=a.device, out=a.out))


if __name__ == "__main__":
    main()
