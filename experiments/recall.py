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

from lab.sweeps import add_synthetic_arguments, parse_list, run_recall, run_script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["pair-recall", "mqar"], default="pair-recall")
    p.add_argument("--lengths", default="64,128,256", help="comma-separated sequence lengths")
    p.add_argument("--pairs", type=int, help="key-value pairs per sequence (default: length // 8)")
    add_synthetic_arguments(p, out=str(Path(__file__).parent / "results" / "recall"), seeds="0", steps=400)
    a = p.parse_args()
    run_script(p, lambda: run_recall(
        task=a.task, variants=parse_list(a.variants, str, "variants"), lengths=parse_list(a.lengths, int, "lengths"),
        pairs=a.pairs, seeds=parse_list(a.seeds, int, "seeds"), steps=a.steps, batch_size=a.batch_size,
        device=a.device, out=a.out, resume=a.resume, progress=not a.no_progress, lr=a.lr,
        features=a.features, rope_base=a.rope_base, position_lr=a.position_lr, gate_lr=a.gate_lr))


if __name__ == "__main__":
    main()
