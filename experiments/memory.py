"""Memory and speed profile against sequence length: peak memory and time of softmax (SDPA, N x N), eq. 19
(causal, bidirectional), RoPE before the features and no RoPE, forward and forward+backward, each point in a fresh
process. Writes memory.csv, memory.json and a log-log memory.png. A series stops at the time/memory budget instead
of taking the machine down.

    python experiments/memory.py                       # 1k .. 64k on this machine
    python experiments/memory.py --with-peers          # + performer-pytorch and fast-transformers
    python experiments/memory.py --series "eq.19 causal" --update      # re-measure one series, keep the rest
    python experiments/memory.py --device cuda --lengths 1024 2048 4096 8192 16384 32768 65536 131072

Sequence parallelism (``lab.parallel_profile``): peak memory per rank and time of one eq. 19 causal
call (B=1 H=8 d=64 r=256; --modes) with the sequence split across P gloo processes of one thread each, P = 1
being the plain call; writes memory_sp.csv, ratios.csv, memory_sp.json and memory_sp.png (default --out
experiments/results/memory_sp):

    python experiments/memory.py --sequence-parallel 1 2 --lengths 4096 8192 16384 32768 65536 131072 262144
"""

import argparse

from tqdm import tqdm

from lab import parallel_profile
from lab.bench import PROFILE_SERIES, memory_profile, merge_profile, peers_available, read_profile, write_profile
from lab.bench.memory import profile_line
from lab.sweeps import listing


def main():
    p = argparse.ArgumentParser(description=__doc__, epilog=listing("series", list(PROFILE_SERIES)),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2**i for i in range(10, 17)])
    p.add_argument("--series", nargs="+", default=None, help="some of the series below (quote each name)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--with-peers", action="store_true", help="add performer-pytorch / fast-transformers series")
    p.add_argument("--device", default="cpu")
    p.add_argument("--time-budget", type=float, default=60.0, help="stop a series after a point slower than this (s)")
    p.add_argument("--memory-budget", type=float, default=16384.0, help="skip points projected above this (MiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--update", action="store_true", help="replace only the measured series in --out's results")
    p.add_argument("--sequence-parallel", type=int, nargs="+", metavar="P",
                   help="instead of the series: eq. 19 causal fwd+bwd split across P gloo ranks, for each P given "
                        "(e.g. 1 2); peak memory is per rank")
    p.add_argument("--out", help="default: experiments/results/memory (memory_sp with --sequence-parallel)")
    args = p.parse_args()
    if args.sequence_parallel:
        return sequence_parallel(p, args)
    args.out = args.out or "experiments/results/memory"
    if args.with_peers and not all(peers_available().values()):
        p.error(f"--with-peers: not installed here: {peers_available()}")
    bar = tqdm(desc="points", unit="pt")
    try:
        records = memory_profile(args.lengths, args.series, args.modes, args.with_peers, args.device,
                                 args.time_budget, args.memory_budget, args.repeats, on_record=lambda r: bar.update())
    except ValueError as e:
        p.error(str(e))
    bar.close()
    if args.update:
        records = merge_profile(read_profile(args.out), records)
    for row in write_profile(records, args.out, {"args": vars(args)}):
        print(profile_line(row))


def sequence_parallel(p, args):
    out = args.out or "experiments/results/memory_sp"
    if args.update or args.series or args.with_peers or args.device != "cpu":
        p.error("--sequence-parallel: runs on CPU (gloo) and takes none of --update, --series, --with-peers, "
                "--device")
    bar = tqdm(desc="points", unit="pt")
    try:
        records = parallel_profile.sequence_parallel_profile(
            args.lengths, args.sequence_parallel, args.modes, time_budget=args.time_budget,
            memory_budget_mib=args.memory_budget, repeats=args.repeats, timeout=max(600.0, 8 * args.time_budget),
            on_record=lambda r: bar.update())
    except ValueError as e:
        p.error(str(e))
    bar.close()
    parallel_profile.write_sequence_parallel_profile(records, out, {"args": vars(args)})
    print("\n".join(parallel_profile.summary_lines(records)))


if __name__ == "__main__":
    main()
