"""Build the layers, run causal and bidirectional attention on a long sequence, and report how closely FAVOR+
tracks the softmax baseline (same weights), plus time and peak memory. A smoke test of the whole stack.

    python experiments/demo.py --length 8192
"""

import argparse
import resource
import time

import torch

from linrope import LinearRotaryAttention, SoftmaxAttention


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192, help="sequence length N")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=256, help="random features r")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x = 0.5 * torch.randn(1, args.length, args.dim)
    dh = args.dim // args.heads
    print(f"N={args.length} dim={args.dim} heads={args.heads} r={args.features}, float32, forward+backward")
    print(f"{'causal':>7} {'layer':<34} {'rel. error vs softmax':>22} {'time s':>8}")
    for causal in (False, True):
        refs = {}
        for rope in ("inputs", None):
            soft = SoftmaxAttention(args.dim, heads=args.heads, dim_head=dh, causal=causal, rope=rope)
            if rope is None:
                soft.load_state_dict(weights)
            weights = soft.state_dict()
            refs[rope] = soft(x).detach()
        for rope in ("inputs", "features", None):
            lin = LinearRotaryAttention(args.dim, heads=args.heads, dim_head=dh, nb_features=args.features,
                                        causal=causal, rope=rope, seed=args.seed)
            lin.load_state_dict(weights, strict=False)  # same q/k/v/out weights as the softmax layers
            target = refs["inputs" if rope == "inputs" else None]
            t = time.perf_counter()
            y = lin(x)
            y.sum().backward()
            dt = time.perf_counter() - t
            err = ((y.detach() - target).norm() / target.norm()).item()
            what = {"inputs": "RoPE on q,k (vs softmax+RoPE)", "features": "eq. 19 (vs softmax, no RoPE)*",
                    None: "no RoPE (vs softmax, no RoPE)"}[rope]
            print(f"{str(causal):>7} {what:<34} {err:>22.3f} {dt:>8.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")
    print("* eq. 19 is a different model from softmax+RoPE: its error only shows it stays close in scale.")


if __name__ == "__main__":
    main()
