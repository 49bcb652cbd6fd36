"""favor_attention with a state (B = 1, H = 8, d = dv = 64, r = 256, interleaved RoPE, no grad, 1 thread): us per
call of N positions, the tree under test against the starting commit (d0f7a3f, imported as linrope_old from a copy
of its linrope/), medians of interleaved rounds in one process; and the layer's step split into its parts.

    PYTHONPATH=<tree>:<tree>/experiments:<dir holding linrope_old> OMP_NUM_THREADS=1 python calls.py out.json
"""

import json
import statistics
import sys
import time

import torch

import linrope
import linrope_old


def med(fn, n=300):
    for _ in range(30):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def main(out: str, rounds: int = 5) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    B, H, d, r, L = 1, 8, 64, 256, 1024
    W = linrope.features.gaussian_orthogonal_matrix(r, d, generator=g).float()
    q, k, v = (torch.randn(B, H, L + 32, d, generator=g) for _ in range(3))
    fns = {}
    with torch.no_grad():
        for name, lib in (("old", linrope_old), ("new", linrope)):
            rot = lib.RotaryEmbedding(r)
            _, st = lib.favor_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], W, causal=True, rotary=rot,
                                        return_state=True)
            for n in (1, 2, 4, 16):
                sl = slice(L, L + n)
                fns[f"{name} N={n}"] = (lambda lib=lib, rot=rot, st=st, sl=sl: lib.favor_attention(
                    q[:, :, sl], k[:, :, sl], v[:, :, sl], W, causal=True, rotary=rot, initial_state=st,
                    return_state=True))
        res = {key: [] for key in fns}
        for i in range(rounds):
            for key in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                res[key].append(med(fns[key]))
    res = {key: statistics.median(vals) for key, vals in res.items()}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for n in (1, 2, 4, 16):
        print(f"N={n}: old {res[f'old N={n}']:.0f} us, new {res[f'new N={n}']:.0f} us, "
              f"new/old {res[f'new N={n}'] / res[f'old N={n}']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
