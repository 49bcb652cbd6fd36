"""Decoding cost against context length: ms per generated token and the bytes of the decoding state, for one
causal LinearRotaryAttention layer (eq. 19: a constant-size state) and one SoftmaxAttention layer (a KV cache
that grows with the context), the latter both as the layer steps (appending by concatenation) and as a
preallocated cache would (SDPA over the cache, no copy). Writes decode.csv, decode.json and decode.png.

    python experiments/decode.py                                  # 1k .. 1M tokens (~3 minutes on 2 cores)
    python experiments/decode.py --lengths 1024,16384 --tokens 10 # a quick look
"""

import argparse

from lab.decode import DEFAULT_LENGTHS, KINDS, decode_profile, write_decode
from lab.sweeps import parse_list, run_script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="context lengths, comma-separated")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"any of {', '.join(KINDS)}")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--tokens", type=int, default=20, help="timed single-token steps per point (after 3 warm-up)")
    p.add_argument("--max-cache-gib", type=float, default=6.0, help="skip softmax points whose KV cache is larger")
    p.add_argument("--out", default="experiments/results/decode")
    args = p.parse_args()

    def run():
        lengths = parse_list(args.lengths, int, "lengths")
        kinds = parse_list(args.kinds, str, "kinds")
        if any(n < 1 for n in lengths):
            raise ValueError(f"lengths: expected positive integers, got {lengths}")
        if any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds: expected names from {KINDS}, got {kinds}")
        if args.tokens < 1:
            raise ValueError(f"tokens: expected an integer >= 1, got {args.tokens}")

        def show(r):
            if r["status"] != "ok":
                print(f"{r['kind']:<8} L={r['length']:<8} {r['status']}", flush=True)
            else:
                print(f"{r['kind']:<8} L={r['length']:<8} {r['token_ms']:8.3f} ms/token  state "
                      f"{r['state_bytes'] / 2**20:10.2f} MiB  (reached in {r['build_s']:.1f} s)", flush=True)

        rows = decode_profile(lengths, kinds, max_cache_gib=args.max_cache_gib, on_point=show, dim=args.dim,
                              heads=args.heads, dim_head=args.dim_head, nb_features=args.nb_features,
                              tokens=args.tokens)
        print("\n| context | linear ms/token | softmax ms/token (concat / prealloc) | linear / softmax time (concat / "
              "prealloc) | linear state | softmax cache |")
        print("|---:|---:|---:|---:|---:|---:|")
        f3 = "{:.3f}".format
        for n in sorted({r["length"] for r in rows}):
            got = {r["kind"]: r for r in rows if r["length"] == n and r["status"] == "ok"}
            cell = lambda kind, key, f: f(got[kind][key]) if key in got.get(kind, {}) else "—"  # noqa: E731
            print(f"| {n} | {cell('linear', 'token_ms', f3)} | {cell('softmax', 'token_ms', f3)} / "
                  f"{cell('softmax-prealloc', 'token_ms', f3)} | {cell('linear', 'token_vs_softmax', f3)} / "
                  f"{cell('linear', 'token_vs_prealloc', f3)} | "
                  f"{cell('linear', 'state_bytes', lambda b: f'{b / 2**20:.2f} MiB')} | "
                  f"{cell('softmax', 'state_bytes', lambda b: f'{b / 2**20:.1f} MiB')} |")
        print(f"wrote {write_decode(rows, args.out, vars(args))}")

    run_script(p, run)


if __name__ == "__main__":
    main()
