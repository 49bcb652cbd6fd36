"""Is eq. 19 computed right once q and k are large? For each sigma (std of the entries of q and k), causal and
bidirectional, with RoPE on the features and without, each method runs FAVOR+ attention in float32 and every
output row is compared with eq. 19 evaluated exactly in float64 by the library's reference (linrope.reference; see
lab/accuracy.py). Reported: the % of rows off by more than 1e-3 (relative to the row's norm) and the worst row
error. About a minute on 2 cores.

    python experiments/accuracy.py                                   # sigma 0.5 .. 10, every method found
    python experiments/accuracy.py --mask-holes 0.25 --pairing both  # + masked keys, + half-split RoPE
    python experiments/accuracy.py --methods linrope,linrope-naive --sigmas 3,4,5

Methods: linrope, linrope-c16g64 (chunk 16, group 64), linrope-tf32 and linrope-bf16 (precision="tf32" /
"bfloat16": tensor-core products, on a CUDA GPU only), linrope-naive (the reference itself: 0 by construction),
performer-pytorch (only if installed; without RoPE only). Writes accuracy.csv, summary.json, summary.md
and accuracy.png to --out.
"""

import argparse
from pathlib import Path

from lab.accuracy import DEFAULT_SIGMAS, METHODS, PAIRINGS, run_accuracy
from lab.sweeps import listing, parse_list, run_script


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=listing("methods", METHODS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS),
                   help="comma-separated standard deviations of the entries of q and k")
    p.add_argument("--n", type=int, default=512, help="sequence length")
    p.add_argument("--d", type=int, default=64, help="head dim")
    p.add_argument("--r", type=int, default=256, help="number of random features")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="projection: seed, q/k/v: seed+1, mask: seed+2")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names (below)")
    p.add_argument("--pairing", default="interleaved", choices=[*PAIRINGS, "both"],
                   help="RoPE pairing of the features: (2i, 2i+1), (i, i + r/2) or both")
    p.add_argument("--no-rope", action="store_true", help="only the configurations without RoPE")
    p.add_argument("--mask-holes", type=float, default=0.0, metavar="FRACTION",
                   help="> 0: also run with a key padding mask dropping this fraction of keys (plus holes at the "
                        "start and right padding)")
    p.add_argument("--note", default="", help="a line for the header (e.g. which library state was measured)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "accuracy"))
    a = p.parse_args(argv)
    pairings = () if a.no_rope else PAIRINGS if a.pairing == "both" else (a.pairing,)
    run_script(p, lambda: run_accuracy(
        sigmas=parse_list(a.sigmas, float, "sigmas"), n=a.n, d=a.d, r=a.r, batch=a.batch, heads=a.heads,
        seed=a.seed, methods=parse_list(a.methods, str, "methods"), pairings=pairings, mask_holes=a.mask_holes,
        note=a.note, out=a.out))


if __name__ == "__main__":
    main()
