"""The experiments behind ``experiments/*.py``: grids of (variant, sequence length, seed) training runs, their
tables and figures. The scripts only parse arguments and call ``run_long_context``, ``run_positions``,
``run_recall`` or ``run_extrapolation``.

Layout of an output directory ``out``: ``config.json`` (the resolved experiment), ``runs/<variant>_n<N>_s<seed>/``
(one ``lab.train`` run each: config, metrics, checkpoint), ``results.csv`` (every metric row of every run),
``summary.csv`` / ``summary.md`` (final numbers per variant and length: mean, std and range over seeds, number of
seeds and steps, skipped steps, flags) and a PNG figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import plots
from .checks import check_number, is_int
from .data import IGNORE, LMTask, SyntheticTask, load_corpus, pair_recall_distances
from .models import CORE_VARIANTS, RECOMMENDED, VARIANTS, ModelConfig, sequence_parallel_refusal
from .train import TrainConfig, distributed_context, load_model, position_losses, read_metrics, train

__all__ = ["Preset", "PRESETS", "QUICK_VARIANTS", "DIFFERENCE_BASES", "parse_list", "listing", "variant_listing",
           "add_synthetic_arguments", "run_script", "run_long_context", "run_positions", "run_recall",
           "run_extrapolation"]

LINEAR_POSITION_VARIANTS = ("linear-rope", "linear-rope-inputs", "linear-abs", "linear-nope")
UNIGRAM_MARGIN = 0.3  # bpb within this of the byte-unigram entropy: the model has learned no context


@dataclass
class Preset:
    """A long-context experiment: every variant x length x seed trains for ``train['steps']`` steps on batches of
    ``tokens_per_step // length`` windows, validated on ``eval_tokens // length`` fixed windows."""

    variants: tuple[str, ...]
    lengths: tuple[int, ...]
    seeds: tuple[int, ...]
    tokens_per_step: int
    eval_tokens: int
    model: dict = field(default_factory=dict)  # ModelConfig fields
    train: dict = field(default_factory=dict)  # TrainConfig fields
    note: str = ""


_SMALL = dict(n_layer=3, dim=128, heads=4, nb_features=64)
_QUICK_TRAIN = dict(steps=180, lr=2e-3, warmup=30, eval_interval=30, log_interval=10, ckpt_interval=60)
# the main job: the ceiling, the linear variant eq. 19 is compared with, eq. 19, what fixes it (a decay; learned
# rotations with a forget gate: the recommended configuration) and no positions at all
QUICK_VARIANTS = ("softmax-rope", "linear-rope-inputs", "linear-rope", "linear-rope-decay", RECOMMENDED, "linear-nope")
PRESETS: dict[str, Preset] = {
    # 6 runs x 180 steps x 0.23-0.30 s (batch 8 x 512 on the 2-core Zen 4, 1.57 s per step of all six) + 7
    # evaluations each: about 5 minutes there, under 10 from a fresh clone on a CPU 1.6x slower.
    "quick": Preset(QUICK_VARIANTS, (512,), (0,), 8 * 512, 16 * 512, _SMALL, _QUICK_TRAIN,
                    note="one seed and 180 steps: shows the gaps of several tenths of a bpb (softmax to linear, "
                         "eq. 19 to eq. 19 + decay); it cannot order variants closer than about 0.1 bpb (in "
                         "cpu-long, 3 seeds of eq. 19 span 0.12)"),
    # what quick leaves out, at its scale: absolute positions and the rotated-normalizer ablation, which diverges
    "ablations": Preset(("linear-rope", "linear-abs", "softmax-abs", "linear-rope-rotden"), (512,), (0,), 8 * 512,
                        16 * 512, _SMALL, _QUICK_TRAIN,
                        note="quick's scale: absolute positions, and eq. 19 with its normalizer rotated (which can "
                             "vanish or turn negative: expected to diverge)"),
    # 15 runs x 1200 steps x 0.17-0.26 s + evaluations: measured 65 minutes on 2 cores.
    "cpu-long": Preset(("softmax-rope",) + LINEAR_POSITION_VARIANTS, (512,), (0, 1, 2), 8 * 512, 32 * 512, _SMALL,
                       dict(steps=1200, lr=2e-3, warmup=60, eval_interval=100, log_interval=20, ckpt_interval=200),
                       note="3 seeds: separates the linear position schemes only where they differ by more than the "
                            "seed spread (see std)"),
    # RoFormer sec. 4.4: 12 layers, 768 dim, 12 heads, length 1024, lr 1e-4, batch 128 (performer-pytorch's enwik8
    # example: constant Adam lr 1e-4, 100k batches, features redrawn every 1000 steps). For a GPU.
    "paper": Preset(("linear-rope", "linear-rope-inputs", "linear-abs", "softmax-rope"), (1024,), (0,), 128 * 1024,
                    64 * 1024, dict(n_layer=12, dim=768, heads=12, nb_features=256, redraw_interval=1000),
                    dict(steps=100_000, lr=1e-4, warmup=100, min_lr_ratio=1.0, weight_decay=0.0, eval_interval=1000,
                         log_interval=100, ckpt_interval=1000, device="cuda", amp=True),
                    note="RoFormer sec. 4.4 (enwik8: pass --data enwik8)"),
}


