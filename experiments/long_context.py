"""Loss against sequence length for every attention variant: byte-level language modelling on the Python
standard library's own sources (no download) or any local file such as enwik8.

    python experiments/long_context.py --preset quick          # ~5 min on 2 CPU cores: softmax + RoPE, RoPE before
                                                               # phi, eq. 19, + decay, learned rotations + decay,
                                                               # no positions
    python experiments/long_context.py --preset ablations      # quick's scale: absolute positions, rotated normalizer
    python experiments/long_context.py --preset cpu-long       # ~65 min: softmax-rope + 4 linear variants, 3 seeds
    python experiments/long_context.py --preset paper --data enwik8 --device cuda   # RoFormer sec. 4.4
    torchrun --nproc_per_node=2 experiments/long_context.py --preset quick --out /tmp/ddp   # DDP (gloo on CPU)
    torchrun --nproc_per_node=2 experiments/long_context.py --variants linear-rope --sequence-parallel --out /tmp/sp
        # sequence parallelism: each rank holds half of every sequence (linear variants only); same curve as 1 rank

Writes to --out (default experiments/results/long_context/<preset>): results.csv (every logged row),
summary.md / summary.csv (final validation bits per byte per variant and length: mean, std and range over seeds,
seeds, steps, flags; summary.md best first, with the difference to softmax-rope and to eq. 19), long_context.png (validation bpb
against step, and the final bpb of each variant) and runs/<variant>_n<N>_s<seed>/ (config.json, metrics.jsonl,
ckpt.pt). --resume continues interrupted runs exactly.
"""

import argparse
from pathlib import Path

from lab.sweeps import PRESETS, parse_list, run_long_context, run_script, variant_listing


def main():
    p = argparse.ArgumentParser(description=__doc__, epilog=variant_listing(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--variants", help="comma-separated variant names (below; default: the preset's)")
    p.add_argument("--lengths", help="comma-separated sequence lengths, e.g. 512,2048 (default: the preset's)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--feature-map", choices=["favor+", "hedgehog", "trig", "relu", "elu"], help="for the linear variants")
    p.add_argument("--data", help="a local byte file (enwik8: 90M/5M/5M split), or debian:PACKAGE (the manual "
                   "pages a Debian package installed, e.g. debian:manpages-dev); default: the stdlib sources")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the preset's)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (same batch, less memory)")
    p.add_argument("--sequence-parallel", type=int, nargs="?", const=0, default=1, metavar="P",
                   help="under torchrun: P ranks hold one sequence, each a contiguous 1/P of it, the rest of the "
                        "world is data parallel (no value: P = world size; linear variants only)")
    p.add_argument("--out", help="output folder (default: experiments/results/long_context/<preset>)")
    p.add_argument("--resume", action="store_true", help="skip finished runs and continue interrupted ones")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    a = p.parse_args()
    out = a.out or str(Path(__file__).parent / "results" / "long_context" / a.preset)
    run_script(p, lambda: run_long_context(
        a.preset, variants=parse_list(a.variants, str, "variants"), lengths=parse_list(a.lengths, int, "lengths"),
        seeds=parse_list(a.seeds, int, "seeds"), steps=a.steps, feature_map=a.feature_map, data=a.data,
        device=a.device, grad_accum=a.grad_accum, sequence_parallel=a.sequence_parallel, out=out, resume=a.resume,
        progress=not a.no_progress))


if __name__ == "__main__":
    main()
