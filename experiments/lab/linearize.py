"""Linearizing a trained softmax transformer (a Hugging Face ``LlamaForCausalLM``, bytes as tokens) into linrope's
linear attention, each RoPE placement with FAVOR+ and with the trained Hedgehog map, against the same linear
model trained from scratch (``experiments/linearize.py`` parses its arguments).

One run: train the teacher on the byte corpus; then for every (placement, feature map, seed): ``linearize`` the
teacher, attention transfer (``attention_transfer``: per-layer MSE to the teacher's attention outputs, only the
new attention parameters train), a short end-to-end fine-tune, and, paired by seed, the same linear architecture
trained from random initialisation for as many steps as transfer and fine-tune together. Validation bits per byte
at the training length and at 4x and 8x; decoding time and memory per token against the teacher's KV cache.
Writes ``results.csv``, ``decode.csv``, ``summary.md``, ``linearize.png`` and, from ``run_mechanism``,
``attention_error.csv`` / ``.md`` to the output folder (the teacher's weights to ``runs/teacher.pt``, reused).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .data import fixed_windows, load_corpus, random_windows
from .decode import state_bytes
from .plots import color, pyplot, write_rows
from .profiling import cpu_name

PLACEMENTS = {  # what each linearization puts where: linearize() keywords
    "eq19": dict(rope="features"),
    "eq19-decay": dict(rope="features", decay="multiscale"),
    "learned-decay": dict(rope="features", decay="multiscale", rope_learned=True),
    "rope-inputs": dict(rope="inputs"),  # RoPE before phi: what LoLCATs, Hedgehog and Liger do
}
MAPS = ("favor+", "hedgehog")


@dataclass(frozen=True)
class Preset:
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    length: int = 128
    batch: int = 16
    teacher_steps: int = 600
    transfer_steps: int = 100
    finetune_steps: int = 100
    nb_features: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_windows: int = 32
    factors: tuple[int, ...] = (1, 4, 8)
    decode_contexts: tuple[int, ...] = (256, 1024, 4096, 16384)
    decode_tokens: int = 32
    lr: float = 2e-3
    transfer_lr: float = 1e-2
    finetune_lr: float = 5e-4


PRESETS = {
    "quick": Preset(),
    "full": Preset(dim=256, layers=4, heads=8, kv_heads=4, length=256, teacher_steps=2000, transfer_steps=300,
                   finetune_steps=300, nb_features=128, seeds=(0, 1, 2, 3, 4)),
}


def teacher_config(p: Preset):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=256, hidden_size=p.dim, intermediate_size=int(8 * p.dim / 3) // 8 * 8,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                       max_position_embeddings=max(p.factors) * p.length, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, tie_word_embeddings=True)


def _lr(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def train_lm(model, data, steps: int, p: Preset, seed: int, lr: float, desc: str, progress: bool) -> list[float]:
    """Next-byte training with AdamW (warmup, cosine to lr/10) on random windows; returns the losses (nats)."""
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x, _ = random_windows(data, p.length, p.batch, g)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def bpb(model, val, length: int, windows: int) -> float:
    """Validation bits per byte over ``windows`` fixed windows of ``length`` bytes (every next-byte prediction)."""
    x, _ = fixed_windows(val, length, windows)
    total = 0.0
    for i in range(0, windows, 8):
        total += model(input_ids=x[i:i + 8], labels=x[i:i + 8], use_cache=False).loss.item() * len(x[i:i + 8])
    return total / windows / math.log(2)


@torch.no_grad()
def attention_errors(teacher, student, ids) -> list[float]:
    """Per layer: how far the student's attention is from the teacher's on the teacher's own inputs,
    |y_student - y_teacher| / |y_teacher| (Frobenius, over the batch), the quantity attention transfer lowers."""
    from linrope.hf import attention_pairs
    return [float((got - target).norm() / target.norm()) for got, target in attention_pairs(teacher, student, ids)]


def _teacher(p: Preset, data, out: Path, progress: bool):
    """The trained teacher (``out/runs/teacher.pt`` if an earlier run left it) and its training seconds."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(teacher_config(p))
    path = out / "runs" / "teacher.pt"
    if path.exists():
        teacher.load_state_dict(torch.load(path, weights_only=True))
        return teacher.eval(), None
    t0 = time.perf_counter()
    train_lm(teacher, data.train, p.teacher_steps, p, 0, p.lr, "teacher", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), path)
    return teacher, time.perf_counter() - t0