def parse_list(text: str | None, kind: type, name: str) -> tuple | None:
    """'a,b,c' -> (kind(a), kind(b), kind(c)); None stays None. Raises ValueError naming ``name``."""
    if text is None:
        return None
    try:
        items = tuple(kind(t.strip()) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{name}: expected a comma-separated list of {kind.__name__}, got {text!r}") from None
    if not items:
        raise ValueError(f"{name}: expected at least one value, got {text!r}")
    return items


def listing(title: str, items) -> str:
    """Text naming ``items`` one a line, for an argparse epilog under ``RawDescriptionHelpFormatter`` (which does
    not wrap it): a dict gives each name its description, any other iterable the names alone."""
    items = items if isinstance(items, dict) else dict.fromkeys(items, "")
    width = max(map(len, items))
    return "\n".join([f"{title}:"] + [f"  {name:<{width}}  {about}".rstrip() for name, about in items.items()])


def variant_listing(variants: dict | None = None, title: str = "variants") -> str:
    """Attention variants (default: the byte LM's, ``VARIANTS``), one a line with what each builds (the epilog of
    the scripts that take them)."""
    return listing(title, {name: v.about for name, v in (VARIANTS if variants is None else variants).items()})


def add_synthetic_arguments(parser, *, out: str, seeds: str, steps: int) -> None:
    """The arguments shared by the synthetic-task scripts (``positions.py``, ``recall.py``); the variants are
    listed in the epilog."""
    parser.epilog = variant_listing()
    parser.add_argument("--variants", default=",".join(CORE_VARIANTS),
                        help="comma-separated variant names (below; default: the first seven)")
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {_SYNTH_TRAIN['lr']})")
    parser.add_argument("--position-lr", type=float, default=None,
                        help="peak learning rate of learned rotations and gates, a parameter group of their own "
                             "(default: --lr)")
    parser.add_argument("--gate-lr", type=float, default=None,
                        help="the gates' and clocks' own peak learning rate, apart from the rotations (default: "
                             "--position-lr's group, or --lr)")
    parser.add_argument("--features", type=int, default=None,
                        help=f"random features r of the linear variants (default {_TINY['nb_features']})")
    parser.add_argument("--rope-base", type=float, default=None,
                        help="RoPE's base (default 10000; the frequencies are base^(-2i/d))")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=out)
    parser.add_argument("--resume", action="store_true", help="skip finished runs and continue interrupted ones")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run_script(parser, fn) -> None:
    """Run ``fn()``: a ValueError (a bad argument, named in its message) becomes a usage error; under torchrun,
    wait for rank 0's tables and plots, then leave the process group."""
    from .train import leave_distributed
    try:
        fn()
    except ValueError as e:
        parser.error(str(e))
    leave_distributed()


def _check_grid(variants, lengths, seeds) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected names from {sorted(VARIANTS)}")
    if any(not is_int(n) or n < 2 for n in lengths):
        raise ValueError(f"lengths: expected integers >= 2, got {lengths}")
    if any(not is_int(s) or s < 0 for s in seeds):
        raise ValueError(f"seeds: expected integers >= 0, got {seeds}")


