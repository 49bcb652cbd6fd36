"""Training, evaluation and checkpoints for ``lab.models.ByteLM`` on any task of ``lab.data``.

``train(model_config, train_config, task, run_dir)`` writes to ``run_dir``:

* ``config.json``: model, training and task configs, world size, torch/Python versions, git commit;
* ``metrics.jsonl``: one row per log interval (``split='train'``: mean loss over the interval, lr, cumulative
  count of skipped steps) and per evaluation (``split='val'``: loss in nats per target, bits per byte, accuracy);
* ``ckpt.pt``: model, optimizer, step, configs, the interval accumulators and every RNG state of every rank
  (torch, CUDA, Python, the data generator), so ``resume=True`` continues with no lost or repeated step and the
  same loss curve as an uninterrupted run;
* ``result.json`` once the run has finished.

A step whose loss or gradient is not finite is skipped (no optimizer update) and counted, so an unstable
variant (``linear-rope-rotden``) finishes its run and reports how often it blew up instead of crashing.
Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA); every rank
builds the same model and feature projections from the same seeds, and draws its own data.

Sequence parallelism (``TrainConfig.sequence_parallel = P`` > 1, linear variants only): the world's ranks form
world/P data-parallel replicas of P consecutive ranks; the P ranks of a replica draw the same windows and each
holds a contiguous 1/P of every window's positions (``sequence_slice``), its attention layers exchanging states
over the replica's group (``ByteLM(group=...)``). Each rank's loss is its tokens' loss sum over the replica's
token count, times P: DDP averages gradients over all world ranks, and a rank's parameter gradient is its share
of its replica's, so the average over the world is the mean over replicas of each replica's whole-sequence
gradient, as in one process. Logged and validation losses are means over every token of every rank.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from linrope import LinearRotaryAttention
from linrope.features import redraw_projections
from linrope.rotary import LearnedRotary

from .checks import check_int, check_number, is_int
from .data import IGNORE
from .models import ByteLM, ModelConfig, sequence_parallel_refusal
from .profiling import machine

__all__ = ["TrainConfig", "train", "evaluate", "position_losses", "load_checkpoint", "load_model", "read_metrics",
           "lr_at", "position_parameters", "distributed_context", "leave_distributed", "sequence_parallel_group", "sequence_slice"]


@dataclass
class TrainConfig:
    steps: int = 400              # optimizer steps
    batch_size: int = 8           # sequences per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1           # micro-batches per step on each rank
    sequence_parallel: int = 1    # ranks holding one sequence (each a contiguous 1/P of it); a divisor of the world
    lr: float = 1e-3              # peak learning rate (AdamW)
    position_lr: float | None = None  # peak learning rate of learned rotations and gates (None: lr), same schedule
    gate_lr: float | None = None      # the gates' and clocks' own peak rate, apart from the rotations (None: as above)
    warmup: int = 50              # linear warmup steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1     # 1.0 keeps the learning rate constant after warmup
    weight_decay: float = 0.1     # on matrices only (embeddings and linear weights), not on norms or biases
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0        # max global gradient norm (0: no clipping)
    log_interval: int = 10        # steps between train-loss rows
    eval_interval: int = 50       # steps between validation rows (and at the last step)
    ckpt_interval: int = 100      # steps between checkpoints (and at the last step)
    seed: int = 0                 # model init (torch.manual_seed) and data stream (with the rank)
    device: str = "cpu"           # 'cpu', 'cuda' or 'cuda:N' (under torchrun: the local rank's GPU)
    amp: bool = False             # bfloat16 autocast on CUDA; ignored on CPU

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "sequence_parallel", "log_interval", "eval_interval",
                     "ckpt_interval"):
            check_int(name, getattr(self, name))
        for name in ("position_lr", "gate_lr"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), lambda v: v > 0, "None or a number > 0")
        checks = (("lr", "a number > 0", lambda v: v > 0),
                  ("min_lr_ratio", "a number in [0, 1]", lambda v: 0 <= v <= 1),
                  ("warmup", "an integer >= 0", lambda v: is_int(v) and v >= 0),
                  ("weight_decay", "a number >= 0", lambda v: v >= 0), ("grad_clip", "a number >= 0", lambda v: v >= 0))
        for name, expected, ok in checks:
            check_number(name, getattr(self, name), ok, expected)
        self.betas = tuple(self.betas)


def decay_groups(model: nn.Module) -> tuple[list, list]:
    """(parameters that weight decay applies to, the rest): matrices (embeddings, linear weights) decay; norms,
    biases and learned rotations do not: frequencies and phases are angles, and pulling them towards 0 would
    slow the rotations towards the band that carries no position."""
    angles = {id(p) for m in model.modules() if isinstance(m, LearnedRotary) for p in m.parameters()}
    params = list(model.parameters())
    return ([p for p in params if p.dim() >= 2 and id(p) not in angles],
            [p for p in params if p.dim() < 2 or id(p) in angles])


def position_parameters(model: nn.Module) -> list:
    """The learned rotations' frequencies and phases, then ``signal_parameters`` (``TrainConfig.position_lr``)."""
    found = [p for m in model.modules() if isinstance(m, LearnedRotary) for p in m.parameters()]
    return found + signal_parameters(model)


