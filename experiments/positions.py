"""Which position scheme carries relative position? Train each variant to copy the symbol a fixed distance back
(content gives no hint, only position does) and report validation accuracy per variant over seeds. Minutes on a CPU.

    python experiments/positions.py                                  # every variant, 3 seeds
    python experiments/positions.py --variants linear-rope,linear-rope-inputs,linear-nope --seeds 0,1,2

Writes summary.md / summary.csv, results.csv (accuracy curves), final.csv and positions.png to --out.
"""

import argparse
from pathlib import Path

from lab.sweeps import add_synthetic_arguments, parse_list, run_positions, run_script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=64, help="sequence length")
    p.add_argument("--distance", type=int, default=8, help="copy the symbol this many places back")
    p.add_argument("--symbols", type=int, default=16, help="alphabet size (chance = 1/symbols)")
    add_synthetic_arguments(p, out=str(Path(__file__).parent / "results" / "positions"), seeds="0,1,2", steps=300)
    a = p.parse_args()
    run_script(p, lambda: run_positions(
        variants=parse_list(a.variants, str, "variants"), length=a.length, distance=a.distance, symbols=a.symbols,
        seeds=parse_list(a.seeds, int, "seeds"), steps=a.steps, batch_size=a.batch_size, device=a.device,
        out=a.out, resume=a.resume, progress=not a.no_progress, lr=a.lr,
        features=a.features, rope_base=a.rope_base, position_lr=a.position_lr, gate_lr=a.gate_lr))


if __name__ == "__main__":
    main()