def _is_master() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _finished_with(run_dir: Path, mc: ModelConfig, tc: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly these configs (the device aside)."""
    if not (run_dir / "result.json").exists():
        return False
    saved = json.loads((run_dir / "config.json").read_text())
    now = json.loads(json.dumps({"model": mc.to_dict(), "train": {**asdict(tc), "device": None}}))
    defaults = json.loads(json.dumps(asdict(TrainConfig())))  # fields added since the run: their default then
    return saved["model"] == now["model"] and {**defaults, **saved["train"], "device": None} == now["train"]


def _grid(task_for, variants, lengths, seeds, model: dict, train_cfg: dict, batch_for, out: Path, resume: bool,
          progress: bool) -> tuple[list[dict], list[dict]]:
    """Train every (variant, length, seed); returns (final rows, all metric rows) tagged with the three keys."""
    finals, curves = [], []
    total, k = len(variants) * len(lengths) * len(seeds), 0
    for n in lengths:
        task = task_for(n)
        for variant in variants:
            for seed in seeds:
                k += 1
                name = f"{variant}_n{n}_s{seed}"
                run_dir = out / "runs" / name
                tags = {"variant": variant, "length": n, "seed": seed}
                mc = ModelConfig(**{**model, "attention": variant, "feature_seed": seed})
                tc = TrainConfig(**{**train_cfg, "seed": seed, "batch_size": batch_for(n)})
                if resume and _finished_with(run_dir, mc, tc):
                    result = json.loads((run_dir / "result.json").read_text())
                else:  # a finished run with other settings: train() refuses to resume it, naming the difference
                    _, result = train(mc, tc, task, run_dir, resume=resume, progress=progress,
                                      desc=f"[{k}/{total}] {name}")
                val = result["val"] or {}
                finals.append({**tags, "steps": result["step"], "loss": val.get("loss"), "bpb": val.get("bpb"),
                               "accuracy": val.get("accuracy"), "skipped": result["skipped"],
                               "s_per_step": round(result["s_per_step"], 4), "params": result["params"],
                               "machine": _run_machine(run_dir)})
                if _is_master():
                    curves += [{**tags, **r} for r in read_metrics(run_dir)]
                    shown = f"{task.metric} {val.get(task.metric, float('nan')):.4f}"
                    print(f"[{k}/{total}] {name}: {shown}, skipped steps {result['skipped']}, "
                          f"{result['s_per_step']:.3f} s/step", flush=True)
    return finals, curves


def _run_machine(run_dir: Path) -> str | None:
    """Where a run trained, as its config.json recorded it (None for runs from before it was recorded)."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get("machine")
    except (OSError, ValueError):
        return None


def _machines_line(finals: list[dict]) -> str:
    """The machines the runs of a summary trained on: every results table names its CPU."""
    counts: dict = {}
    for r in finals:
        counts[r.get("machine")] = counts.get(r.get("machine"), 0) + 1
    parts = [f"{m} ({k} runs)" if m else f"not recorded ({k} runs trained before runs recorded their machine)"
             for m, k in counts.items()]
    return "Trained on: " + "; ".join(parts) + "."


def summarize(finals: list[dict], metric: str, unigram: float | None = None) -> list[dict]:
    """One row per (variant, length): ``metric`` mean/std/min/max over seeds, seeds, steps, skipped steps, flags
    ('nan' if any seed ended non-finite, 'skipped k' for skipped steps, 'unigram' within UNIGRAM_MARGIN bpb of
    the byte-unigram entropy)."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in finals):
        for n in sorted({r["length"] for r in finals if r["variant"] == variant}):
            group = [r for r in finals if r["variant"] == variant and r["length"] == n]
            values = [r[metric] if r[metric] is not None else math.nan for r in group]
            s = plots.finite_stats(values)
            flags = []
            if any(not math.isfinite(v) for v in values):
                flags.append("nan")
            skipped = sum(r["skipped"] for r in group)
            if skipped:
                flags.append(f"skipped {skipped}")
            if unigram is not None and metric == "bpb" and s["min"] >= unigram - UNIGRAM_MARGIN:  # NaN: never
                flags.append("unigram")
            rows.append({"variant": variant, "length": n, metric: round(s["mean"], 4), "std": round(s["std"], 4),
                         "min": round(s["min"], 4), "max": round(s["max"], 4), "seeds": len(group),
                         "steps": min(r["steps"] for r in group), "skipped": skipped,
                         "s_per_step": round(sum(r["s_per_step"] for r in group) / len(group), 4),
                         "flags": " ".join(flags) or "ok"})
    return rows


DIFFERENCE_BASES = ("softmax-rope", "linear-rope")  # the ceiling and eq. 19: every variant's distance to both


def _markdown(summary: list[dict], metric: str, header: list[str], bases=DIFFERENCE_BASES) -> str:
    """The summary as a table, best first, with each variant's difference to every base of ``bases`` that ran at
    its length (means over seeds); the min - max column only where some variant ran more than one seed."""
    means = {(r["variant"], r["length"]): r[metric] for r in summary}
    shown = [b for b in bases if any(v == b for v, _ in means)]
    spread = any(r["seeds"] > 1 for r in summary)
    lines = header + ["", "| variant | what | N | " + f"{metric} (mean ± std) | "
                      + "".join(f"vs {b} | " for b in shown) + ("min – max | " if spread else "")
                      + "seeds | steps | s/step | flags |",
                      "|---|---|---|---|" + "---|" * len(shown) + ("---|" if spread else "") + "---|---|---|---|"]
    for r in plots.best_first(summary, metric):
        diffs = []
        for b in shown:
            base = means.get((b, r["length"]), math.nan)
            value = r[metric] - base
            diffs.append("—" if r["variant"] == b or not math.isfinite(value) else f"{value:+.3f}")
        variant = VARIANTS.get(r["variant"])
        lines.append(f"| {r['variant']} | {variant.label if variant else ''} | {r['length']} | "
                     f"{r[metric]:.3f} ± {r['std']:.3f} | " + "".join(f"{d} | " for d in diffs)
                     + (f"{r['min']:.3f} – {r['max']:.3f} | " if spread else "")
                     + f"{r['seeds']} | {r['steps']} | {r['s_per_step']:.3f} | {r['flags']} |")
    if shown:
        better = "negative" if plots.lower_is_better(metric) else "positive"
        lines += ["", f"vs X: the variant's mean {metric} minus X's at the same N ({better} is better)."]
    return "\n".join(lines) + "\n"


PAIRED_BASES = ("linear-rope", "linear-rope-inputs")  # eq. 19, and the linear variant it has to beat


def paired_differences(finals: list[dict], metric: str, bases=PAIRED_BASES) -> list[dict]:
    """Per-seed differences ``variant - base`` of ``metric`` at each length, over the seeds both ran: the same
    seed means the same initialisation and the same batches, so the seed-to-seed variation shared by both cancels.
    One row per (base, variant, length) with two or more common seeds: mean, std, min, max of the differences and
    how many seeds the variant did better on (lower bpb, higher accuracy)."""
    value = {(r["variant"], r["length"], r["seed"]): r[metric] for r in finals if r[metric] is not None}
    better = (lambda d: d < 0) if plots.lower_is_better(metric) else (lambda d: d > 0)
    rows = []
    for base in bases:
        for variant in dict.fromkeys(r["variant"] for r in finals):
            if variant == base:
                continue
            for n in sorted({r["length"] for r in finals}):
                seeds = sorted(s for (v, m, s) in value if v == variant and m == n and (base, n, s) in value)
                if len(seeds) < 2:
                    continue
                diffs = [value[variant, n, s] - value[base, n, s] for s in seeds]
                st = plots.finite_stats(diffs)
                rows.append({"base": base, "variant": variant, "length": n, "seeds": len(seeds),
                             "mean": round(st["mean"], 4), "std": round(st["std"], 4), "min": round(st["min"], 4),
                             "max": round(st["max"], 4), "better": sum(better(d) for d in diffs)})
    return rows


def _paired_markdown(rows: list[dict], metric: str) -> str:
    lines = ["", f"Paired by seed: {metric} of the variant minus {metric} of the base, same seeds (same initialisation "
             "and batches).", "", "| base | variant | N | difference (mean ± std) | min – max | seeds | better on |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['base']} | {r['variant']} | {r['length']} | {r['mean']:+.3f} ± {r['std']:.3f} | "
                     f"{r['min']:+.3f} – {r['max']:+.3f} | {r['seeds']} | {r['better']}/{r['seeds']} |")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, finals, curves, summary, metric, header, name) -> None:
    plots.write_rows(out / "results.csv", curves)
    plots.write_rows(out / "final.csv", finals)
    plots.write_rows(out / "summary.csv", summary)
    text = _markdown(summary, metric, header[:2] + [_machines_line(finals), ""] + header[2:])
    paired = paired_differences(finals, metric)
    if paired:
        plots.write_rows(out / "paired.csv", paired)
        text += _paired_markdown(paired, metric)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out / 'summary.md'}, {out / 'results.csv'}, {out / (name + '.png')}")


def run_long_context(preset: str | Preset = "quick", *, variants=None, lengths=None, seeds=None, steps=None,
                     feature_map=None, data=None, device=None, grad_accum=None, sequence_parallel: int = 1,
                     out="experiments/results/long_context", resume: bool = False, progress: bool = True) -> list[dict]:
    """Language modelling on the byte corpus for every variant x length x seed of ``PRESETS[preset]`` (or of a
    ``Preset`` given directly; any keyword argument overrides it); writes results, summary and
    ``long_context.png`` to ``out`` and returns the summary rows (bits per byte).

    ``sequence_parallel``: under torchrun, ranks holding one sequence, each a contiguous 1/P of it (0: all of
    them); the other axis is data parallel (see ``lab.train``). Linear variants only: a softmax variant
    raises before anything trains. The batch is the same as in one process, so the loss curves match it."""
    if isinstance(preset, Preset):
        p, preset = preset, "custom"
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)} or a Preset, got {preset!r}")
    p = replace(p, variants=variants or p.variants, lengths=lengths or p.lengths, seeds=seeds or p.seeds)
    _check_grid(p.variants, p.lengths, p.seeds)
    train_cfg = {**p.train, **{k: v for k, v in (("steps", steps), ("device", device), ("grad_accum", grad_accum))
                               if v is not None}}
    model = {**p.model, **({"feature_map": feature_map} if feature_map else {})}
    if torch.device(train_cfg.get("device", "cpu")).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available here; pass --device cpu")
    _, world, _ = distributed_context(train_cfg.get("device", "cpu"))  # joins the process group under torchrun
    sp = world if sequence_parallel == 0 else sequence_parallel
    if not is_int(sp) or sp < 1 or world % sp:
        raise ValueError(f"sequence_parallel: expected 0 (the world size) or a divisor of the world size {world}, "
                         f"got {sequence_parallel!r}")
    refused = {v: sequence_parallel_refusal(v) for v in p.variants} if sp > 1 else {}
    refused = {v: why for v, why in refused.items() if why}
    if refused:
        named = "; ".join(f"{v!r}: {why}" for v, why in refused.items())
        raise ValueError(f"variants: no sequence-parallel path for {named}; pass others, e.g. --variants linear-rope")
    if sp > 1 and min(p.lengths) < sp:
        raise ValueError(f"lengths: expected at least {sp} positions (one per rank of a sequence), got {p.lengths}")
    train_cfg["sequence_parallel"] = sp
    corpus = load_corpus(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unigram = LMTask(corpus, 2).unigram_bits
    header = [f"# long-context language modelling, preset `{preset}`", "",
              f"{corpus.describe()}; byte-unigram entropy of the training split {unigram:.3f} bits (flag 'unigram': "
              f"not even {UNIGRAM_MARGIN} bpb below it, i.e. no context learned)",
              f"{p.note}. std is over seeds (0 for one seed)."]
    if _is_master():
        print(header[2])
        (out / "config.json").write_text(json.dumps({"preset": preset, "variants": p.variants, "lengths": p.lengths,
                                                     "seeds": p.seeds, "tokens_per_step": p.tokens_per_step,
                                                     "eval_tokens": p.eval_tokens, "model": model, "train": train_cfg,
                                                     "corpus": corpus.describe(), "world_size": world,
                                                     "sequence_parallel": sp}, indent=2))

    def batch_for(n: int) -> int:  # a multiple of the data-parallel replicas and accumulation, >= 1 per replica
        unit = world // sp * train_cfg.get("grad_accum", 1)
        return max(unit, p.tokens_per_step // n // unit * unit)

    finals, curves = _grid(lambda n: LMTask(corpus, n, eval_windows=max(2, p.eval_tokens // n)), p.variants,
                           p.lengths, p.seeds, model, train_cfg, batch_for, out, resume, progress)
    summary = summarize(finals, "bpb", unigram)
    if _is_master():
        for n in p.lengths:
            best = {kind: min((r["bpb"] for r in summary if r["length"] == n and r["variant"].startswith(kind)
                               and math.isfinite(r["bpb"])), default=math.nan) for kind in ("softmax", "linear")}
            finite = {kind: b for kind, b in best.items() if math.isfinite(b)}  # a sweep may run one kind only
            line = ", ".join(f"best {kind} {b:.3f} bpb" for kind, b in finite.items())
            if len(finite) == 2:
                line += f", gap {finite['linear'] - finite['softmax']:.3f} bpb"
            header.append(f"N = {n}: {line}.")
        _write_outputs(out, finals, curves, summary, "bpb", header, "long_context")
        seeds = f"{len(p.seeds)} seed{'s' * (len(p.seeds) != 1)}"
        machines = sorted({r["machine"] or "machine not recorded" for r in finals})
        title = (f"Byte-level LM on {corpus.name}, preset {preset}: {train_cfg['steps']} steps of "
                 f"{p.tokens_per_step:,} bytes, {seeds} (mean, band min-max)\ntrained on {'; '.join(machines)}")
        plots.plot_long_context(curves, summary, out / "long_context.png", metric="bpb", title=title,
                                reference=unigram, reference_label="byte unigram entropy", highlight=RECOMMENDED,
                                labels={v: VARIANTS[v].label for v in p.variants})
    return summary


def _run_synthetic(name: str, kind: str, task_kwargs, chance: float, *, variants, lengths, seeds, steps, batch_size,
                   model: dict, train_cfg: dict, device, out, resume, progress) -> list[dict]:
    _check_grid(variants, lengths, seeds)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available here; pass --device cpu")
    distributed_context(device)  # joins the process group under torchrun
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = {**train_cfg, "steps": steps, "device": device}
    if _is_master():
        (out / "config.json").write_text(json.dumps({"task": kind, "variants": variants, "lengths": lengths,
                                                     "seeds": seeds, "batch_size": batch_size, "model": model,
                                                     "train": train_cfg,
                                                     "task_args": {n: task_kwargs(n) for n in lengths}}, indent=2))
    finals, curves = _grid(lambda n: SyntheticTask(kind, n, **task_kwargs(n)), variants, lengths, seeds, model,
                           train_cfg, lambda n: batch_size, out, resume, progress)
    summary = summarize(finals, "accuracy")
    if _is_master():
        args = ", ".join(f"N={n}: {task_kwargs(n)}" for n in lengths)
        header = [f"# {name}: validation accuracy", "", f"task {kind} ({args}); chance {chance:.3f}; "
                  f"{steps} steps of {batch_size} sequences at lr {train_cfg['lr']:g}; model: {model['n_layer']} "
                  f"layers, dim {model['dim']}, {model['heads']} heads, r = {model['nb_features']} random features "
                  f"(linear variants), RoPE base {model.get('rope_base', 10000):g}. "
                  f"std is over seeds (0 for one seed)."]
        _write_outputs(out, finals, curves, summary, "accuracy", header, name)
        if kind == "pair-recall":
            rows = recall_by_distance(out, variants, lengths, seeds, task_kwargs, device)
            plots.write_rows(out / "by_distance.csv", rows)
            plots.plot_by_distance(rows, out / f"{name}_distance.png", chance=chance,
                                   title=f"{name}: accuracy by query-key distance ({len(seeds)} seeds, {steps} steps)")
        if len(lengths) > 1:
            plots.plot_accuracy_vs_length(finals, out / f"{name}.png", chance=chance,
                                          title=f"{name}: accuracy vs length ({len(seeds)} seeds, {steps} steps)")
        else:
            plots.plot_curves(curves, out / f"{name}.png", metric="accuracy", reference=chance,
                              reference_label="chance", title=f"{name}: validation accuracy ({len(seeds)} seeds)")
    return summary


_TINY = dict(n_layer=2, dim=64, heads=2, nb_features=32)


def _tiny(features: int | None, rope_base: float | None) -> dict:
    """The synthetic tasks' model, with ``features`` random features (r) and RoPE's ``rope_base`` if given."""
    model = dict(_TINY)
    if features is not None:
        model["nb_features"] = check_number("features", features, lambda v: is_int(v) and v >= 2 and v % 2 == 0,
                                            "an even number of random features >= 2")
    if rope_base is not None:
        model["rope_base"] = float(check_number("rope_base", rope_base, lambda v: v > 1, "a number > 1"))
    return model


_SYNTH_TRAIN = dict(lr=3e-3, warmup=20, weight_decay=0.0, log_interval=10, ckpt_interval=100)


def _rates(position_lr: float | None, gate_lr: float | None) -> dict:
    """The TrainConfig fields of the parameter groups' own rates that were given."""
    return {name: v for name, v in (("position_lr", position_lr), ("gate_lr", gate_lr)) if v is not None}


def run_positions(*, variants=CORE_VARIANTS, length: int = 64, distance: int = 8, symbols: int = 16,
                  seeds=(0, 1, 2), steps: int = 300, batch_size: int = 32, device: str = "cpu",
                  out="experiments/results/positions", resume: bool = False, progress: bool = True,
                  lr: float | None = None, features: int | None = None,
                  rope_base: float | None = None, position_lr: float | None = None,
                  gate_lr: float | None = None) -> list[dict]:
    """``lookback``: predict the symbol ``distance`` places back, a task only position can solve. Accuracy per
    variant over seeds; writes ``positions.png`` (accuracy against step)."""
    return _run_synthetic("positions", "lookback", lambda n: {"distance": distance, "symbols": symbols},
                          1 / symbols, variants=variants, lengths=(length,), seeds=seeds, steps=steps,
                          batch_size=batch_size, model=_tiny(features, rope_base),
                          train_cfg={**_SYNTH_TRAIN, "eval_interval": 25, **({} if lr is None else {"lr": lr}),
                                     **_rates(position_lr, gate_lr)},
                          device=device, out=out, resume=resume, progress=progress)


def recall_by_distance(out: Path, variants, lengths, seeds, task_kwargs, device="cpu", buckets: int = 8
                       ) -> list[dict]:
    """Validation accuracy of each trained pair-recall run under ``out/runs`` by the distance from the query to
    the pair it asks for, in ``buckets`` equal ranges of 1..N-1 per length: is retrieval lost with distance (the
    state forgets, or the rotation's kernel falls off) or evenly (capacity, or optimization)?"""
    rows = []
    for n in lengths:
        kw = task_kwargs(n)
        task = SyntheticTask("pair-recall", n, **kw)
        x, y = task.val_batch()
        dist = pair_recall_distances(x, kw["num_pairs"], kw.get("values", 4))
        edges = torch.linspace(1, n, buckets + 1).round().long().tolist()
        for variant in variants:
            for seed in seeds:
                model, _ = load_model(out / "runs" / f"{variant}_n{n}_s{seed}" / "ckpt.pt", device)
                with torch.no_grad():
                    right = (model(x.to(device)).argmax(-1).cpu() == y) & (y != IGNORE)
                for a, b in zip(edges[:-1], edges[1:]):
                    sel = (dist >= a) & (dist < b)
                    count = int(sel.sum())
                    rows.append({"variant": variant, "length": n, "seed": seed, "start": a, "end": b,
                                 "count": count, "accuracy": float(right[sel].sum()) / count if count else math.nan})
    return rows


def run_recall(*, task: str = "pair-recall", variants=CORE_VARIANTS, lengths=(64, 128, 256), pairs=None,
               seeds=(0,), steps: int = 400, batch_size: int = 32, device: str = "cpu",
               out="experiments/results/recall", resume: bool = False, progress: bool = True,
               lr: float | None = None, features: int | None = None,
               rope_base: float | None = None, position_lr: float | None = None,
               gate_lr: float | None = None) -> list[dict]:
    """Associative recall at each length with ``pairs`` key-value pairs (default ``length // 8``): ``task`` is
    'pair-recall' (one token per pair, ``lab.data.pair_recall``: learnable in CPU minutes) or 'mqar' (two
    tokens per pair, Zoology's MQAR: needs an induction head, i.e. far more steps). Writes ``recall.png``
    (accuracy against length)."""
    if task not in ("pair-recall", "mqar"):
        raise ValueError(f"task: expected 'pair-recall' or 'mqar', got {task!r}")
    return _run_synthetic("recall", task, lambda n: {"num_pairs": pairs or max(1, n // 8)}, 1 / 128,
                          variants=variants, lengths=lengths, seeds=seeds, steps=steps, batch_size=batch_size,
                          model=_tiny(features, rope_base),
                          train_cfg={**_SYNTH_TRAIN, "eval_interval": 50, **({} if lr is None else {"lr": lr}),
                                     **_rates(position_lr, gate_lr)},
                          device=device, out=out,
                          resume=resume, progress=progress)


def run_extrapolation(runs, *, factors=(1, 2, 4, 8), eval_tokens: int = 32768, buckets: int = 8, device: str = "cpu",
                      out="experiments/results/extrapolation") -> list[dict]:
    """Evaluate the checkpoints found under ``runs`` (directories searched for ``ckpt.pt``, or checkpoint files)
    at ``factors`` x their training length on ``eval_tokens // length`` validation windows, and by position
    bucket at each length (bpb, and the attention outputs' RMS averaged over layers: dilution); writes
    ``extrapolation.csv``, ``buckets.csv`` and ``extrapolation.png``."""
    paths = []
    for r in [runs] if isinstance(runs, (str, Path)) else runs:
        r = Path(r)
        paths += sorted(r.rglob("ckpt.pt")) if r.is_dir() else [r]
    if not paths:
        raise ValueError(f"runs: no ckpt.pt found under {runs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpora, rows, bucket_rows = {}, [], []
    for path in paths:
        model, ckpt = load_model(path, device)
        task = ckpt["task"]
        if task["kind"] != "lm":
            raise ValueError(f"runs: {path} was trained on {task['kind']!r}, not language modelling")
        if task["data"] not in corpora:
            corpora[task["data"]] = load_corpus(task["data"])  # None: the stdlib corpus
        corpus = corpora[task["data"]]
        if corpus.checksum != task["checksum"]:
            print(f"warning: {path} was trained on corpus {task['checksum']}, evaluating on {corpus.checksum}")
        variant, seed, n = ckpt["model_config"]["attention"], ckpt["train_config"]["seed"], task["length"]
        for f in factors:
            m = n * f
            x, y = LMTask(corpus, m, eval_windows=max(1, eval_tokens // m)).val_batch()
            per, rms = position_losses(model, x, y, attention_rms=True)
            per = per / math.log(2)  # (m,) bits per byte at each position
            rows.append({"variant": variant, "seed": seed, "train_length": n, "eval_length": m,
                         "bpb": float(per.mean()), "windows": x.shape[0], "checkpoint": _shown_path(path)})
            edges = torch.linspace(0, m, buckets + 1).long().tolist()
            for a, b in zip(edges[:-1], edges[1:]):
                bucket_rows.append({"variant": variant, "seed": seed, "train_length": n, "eval_length": m,
                                    "start": a, "end": b, "bpb": float(per[a:b].mean()),
                                    "attn_rms": float(rms[:, a:b].mean())})
            print(f"{variant} seed {seed} trained at {n}: {m} -> {rows[-1]['bpb']:.4f} bpb", flush=True)
    plots.write_rows(out / "extrapolation.csv", rows)
    plots.write_rows(out / "buckets.csv", bucket_rows)
    table = _extrapolation_markdown(rows)
    (out / "summary.md").write_text(table)
    print(table)
    plots.plot_extrapolation(rows, bucket_rows, out / "extrapolation.png",
                             title="validation bpb beyond the training length (mean, band min-max over seeds)")
    print(f"wrote {out / 'summary.md'}, {out / 'extrapolation.csv'}, {out / 'buckets.csv'}, "
          f"{out / 'extrapolation.png'}")
    return rows


def _shown_path(path: Path) -> str:
    """The checkpoint as recorded in results: relative to the working directory when under it, so committed
    results do not carry one machine's absolute paths."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _extrapolation_markdown(rows: list[dict]) -> str:
    """Validation bpb (mean ± std over seeds) per variant and training length (rows) at each evaluation length
    (columns)."""
    lengths = sorted({r["eval_length"] for r in rows})
    lines = ["| variant | trained at | seeds | " + " | ".join(f"bpb at {m}" for m in lengths) + " |",
             "|---|---|---|" + "---|" * len(lengths)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for n in sorted({r["train_length"] for r in rows if r["variant"] == variant}):
            cells, seeds = [], set()
            for m in lengths:
                group = [r for r in rows if r["variant"] == variant and r["train_length"] == n
                         and r["eval_length"] == m]
                seeds |= {r["seed"] for r in group}
                s = plots.finite_stats([r["bpb"] for r in group])
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if group else "—")
            lines.append(f"| {variant} | {n} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
