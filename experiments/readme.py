"""Rewrite the README's results block (between <!-- quick-results --> and <!-- /quick-results -->) from the
committed quick run in experiments/results/long_context/quick: its figure and its summary table.

    python experiments/long_context.py --preset quick && python experiments/readme.py
    python experiments/readme.py --check     # exit status 1 if the README is not current
"""

import argparse
import sys
from pathlib import Path

from lab.readme import update_readme


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the block is not current")
    a = p.parse_args()
    current = update_readme(Path(__file__).resolve().parent.parent, check=a.check)
    print("README.md: results block " + ("current" if current else "out of date" if a.check else "rewritten"))
    sys.exit(1 if a.check and not current else 0)


if __name__ == "__main__":
    main()
