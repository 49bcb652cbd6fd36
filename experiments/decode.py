"""Decoding cost against context length: ms per generated token and the bytes of the decoding state, for one
causal LinearRotaryAttention layer (eq. 19: a constant-size state) and one SoftmaxAttention layer (a KV cache
that grows with the context), the latter both as the layer steps (appending by concatenation) and as a
preallocated cache would (SDPA over the cache, no copy). Writes decode.csv, decode.json and decode.png.

    python experiments/decode.py                                  # 1k .. 1M tokens (~3 minutes on 2 cores)
    python experiments/decode.py --lengths 1024,16384 --tokens 10 # a quick look
"""

import argparse

from lab.decode import DEFAULT_LENGTHS, KINDS, decode_profile, decode_table, point_line, write_decode
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
        rows = decode_profile(parse_list(args.lengths, int, "lengths"), parse_list(args.kinds, str, "kinds"),
                              max_cache_gib=args.max_cache_gib, on_point=lambda r: print(point_line(r), flush=True),
                              dim=args.dim, heads=args.heads, dim_head=args.dim_head, nb_features=args.nb_features,
                              tokens=args.tokens)
        print("\n" + decode_table(rows))
        print(f"wrote {write_decode(rows, args.out, vars(args))}")

    run_script(p, run)


if __name__ == "__main__":
    main()
