"""Memory and speed profile against sequence length: peak memory and time of softmax (SDPA, N x N), eq. 19
(causal, bidirectional), RoPE before the features and no RoPE, forward and forward+backward, each point in a fresh
process. Writes CSV + JSON and a log-log PNG. A series stops at the time/memory budget instead of taking the
machine down.

    python experiments/memory.py                       # 1k .. 64k on this machine
    python experiments/memory.py --with-peers          # + performer-pytorch and fast-transformers
    python experiments/memory.py --device cuda --lengths 1024 2048 ... 262144
"""

import argparse
import csv
import json
import os

from tqdm import tqdm

from linrope.bench import PROFILE_SERIES, machine, memory_profile, peers_available, plot_profile


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2**i for i in range(10, 17)])
    p.add_argument("--series", nargs="+", default=None, help=f"subset of: {list(PROFILE_SERIES)}")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--with-peers", action="store_true", help="add performer-pytorch / fast-transformers series")
    p.add_argument("--device", default="cpu")
    p.add_argument("--time-budget", type=float, default=60.0, help="stop a series after a point slower than this (s)")
    p.add_argument("--memory-budget", type=float, default=16384.0, help="skip points projected above this (MiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="experiments/results/memory")
    args = p.parse_args()
    if args.with_peers and not all(peers_available().values()):
        p.error(f"--with-peers: not installed here: {peers_available()}")
    os.makedirs(args.out, exist_ok=True)
    bar = tqdm(desc="points", unit="pt")
    records = memory_profile(args.lengths, args.series, args.modes, args.with_peers, args.device, args.time_budget,
                             args.memory_budget, args.repeats, on_record=lambda r: bar.update())
    bar.close()
    rows = [dict(series=r.params["series"], mode=r.params["mode"], n=r.params["n"], seconds=r.seconds,
                 peak_mib=r.peak_mib, status=r.status) for r in records]
    with open(os.path.join(args.out, "memory.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump({"machine": machine(), "args": vars(args), "records": [r.to_dict() for r in records]}, f, indent=1)
    plot_profile(records, os.path.join(args.out, "memory.png"), f"{machine()}; B=1 H=8 d=64 r=256 float32")
    for r in rows:
        s = "" if r["seconds"] is None else f"{r['seconds']:.3f} s"
        m = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        print(f"{r['series']:<38} {r['mode']:<8} N={r['n']:<7} {s:>10} {m:>10}  {r['status']}")


if __name__ == "__main__":
    main()
