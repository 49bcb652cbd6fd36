"""Build the layers, run causal and bidirectional attention on a long sequence, and report how closely FAVOR+
tracks the softmax baseline (same weights), plus time and peak memory. A smoke test of the whole stack.

    python experiments/demo.py --length 8192
"""

import argparse

from lab.demo import demo


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192, help="sequence length N")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=256, help="random features r")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    demo(args.length, args.dim, args.heads, args.features, args.seed)


if __name__ == "__main__":
    main()
