"""Medians of run.sh's rounds: the per-token table (ms) and ByteLM.generate tokens/s, as markdown.

    python summarize.py <out dir>
"""

import json
import statistics
import sys
from pathlib import Path


def main(out: str) -> None:
    out = Path(out)
    rows = {}  # (tree, kind, length) -> [ms]
    for path in sorted(out.glob("*-*/decode.json")):
        tree = path.parent.name.rsplit("-", 1)[0]
        for r in json.loads(path.read_text())["rows"]:
            if r.get("status") == "ok":
                rows.setdefault((tree, r["kind"], r["length"]), []).append(r["token_ms"])
    med = {key: statistics.median(v) for key, v in rows.items()}
    n = {key: len(v) for key, v in rows.items()}
    lengths = sorted({key[2] for key in med})
    print("| context | eq. 19 layer step, before (ms/token) | after | after / before | softmax, preallocated cache "
          "| after / softmax | before / softmax |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for L in lengths:
        b, a = med[("before", "linear", L)], med[("after", "linear", L)]
        sm_b, sm_a = med[("before", "softmax-prealloc", L)], med[("after", "softmax-prealloc", L)]
        # the ratios pair each tree's layer with the softmax measured in the same processes
        print(f"| {L} | {b:.3f} | {a:.3f} | {a / b:.2f} | {sm_a:.3f} (before's runs {sm_b:.3f}) | {a / sm_a:.2f} | "
              f"{b / sm_b:.2f} |")
    print("rounds per point:", sorted(set(n.values())))
    gens = {}
    for path in sorted(out.glob("gen-*.json")):
        tree = path.stem.split("-")[1]
        for name, tps in json.loads(path.read_text()).items():
            gens.setdefault((tree, name), []).append(tps)
    print("\n| ByteLM.generate, greedy, B = 1 (prompt 256 bytes, 200 new) | before (tokens/s) | after | after / before |")
    print("|---|---:|---:|---:|")
    for name in dict.fromkeys(k[1] for k in gens):
        b, a = statistics.median(gens[("before", name)]), statistics.median(gens[("after", name)])
        print(f"| {name} | {b:.0f} | {a:.0f} | {a / b:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
