"""The mechanism of eq. 19, measured (issue 13 section 1): how selective RoPE on positive features can be, and what
one attention layer learns with it. Definitions are in ``lab.mechanism``'s docstring.

    python experiments/mechanism.py                       # (a) capacity table, (b) copy-8-back toy, (c) recall toy
    python experiments/mechanism.py --skip-toys           # the capacity table alone (seconds)
    python experiments/mechanism.py --seeds 0 --steps 300 --attentions linear-rope,linear-rope-learned@r=32

(a) the best SNR = K(8)^2 / sum_(Delta != 8) K(Delta)^2 of the eq. 19 kernel K over Delta = 0..63 for frequency
designs x r, with arg c in [-pi/2, pi/2] (positive features), any phase, or copy pairing; (b) a one-layer
copy-8-back toy whose queries and keys are content-free, so only the positional mechanism can find the target;
(c) a one-layer pair-recall toy at N = 64. Runs on one thread (about 8 minutes on a 2-core Xeon).

Writes capacity.csv, capacity.png, toys.csv (accuracy curves), toys_summary.csv, toys.json (every run, with
learned kernels, frequencies and phases), toys.png, summary.json and stdout.txt (the tables printed) to --out.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lab.mechanism import ATTENTIONS, MechanismConfig, run, trained_study  # noqa: E402
from lab.sweeps import parse_list, run_script, variant_listing  # noqa: E402


def main():
    d = MechanismConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=variant_listing(ATTENTIONS, "attentions (append @r=32, @steps=300, @distance=32,"
                                                       " @gamma=0.95 or several: @gamma=0.9+distance=4; a decay "
                                                       "variant decays by the toy's gamma)"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mechanism"))
    p.add_argument("--rs", default=",".join(map(str, d.rs)), help="numbers of features r in the capacity table")
    p.add_argument("--ridge", type=float, default=d.ridge, help="ridge of the selectivity problem (0 = exact)")
    p.add_argument("--attentions", default=",".join(d.attentions), help="copy-8-back toy: comma-separated (below)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--steps", type=int, default=d.steps, help="copy-8-back toy: training steps")
    p.add_argument("--recall-attentions", default=",".join(d.recall_attentions))
    p.add_argument("--recall-seeds", default=",".join(map(str, d.recall_seeds)))
    p.add_argument("--recall-steps", type=int, default=d.recall_steps)
    p.add_argument("--d", type=int, default=d.d, help="query/key/value size of the toys")
    p.add_argument("--r", type=int, default=d.r, help="random features of the toys")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--skip-toys", action="store_true", help="no copy-8-back toy")
    p.add_argument("--skip-recall", action="store_true", help="no recall toy")
    p.add_argument("--trained", metavar="RUNS", help="instead: what the learned rotations of the checkpoints under "
                                                     "RUNS learned (frequencies.csv and a table in --out)")
    a = p.parse_args()
    if a.trained:
        return run_script(p, lambda: trained_study(a.trained, a.out))
    run_script(p, lambda: run(MechanismConfig(
        out=a.out, rs=parse_list(a.rs, int, "rs"), ridge=a.ridge,
        attentions=parse_list(a.attentions, str, "attentions"),
        seeds=parse_list(a.seeds, int, "seeds"), steps=a.steps,
        recall_attentions=parse_list(a.recall_attentions, str, "recall-attentions"),
        recall_seeds=parse_list(a.recall_seeds, int, "recall-seeds"), recall_steps=a.recall_steps, d=a.d, r=a.r,
        lr=a.lr, skip_toys=a.skip_toys, skip_recall=a.skip_recall)))


if __name__ == "__main__":
    main()