def run_mechanism(preset: str | Preset = "quick", out: str | Path = "results/linearize", placements=None,
                  maps=None, seeds=None, progress: bool = True, corpus: str | None = None) -> list[dict]:
    """How close each linearization's attention is to the teacher's (``attention_errors`` per layer) right
    after the swap and after attention transfer; writes ``attention_error.csv`` and ``attention_error.md``."""
    from linrope.hf import attention_transfer, linearize

    p = PRESETS[preset] if isinstance(preset, str) else preset
    if seeds is not None:
        p = replace(p, seeds=tuple(seeds))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_corpus(corpus)
    teacher, _ = _teacher(p, data, out, progress)
    probe = fixed_windows(data.val, p.length, 8)[0]
    rows = []
    for placement in placements or list(PLACEMENTS):
        for fmap in maps or list(MAPS):
            for seed in p.seeds:
                student = linearize(teacher, **PLACEMENTS[placement], feature_map=fmap, nb_features=p.nb_features,
                                    seed=100 * seed)
                swapped = attention_errors(teacher, student, probe)
                g = torch.Generator().manual_seed(seed)
                batches = [random_windows(data.train, p.length, p.batch, g)[0] for _ in range(p.transfer_steps)]
                attention_transfer(teacher, student, batches, steps=p.transfer_steps, lr=p.transfer_lr)
                moved = attention_errors(teacher, student, probe)
                for layer, (a, b) in enumerate(zip(swapped, moved)):
                    rows.append({"placement": placement, "map": fmap, "seed": seed, "layer": layer,
                                 "swapped": a, "transferred": b})
    write_rows(out / "attention_error.csv", rows)
    lines = [f"Relative error of each layer's attention output against the teacher's, on the teacher's inputs "
             f"(8 validation windows of {p.length} bytes), mean over {len(p.seeds)} seeds; CPU {cpu_name()}.", "",
             "| placement | map | " + " | ".join(f"layer {i} swapped | layer {i} after transfer"
                                                 for i in range(p.layers)) + " |",
             "|---|---|" + "---:|" * (2 * p.layers)]
    for placement, fmap in dict.fromkeys((r["placement"], r["map"]) for r in rows):
        cells = []
        for i in range(p.layers):
            sel = [r for r in rows if r["placement"] == placement and r["map"] == fmap and r["layer"] == i]
            cells += [f"{statistics.fmean(r['swapped'] for r in sel):.3f}",
                      f"{statistics.fmean(r['transferred'] for r in sel):.3f}"]
        lines.append(f"| {placement} | {fmap} | " + " | ".join(cells) + " |")
    (out / "attention_error.md").write_text("\n".join(lines) + "\n")
    return rows


