"""ByteLM.generate tokens per second (greedy, B = 1, a 256-byte prompt, 200 new bytes, the prompt pass included)
with the eager decoding step and with kernel="cpp", interleaved in one process: median of 5 timed calls each after
a warm-up, 1 thread. Also checks that both generate the same bytes.

    PYTHONPATH=.:experiments OMP_NUM_THREADS=1 python experiments/results/decode/zen4_cpp/gen.py out.json
"""

import json
import statistics
import sys
import time

import torch

from lab.models import ByteLM, ModelConfig

CONFIGS = {"lab default (3 layers, dim 128, 4 heads, r 64)": dict(),
           "3 layers, dim 512, 8 heads, r 256": dict(dim=512, heads=8, nb_features=256),
           "learned + gate, 3 layers, dim 128": dict(attention="linear-rope-learned-gated")}


def main(out: str) -> None:
    torch.set_num_threads(1)
    res = {}
    idx = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(1))
    for name, cfg in CONFIGS.items():
        models = {}
        for kernel in ("torch", "cpp"):
            torch.manual_seed(0)
            models[kernel] = ByteLM(ModelConfig(**cfg, engine_kernel=kernel)).eval()
        outs = {k: m.generate(idx, 20, temperature=0) for k, m in models.items()}  # warm-up (and the build)
        assert torch.equal(outs["torch"], outs["cpp"]), name
        times = {k: [] for k in models}
        for _ in range(5):
            for k, m in models.items():
                t0 = time.perf_counter()
                m.generate(idx, 200, temperature=0)
                times[k].append(time.perf_counter() - t0)
        res[name] = {k: 200 / statistics.median(t) for k, t in times.items()}
        print(name, {k: round(v, 1) for k, v in res[name].items()}, flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
