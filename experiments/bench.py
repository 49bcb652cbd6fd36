"""The performance targets of linrope as one table of ratios measured in one run (see experiments/lab/bench/):
speed against fast-transformers' causal kernel and SDPA, memory growth and leanness, RoPE overhead, FLOP rate,
and the layer against SoftmaxAttention. Paste the output into BENCHMARKS.md.

    python experiments/bench.py [--n 16384] [--no-peers] [--json out.json]
    python experiments/bench.py --compare REV | --fusion | --breakdown    (see --help)
    python experiments/bench.py --layer-variants [--n 16384]   # the layer with gates, selective rotations, ...: time
                                                                # against eq. 19 + decay
"""

from lab.bench.cli import main

if __name__ == "__main__":
    main()