def _bpbs(model, val, p: Preset) -> dict:
    return {f"bpb_{f}x": bpb(model, val, f * p.length, max(4, p.eval_windows // f)) for f in p.factors}


def run(preset: str | Preset = "quick", out: str | Path = "results/linearize", placements=None, maps=None,
        seeds=None, progress: bool = True, corpus: str | None = None) -> list[dict]:
    """The whole experiment; returns the rows of ``results.csv``."""
    from linrope.hf import attention_transfer, linearize
    from transformers import LlamaForCausalLM

    p = PRESETS[preset] if isinstance(preset, str) else preset
    if seeds is not None:
        p = replace(p, seeds=tuple(seeds))
    placements = list(PLACEMENTS) if placements is None else placements
    maps = list(MAPS) if maps is None else maps
    bad = [x for x in placements if x not in PLACEMENTS] + [m for m in maps if m not in MAPS]
    if bad:
        raise ValueError(f"placements/maps: unknown {bad}; expected placements from {list(PLACEMENTS)}, maps from "
                         f"{list(MAPS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_corpus(corpus)
    (out / "config.json").write_text(json.dumps({"preset": asdict(p), "corpus": data.describe(), "cpu": cpu_name(),
                                                 "torch": torch.__version__}, indent=1))
    teacher, teacher_time = _teacher(p, data, out, progress)
    teacher_bpb = _bpbs(teacher, data.val, p)
    rows = [{"model": "teacher", "placement": "softmax-rope", "map": "", "seed": 0, "stage": "teacher",
             "steps": p.teacher_steps, "seconds": None if teacher_time is None else round(teacher_time, 1),
             **teacher_bpb}]
    # the same fine-tune on the teacher: what further training alone gives (the teacher is undertrained here)
    tuned = __import__("copy").deepcopy(teacher)
    train_lm(tuned, data.train, p.finetune_steps, p, 0, p.finetune_lr, "teacher fine-tune", progress)
    rows.append({"model": "teacher", "placement": "softmax-rope", "map": "", "seed": 0, "stage": "teacher-finetune",
                 "steps": p.teacher_steps + p.finetune_steps, **_bpbs(tuned, data.val, p)})
    del tuned
    write_rows(out / "results.csv", rows)
    budget = p.transfer_steps + p.finetune_steps
    for placement in placements:
        for fmap in maps:
            for seed in p.seeds:
                options = dict(PLACEMENTS[placement], feature_map=fmap, nb_features=p.nb_features, seed=100 * seed)
                name = f"{placement}/{fmap}/seed {seed}"
                student = linearize(teacher, **options)
                common = {"model": "linearized", "placement": placement, "map": fmap, "seed": seed}
                rows.append({**common, "stage": "swapped", "steps": 0, **_bpbs(student, data.val, p)})
                g = torch.Generator().manual_seed(seed)
                batches = [random_windows(data.train, p.length, p.batch, g)[0] for _ in range(p.transfer_steps)]
                t0 = time.perf_counter()
                hist = attention_transfer(teacher, student, batches, steps=p.transfer_steps, lr=p.transfer_lr)
                rows.append({**common, "stage": "transfer", "steps": p.transfer_steps,
                             "seconds": round(time.perf_counter() - t0, 1),
                             "mse_first": hist["transfer"][0] if hist["transfer"] else None,
                             "mse_last": statistics.fmean(hist["transfer"][-10:]) if hist["transfer"] else None,
                             **_bpbs(student, data.val, p)})
                t0 = time.perf_counter()
                train_lm(student, data.train, p.finetune_steps, p, seed, p.finetune_lr, f"fine-tune {name}",
                         progress)
                rows.append({**common, "stage": "finetune", "steps": budget,
                             "seconds": round(time.perf_counter() - t0, 1), **_bpbs(student, data.val, p)})
                torch.manual_seed(seed)
                scratch = linearize(LlamaForCausalLM(teacher_config(p)), **options)
                t0 = time.perf_counter()
                train_lm(scratch, data.train, budget, p, seed, p.lr, f"scratch {name}", progress)
                rows.append({**common, "model": "scratch", "stage": "scratch", "steps": budget,
                             "seconds": round(time.perf_counter() - t0, 1), **_bpbs(scratch, data.val, p)})
                write_rows(out / "results.csv", rows)
                if progress:
                    print(f"{name}: " + ", ".join(f"{r['stage']} {r['bpb_1x']:.3f}" for r in rows[-4:]), flush=True)
    decode = decode_costs(teacher, linearize(teacher, **PLACEMENTS["eq19-decay"], feature_map="hedgehog",
                                             nb_features=p.nb_features, seed=0), p)
    write_rows(out / "decode.csv", decode)
    (out / "summary.md").write_text(summary(rows, decode, p, data.describe()))
    plot(rows, out / "linearize.png", p)
    run_mechanism(p, out, placements, maps, progress=progress, corpus=corpus)
    return rows


def _cache_bytes(cache) -> int:
    from linrope.hf import LinropeCache
    if isinstance(cache, LinropeCache):
        return sum(state_bytes(s) for s in cache.states.values())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_costs(teacher, student, p: Preset) -> list[dict]:
    """Per-token decoding time (median over ``decode_tokens`` steps, B = 1, greedy) and cache bytes after a
    prompt of each context length: the teacher's KV cache against the linearized model's states."""
    rows = []
    for context in p.decode_contexts:
        ids = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))
        for name, model in (("softmax KV cache (teacher)", teacher), ("eq. 19 state (linearized)", student)):
            out = model(input_ids=ids, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(p.decode_tokens):
                t0 = time.perf_counter()
                out = model(input_ids=nxt, cache=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t0)
            rows.append({"context": context, "model": name, "ms_per_token": 1e3 * statistics.median(times),
                         "cache_bytes": _cache_bytes(cache)})
    return rows


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return "", math.nan
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}", m


def summary(rows: list[dict], decode: list[dict], p: Preset, corpus: str) -> str:
    """The README's tables: bpb by placement and map (mean ± std over seeds), recovery, extrapolation, decoding."""
    teacher = next(r for r in rows if r["stage"] == "teacher")
    tuned = next(r for r in rows if r["stage"] == "teacher-finetune")
    f1, fs = f"bpb_{p.factors[0]}x", [f"bpb_{f}x" for f in p.factors[1:]]
    lines = [f"Teacher: LlamaForCausalLM, {p.layers} layers, dim {p.dim}, {p.heads} heads ({p.kv_heads} kv), trained "
             f"{p.teacher_steps} steps at length {p.length} (batch {p.batch}): **{teacher[f1]:.3f} bpb**; "
             f"{corpus}; CPU {cpu_name()}; {len(p.seeds)} seeds per linearization (the feature draw and the "
             f"batches), paired with the scratch run of the same seed. r = {p.nb_features} features. Transfer "
             f"{p.transfer_steps} steps, fine-tune {p.finetune_steps}; scratch trains the same linear model "
             f"{p.transfer_steps + p.finetune_steps} steps from random initialisation. The teacher given the same "
             f"fine-tune: {tuned[f1]:.3f} bpb. *Recovered*: the share of the swap's loss won back, (swapped − "
             f"fine-tuned) / (swapped − teacher fine-tuned alike).", "",
             "| placement | map | swapped | after transfer | after fine-tune | scratch | recovered | fine-tune − scratch "
             "(paired) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["placement"], r["map"]) for r in rows if r["model"] != "teacher"))
    best = None
    for placement, fmap in keys:
        def of(stage):
            return {r["seed"]: r for r in rows if r["placement"] == placement and r["map"] == fmap
                    and r["stage"] == stage}
        sw, tr, ft, sc = of("swapped"), of("transfer"), of("finetune"), of("scratch")
        cells = [_stats([x[f1] for x in d.values()])[0] for d in (sw, tr, ft, sc)]
        ft_mean = _stats([x[f1] for x in ft.values()])[1]
        sw_mean = _stats([x[f1] for x in sw.values()])[1]
        # recovered: the share of the swap's loss the linearization won back (1 = the teacher's bpb)
        rec = (sw_mean - ft_mean) / (sw_mean - tuned[f1]) if sw_mean > tuned[f1] else math.nan
        diff = _stats([ft[s][f1] - sc[s][f1] for s in ft if s in sc])[0]
        lines.append(f"| {placement} | {fmap} | " + " | ".join(cells) + f" | {rec:.0%} | {diff} |")
        if best is None or ft_mean < best[0]:
            best = (ft_mean, placement, fmap)
    lines += ["", f"Best after fine-tuning: **{best[1]} with {best[2]}** ({best[0]:.3f} bpb against the teacher's "
              f"{teacher[f1]:.3f}).", "",
              "Extrapolation (bpb at the training length and beyond, after fine-tuning; mean over seeds):", "",
              "| model | " + " | ".join(f"{f}x" for f in p.factors) + " |", "|---|" + "---:|" * len(p.factors)]
    lines.append("| teacher (softmax RoPE) | " + " | ".join(f"{teacher[k]:.3f}" for k in [f1, *fs]) + " |")
    lines.append("| teacher, fine-tuned alike | " + " | ".join(f"{tuned[k]:.3f}" for k in [f1, *fs]) + " |")
    for placement, fmap in keys:
        ft = [r for r in rows if r["placement"] == placement and r["map"] == fmap and r["stage"] == "finetune"]
        lines.append(f"| {placement} / {fmap} | " + " | ".join(
            f"{statistics.fmean(r[k] for r in ft):.3f}" for k in [f1, *fs]) + " |")
    lines += ["", "Decoding (B = 1, one token after a prompt of the given length; median ms per token; cache bytes):",
              "", "| context | model | ms / token | cache |", "|---:|---|---:|---:|"]
    for r in decode:
        lines.append(f"| {r['context']} | {r['model']} | {r['ms_per_token']:.2f} | {r['cache_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, p: Preset) -> None:
    """Left: bpb per linearization at each stage (mean, min-max over seeds), the teacher dashed. Right: bpb
    against the evaluation length after fine-tuning."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    teacher = next(r for r in rows if r["stage"] == "teacher")
    f1 = f"bpb_{p.factors[0]}x"
    keys = list(dict.fromkeys((r["placement"], r["map"]) for r in rows if r["model"] != "teacher"))
    stages = ("transfer", "finetune", "scratch")
    width = 0.8 / len(stages)
    for j, stage in enumerate(stages):
        means, lo, hi = [], [], []
        for placement, fmap in keys:
            v = [r[f1] for r in rows if r["placement"] == placement and r["map"] == fmap and r["stage"] == stage]
            means.append(statistics.fmean(v))
            lo.append(means[-1] - min(v))
            hi.append(max(v) - means[-1])
        xs = [i + (j - 1) * width for i in range(len(keys))]
        a.bar(xs, means, width, yerr=[lo, hi], color=color(j), label={"transfer": "after transfer",
              "finetune": "after fine-tune", "scratch": "scratch, same steps"}[stage])
    a.axhline(teacher[f1], color="k", ls="--", label="teacher (softmax RoPE)")
    tuned = next(r for r in rows if r["stage"] == "teacher-finetune")
    a.axhline(tuned[f1], color="k", ls=":", label="teacher, fine-tuned alike")
    a.set_xticks(range(len(keys)), [f"{pl}\n{m}" for pl, m in keys], fontsize=7)
    a.set_ylabel("validation bits per byte")
    a.set_ylim(bottom=max(0.0, teacher[f1] - 0.5))
    a.legend(fontsize=8)
    a.set_title("Linearizing a softmax Llama: bpb at the training length")
    xs = [f * p.length for f in p.factors]
    b.plot(xs, [teacher[f"bpb_{f}x"] for f in p.factors], "k--o", label="teacher (softmax RoPE)")
    for i, (placement, fmap) in enumerate(keys):
        ft = [r for r in rows if r["placement"] == placement and r["map"] == fmap and r["stage"] == "finetune"]
        b.plot(xs, [statistics.fmean(r[f"bpb_{f}x"] for r in ft) for f in p.factors], "-o" if fmap == "hedgehog"
               else ":o", color=color(i // 2), label=f"{placement} / {fmap}")
    b.set_xscale("log", base=2)
    b.set_xlabel("evaluation length (bytes)")
    b.set_ylabel("bits per byte")
    b.set_title("Extrapolation after fine-tuning")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
