"""Medians over the rounds (run1, run2, ...) of decode.py, kinds linear, linear-cpp and softmax-prealloc, and the
tokens/s of gen.py, as markdown. The ratios pair each round's kinds (measured in the same process) first.

    python summarize.py <this folder>
"""

import json
import statistics
import sys
from pathlib import Path


def main(out: str) -> None:
    out = Path(out)
    per_round = {}  # (round, kind, length) -> ms
    for path in sorted(out.glob("run*/decode.json")):
        for r in json.loads(path.read_text())["rows"]:
            if r.get("status") == "ok":
                per_round[(path.parent.name, r["kind"], r["length"])] = r["token_ms"]
    rounds = sorted({k[0] for k in per_round})
    lengths = sorted({k[2] for k in per_round})
    med = lambda kind, L: statistics.median(per_round[(x, kind, L)] for x in rounds)  # noqa: E731
    ratio = lambda a, b, L: statistics.median(per_round[(x, a, L)] / per_round[(x, b, L)] for x in rounds)  # noqa: E731
    print(f"medians over {len(rounds)} rounds")
    print("| context | eq. 19 layer, torch step (ms/token) | kernel=\"cpp\" | cpp / torch | softmax, preallocated "
          "cache | torch / softmax | cpp / softmax |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for L in lengths:
        print(f"| {L} | {med('linear', L):.3f} | {med('linear-cpp', L):.3f} | "
              f"{ratio('linear-cpp', 'linear', L):.2f} | {med('softmax-prealloc', L):.3f} | "
              f"{ratio('linear', 'softmax-prealloc', L):.2f} | **{ratio('linear-cpp', 'softmax-prealloc', L):.2f}** |")
    gen = out / "gen.json"
    if gen.exists():
        print("\n| ByteLM.generate, greedy, B = 1 (prompt 256 bytes, 200 new) | torch step (tokens/s) | cpp | cpp / torch |")
        print("|---|---:|---:|---:|")
        for name, tps in json.loads(gen.read_text()).items():
            print(f"| {name} | {tps['torch']:.0f} | {tps['cpp']:.0f} | {tps['cpp'] / tps['torch']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
