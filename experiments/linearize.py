"""Linearize a trained softmax Llama (Hugging Face LlamaForCausalLM, bytes as tokens) into linrope's linear
attention: each RoPE placement (eq. 19, eq. 19 + decay, learned rotations + decay, RoPE before phi) with FAVOR+
and with the trained Hedgehog map, after attention transfer, after a short fine-tune, and against the same
linear model trained from scratch for as many steps; extrapolation to 4x and 8x; decoding cost against the
teacher's KV cache.

    pip install -e ".[experiments,hf]"
    python experiments/linearize.py                       # quick preset, under an hour on a 2-core CPU

Writes results.csv, decode.csv, summary.md, linearize.png, attention_error.csv/.md and config.json to --out.
"""

import argparse
from pathlib import Path

from lab.linearize import MAPS, PLACEMENTS, PRESETS, run, run_mechanism
from lab.sweeps import parse_list, run_script


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--placements", default=",".join(PLACEMENTS), help=f"some of {','.join(PLACEMENTS)}")
    p.add_argument("--maps", default=",".join(MAPS), help=f"some of {','.join(MAPS)}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--data", default=None,
                   help="a text file, or debian:PACKAGE (its manual pages), as the corpus (default: the stdlib sources)")
    p.add_argument("--out", default=None, help="output folder (default: experiments/results/linearize/PRESET)")
    p.add_argument("--mechanism", action="store_true",
                   help="only the attention errors against the teacher, swapped and after transfer (minutes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args()
    out = a.out or str(Path(__file__).parent / "results" / "linearize" / a.preset)
    which = run_mechanism if a.mechanism else run
    run_script(p, lambda: which(a.preset, out, placements=parse_list(a.placements, str, "placements"),
                                maps=parse_list(a.maps, str, "maps"),
                                seeds=None if a.seeds is None else parse_list(a.seeds, int, "seeds"),
                                progress=not a.no_progress, corpus=a.data))


if __name__ == "__main__":
    main()