def signal_parameters(model: nn.Module) -> list:
    """The gates' and the selective clocks' projections (``TrainConfig.gate_lr``)."""
    found = [p for m in model.modules() if isinstance(m, LinearRotaryAttention) and m.gate
             for p in m.gate_proj.parameters()]
    found += [p for m in model.modules() if isinstance(m, LinearRotaryAttention) and m.selective
              for p in m.clock_proj.parameters()]
    return found


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW's groups: matrices with weight decay, the rest without (``decay_groups``); the rotations and signals
    at ``cfg.position_lr`` and the signals at ``cfg.gate_lr`` in groups of their own (no weight decay), their
    rate a multiple ``lr_scale`` of the schedule's."""
    own, taken = [], set()
    # the signals first, so that gate_lr takes them from position_lr's group
    for params, lr in ((signal_parameters(model), cfg.gate_lr), (position_parameters(model), cfg.position_lr)):
        if lr is not None:
            params = [p for p in params if id(p) not in taken]
            taken |= {id(p) for p in params}
            own.append({"params": params, "weight_decay": 0.0, "lr_scale": lr / cfg.lr})
    decay, no_decay = decay_groups(model)
    return [{"params": [p for p in params if id(p) not in taken], "weight_decay": wd}
            for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))] + own


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) step ``step``: linear warmup, then cosine to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def distributed_context(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group on first call: nccl
    for CUDA, gloo for CPU, and splits the CPU cores between the local ranks so they do not oversubscribe."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world == 1:
        return 0, 1, dev
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


_SP_GROUPS: dict = {}  # P -> (the default group it was made in, this rank's group of P)


def sequence_parallel_group(size: int):
    """This rank's sequence-parallel group: the world's ranks in consecutive blocks of ``size`` (ranks 0..P-1,
    P..2P-1, ...); None for ``size`` 1. Made once per size and world (every rank creates every block's group, in
    the same order, as ``torch.distributed.new_group`` requires), so call it on every rank alike."""
    size = check_int("sequence_parallel", size)
    if size == 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % size:
        raise ValueError(f"sequence_parallel: expected a divisor of the world size {world} (ranks per sequence), "
                         f"got {size}")
    made = _SP_GROUPS.get(size)
    if made is None or made[0] is not dist.group.WORLD:  # none yet, or made before the process group was re-made
        rank, mine = dist.get_rank(), None
        for start in range(0, world, size):
            g = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                mine = g
        made = _SP_GROUPS[size] = (dist.group.WORLD, mine)
    return made[1]


def sequence_slice(n: int, size: int, index: int) -> slice:
    """The positions of a length-``n`` sequence held by rank ``index`` of ``size``: contiguous, in rank order,
    the first ``n % size`` ranks one longer."""
    base, extra = divmod(n, size)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def _layout(group) -> tuple[int, int, int, int | None]:
    """(data-parallel replica of this rank, replicas, ranks per sequence P, this rank's index within its
    sequence's P ranks or None) for a model run with sequence-parallel ``group`` (None: plain data parallelism)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if group is None:
        return rank, world, 1, None
    size = dist.get_world_size(group)
    first = rank // size * size
    if dist.get_process_group_ranks(group) != list(range(first, first + size)):
        raise ValueError(f"group: expected the consecutive ranks {first}..{first + size - 1} "
                         f"(sequence_parallel_group), got {dist.get_process_group_ranks(group)}")
    return rank // size, world // size, size, dist.get_rank(group)


def leave_distributed() -> None:
    """End of a torchrun job: free the finished DDP wrappers, wait for every rank (rank 0 may still be writing
    tables and plots), then leave the process group. Without it a gloo rank sometimes aborts at exit ("terminate
    called without an active exception", 3 of 18 two-rank runs on a loaded CPU): DDP wrappers kept alive by
    reference cycles were torn down with the interpreter, after the group."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def _slice_loss(logits: Tensor, y: Tensor, group) -> Tensor:
    """This rank's share of the mean loss of the sequences split across ``group``: its targets' loss sum over
    the scored targets of the whole group (summed over the ranks, the loss of one process on the whole)."""
    total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    count = (y != IGNORE).sum().to(total.dtype)
    dist.all_reduce(count, group=group)
    return total / count


@torch.no_grad()
def evaluate(model: ByteLM, x: Tensor, y: Tensor, *, batch_size: int = 8, amp: bool = False) -> dict:
    """Loss (nats per scored target), bits per byte (= loss / ln 2 for byte targets) and accuracy of ``model`` on
    x, y (W, N). Under DDP each rank scores its share of the W rows and the sums are all-reduced; with sequence
    parallelism (``model.group``) each data-parallel replica scores its share of the rows, each of its ranks its
    slice of their positions."""
    replica, replicas, size, index = _layout(getattr(model, "group", None))
    cols = slice(None) if index is None else sequence_slice(x.shape[1], size, index)
    world = replicas * size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i in range(replica * batch_size, x.shape[0], replicas * batch_size):
        xb, yb = x[i:i + batch_size, cols].to(device), y[i:i + batch_size, cols].to(device)
        with _autocast(device, amp):
            logits = model(xb).float()
        keep = yb != IGNORE
        sums[0] += F.cross_entropy(logits[keep], yb[keep], reduction="sum").double()
        sums[1] += (logits.argmax(-1) == yb)[keep].sum()
        sums[2] += keep.sum()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, correct, count = sums.tolist()
    return {"loss": loss / count, "bpb": loss / count / math.log(2), "accuracy": correct / count}


@torch.no_grad()
def position_losses(model: ByteLM, x: Tensor, y: Tensor, *, batch_size: int = 4, amp: bool = False,
                    attention_rms: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mean loss in nats at each position (N,) over the rows of x, y (W, N) (NaN where nothing is scored).

    ``attention_rms``: also return the RMS of each block's attention output (what the block adds to the residual
    stream) at each position, over the rows and the model dimension: (n_layer, N). Linear attention averages
    over ever more keys as the position grows; an output that shrinks with position is attention dilution.
    """
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    count = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(len(model.blocks), x.shape[1], dtype=torch.float64)
    hooks = []
    if attention_rms:
        def record(i):
            def hook(module, args, out) -> None:  # returns None: the output passes on unchanged
                squares[i].add_(out.detach().double().square().mean(-1).sum(0).cpu())
            return hook
        hooks = [b.attn.register_forward_hook(record(i)) for i, b in enumerate(model.blocks)]
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            with _autocast(device, amp):
                logits = model(xb).float()
            per = F.cross_entropy(logits.transpose(1, 2), yb, ignore_index=IGNORE, reduction="none")  # (b, N)
            total += per.double().sum(0).cpu()
            count += (yb != IGNORE).double().sum(0).cpu()
    finally:
        for h in hooks:
            h.remove()
    if attention_rms:
        return total / count, (squares / x.shape[0]).sqrt()
    return total / count


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "data": generator.get_state()}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    generator.set_state(state["data"])


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict written by ``train`` (on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected a checkpoint file, found none at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(path: str | Path, device: str = "cpu") -> tuple[ByteLM, dict]:
    """Rebuild the model of a checkpoint (its weights, feature projections and redraw counters) in eval mode."""
    ckpt = load_checkpoint(path)
    model = ByteLM(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_same(name: str, saved: dict, current: dict, ignore: tuple = ()) -> None:
    for key in sorted(set(saved) | set(current)):
        if key not in ignore and saved.get(key) != current.get(key):
            raise ValueError(f"resume: expected the same {name} as the checkpoint, but {key!r} differs "
                             f"({saved.get(key)!r} saved, {current.get(key)!r} now); use another output directory "
                             f"to start afresh")


def train(model_config: ModelConfig, cfg: TrainConfig, task, run_dir: str | Path, *, resume: bool = False,
          stop_after: int | None = None, progress: bool = True, desc: str = "") -> tuple[ByteLM, dict]:
    """Train a ``ByteLM`` on ``task`` (``LMTask`` or ``SyntheticTask``); return the model and the run's result.

    Args:
        model_config, cfg: the model and the training run.
        task: provides ``train_batch(batch_size, generator)``, ``val_batch()``, ``metric`` and ``describe()``.
        run_dir: where config, metrics and checkpoint go (created; without ``resume`` its metrics are reset).
        resume: continue from ``run_dir/ckpt.pt`` if it exists (configs must match, the device may differ).
        stop_after: stop (with a checkpoint) once this many steps are done, as if interrupted there.
        progress: show a tqdm bar (rank 0 only). desc: its label.

    Returns:
        (the trained model, unwrapped from DDP, in training mode; {"step", "val": last validation row, "skipped",
        "elapsed", "s_per_step", "params", "finished"}).
    """
    from tqdm.auto import tqdm

    rank, world, device = distributed_context(cfg.device)
    sp = cfg.sequence_parallel
    refusal = sequence_parallel_refusal(model_config.attention) if sp > 1 else None
    if refusal:
        raise ValueError(f"sequence_parallel: expected 1 for variant {model_config.attention!r} ({refusal}), "
                         f"got {sp}")
    if world % sp:
        raise ValueError(f"sequence_parallel: expected a divisor of the world size {world}, got {sp}")
    if task.length < sp:
        raise ValueError(f"sequence_parallel: expected at most the sequence length {task.length} ranks, got {sp}")
    sp_group = sequence_parallel_group(sp)
    replica, replicas, _, index = _layout(sp_group)
    if cfg.batch_size % (replicas * cfg.grad_accum):
        unit = "world size" if sp == 1 else f"data-parallel replicas (world size {world} / sequence_parallel {sp})"
        raise ValueError(f"batch_size: expected a multiple of {unit} x grad_accum = {replicas} x {cfg.grad_accum}, "
                         f"got {cfg.batch_size}")
    micro = cfg.batch_size // (replicas * cfg.grad_accum)
    cols = slice(None) if index is None else sequence_slice(task.length, sp, index)
    run_dir = Path(run_dir)
    ckpt_path, metrics_path = run_dir / "ckpt.pt", run_dir / "metrics.jsonl"
    torch.manual_seed(cfg.seed)
    model = ByteLM(model_config, group=sp_group).to(device)
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator().manual_seed(cfg.seed * 65_537 + replica + 1)  # each replica its own data stream
    step, skipped, elapsed, acc = 0, 0, 0.0, [0.0, 0]  # acc: interval loss sum, finite count
    config = {"model": model_config.to_dict(), "train": asdict(cfg), "task": task.describe(), "world_size": world}
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_same("model config", ckpt["model_config"], config["model"])
        saved = {**asdict(TrainConfig()), **ckpt["train_config"]}  # fields added since: their default then
        _check_same("training config", saved, config["train"], ignore=("device",))
        if len(ckpt["rng"]) != world:
            raise ValueError(f"resume: expected a checkpoint written by {world} ranks (the world size now), got one "
                             f"written by {len(ckpt['rng'])}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, skipped, elapsed, acc = ckpt["step"], ckpt["skipped"], ckpt["elapsed"], ckpt["interval"]
        _set_rng_state(ckpt["rng"][rank], gen)
    master = rank == 0
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_metrics(run_dir) if r["step"] <= step] if step else []  # drop rows past the ckpt
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "result.json").unlink(missing_ok=True)
        info = {**config, "torch": torch.__version__, "python": platform.python_version(), "git": _git_commit(),
                "params": model.num_params(), "machine": machine()}
        (run_dir / "config.json").write_text(json.dumps(info, indent=2))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    val_x, val_y = task.val_batch()

    def log(row: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint() -> None:
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, _rng_state(gen))
        else:
            rng = [_rng_state(gen)]
        if master:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "skipped": skipped,
                     "elapsed": elapsed, "interval": acc, "model_config": config["model"],
                     "train_config": config["train"], "task": config["task"], "rng": rng}
            torch.save(state, run_dir / "ckpt.tmp")
            os.replace(run_dir / "ckpt.tmp", ckpt_path)  # never leave a half-written checkpoint behind
        if world > 1:
            dist.barrier()  # no rank may go on (e.g. resume from it) before the checkpoint is on disk

    if step == 0:
        log({"step": 0, "split": "val", **evaluate(model, val_x, val_y, amp=cfg.amp), "elapsed": 0.0})
    last_val = None
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not (progress and master), leave=False,
               dynamic_ncols=True)
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=device)
        for i in range(cfg.grad_accum):
            x, y = task.train_batch(micro, gen)
            # DDP all-reduces gradients on the last micro-batch only
            with ddp.no_sync() if world > 1 and i < cfg.grad_accum - 1 else nullcontext():
                with _autocast(device, cfg.amp):
                    if sp_group is None:
                        loss = _loss(ddp(x.to(device)), y.to(device)) / cfg.grad_accum
                        shown = loss
                    else:  # this rank's share of its replica's loss; x P: DDP averages over all P x replicas ranks
                        logits = ddp(x[:, cols].to(device))
                        shown = _slice_loss(logits, y[:, cols].to(device), sp_group) / cfg.grad_accum
                        loss = shown * sp
                loss.backward()  # always, even when non-finite: every DDP rank must join the gradient all-reduce
            loss_sum += shown.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        if world > 1:
            dist.all_reduce(loss_sum)  # the replicas' losses (each the sum of its ranks' shares)
            loss_sum /= replicas
        if torch.isfinite(norm) and torch.isfinite(loss_sum):  # gradients are all-reduced: all ranks agree
            opt.step()
        else:
            skipped += 1
        opt.zero_grad(set_to_none=True)
        step += 1
        redraw_projections(model, step)  # between optimizer steps: every micro-batch of a step saw one projection
        value = float(loss_sum)
        if math.isfinite(value):
            acc = [acc[0] + value, acc[1] + 1]
        elapsed += time.perf_counter() - t0
        bar.update(1)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            mean = acc[0] / acc[1] if acc[1] else float("nan")
            log({"step": step, "split": "train", "loss": mean, "lr": lr, "skipped": skipped,
                 "tokens": step * cfg.batch_size * task.length, "elapsed": round(elapsed, 3)})
            bar.set_postfix(loss=f"{mean:.3f}", skipped=skipped)
            acc = [0.0, 0]
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            last_val = {"step": step, "split": "val", **evaluate(model, val_x, val_y, amp=cfg.amp),
                        "skipped": skipped, "elapsed": round(elapsed, 3)}
            log(last_val)
            bar.set_postfix(loss=f"{value:.3f}", val=f"{last_val[task.metric]:.3f}", skipped=skipped)
        if step % cfg.ckpt_interval == 0 or step == end:
            checkpoint()
    bar.close()
    if last_val is None:
        last_val = next((r for r in reversed(read_metrics(run_dir)) if r["split"] == "val"), None) if master else None
    result = {"step": step, "val": last_val, "skipped": skipped, "elapsed": round(elapsed, 3),
              "s_per_step": elapsed / max(step, 1), "params": model.num_params(), "finished": step >= cfg.steps}
    if master and result["finished"]:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return model, result
