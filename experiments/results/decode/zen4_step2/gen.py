"""ByteLM.generate tokens per second (greedy, B = 1, a 256-byte prompt, 200 new bytes; the prompt pass included,
the same in every tree): median of 3 timed calls after a warm-up, 1 thread. Run with the tree under test first on
PYTHONPATH (its linrope and its experiments/lab):

    PYTHONPATH=<tree>:<tree>/experiments OMP_NUM_THREADS=1 python gen.py out.json
"""

import json
import statistics
import sys
import time

import torch

from lab.models import ByteLM, ModelConfig

CONFIGS = {"lab default (3 layers, dim 128, 4 heads, r 64)": ModelConfig(),
           "3 layers, dim 512, 8 heads, r 256": ModelConfig(dim=512, heads=8, nb_features=256),
           "softmax-rope, 3 layers, dim 128": ModelConfig(attention="softmax-rope")}


def main(out: str) -> None:
    torch.set_num_threads(1)
    res = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = ByteLM(cfg).eval()
        idx = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(1))
        model.generate(idx, 20, temperature=0)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.generate(idx, 200, temperature=0)
            times.append(time.perf_counter() - t0)
        res[name] = 200 / statistics.median(times)
    with open(out, "w") as f:
        json.dump(res, f)
    print(out, res)


if __name__ == "__main__":
    main(sys.argv[1])
