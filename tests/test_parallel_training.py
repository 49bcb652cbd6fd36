"""Sequence parallelism in the training loop (``TrainConfig.sequence_parallel``) and its memory profile: gloo
ranks spawned by the test train a tiny ``ByteLM`` with every sequence split across them, against one process."""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

from lab import parallel_profile, profiling
from lab.data import SyntheticTask
from lab.models import ByteLM, ModelConfig
from lab.sweeps import Preset, run_long_context
from lab.train import TrainConfig, leave_distributed, read_metrics, sequence_slice, train

MODEL = dict(n_layer=2, dim=32, heads=2, nb_features=16, chunk_size=8, redraw_interval=2)
# lr 5e-4: Adam's first steps move an entry by about lr whatever its gradient's size, so float noise in a
# gradient entry near AdamW's eps moves it by up to ~lr/2; the gradients' scale, to which Adam is blind, is
# checked through the global gradient norm of every step
TRAIN = dict(steps=3, batch_size=4, grad_accum=2, lr=5e-4, warmup=1, log_interval=1, eval_interval=3,
             ckpt_interval=100)
# RoPE (the layers find their global positions), learned absolute positions (the model's global offset),
# sinusoidal ones and RetNet's decay; a redraw after step 2
VARIANTS = ("linear-rope", "linear-learned", "linear-abs", "linear-rope-decay")
LENGTH = 45  # odd: uneven slices (23 + 22); lookback leaves the first DISTANCE targets unscored (rank 0 only)
DISTANCE = 5
TOL = 1e-5


def _task():
    return SyntheticTask("lookback", LENGTH, eval_windows=6, distance=DISTANCE, symbols=8)


class _Replicas:
    """One process's view of ``replicas`` data-parallel replicas: each step's batch is the replicas' draws (each
    from its own stream, seeded as ``train`` seeds replica r's) side by side."""

    def __init__(self, task, seed: int, replicas: int):
        self.task, self.length, self.metric = task, task.length, task.metric
        self.gens = [torch.Generator().manual_seed(seed * 65_537 + r + 1) for r in range(replicas)]

    def describe(self):
        return self.task.describe()

    def val_batch(self):
        return self.task.val_batch()

    def train_batch(self, batch_size, generator):
        parts = [self.task.train_batch(batch_size // len(self.gens), g) for g in self.gens]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


_CLIP = torch.nn.utils.clip_grad_norm_


def _recording(norms: list):
    """``clip_grad_norm_`` that also appends each step's gradient norm (taken after DDP's reduction) to norms."""
    def clip(*args, **kwargs):
        norm = _CLIP(*args, **kwargs)
        norms.append(float(norm))
        return norm
    return clip


def _worker(rank: int, world: int, sp: int, init_file: str, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    variants = VARIANTS if world == 2 else VARIANTS[:1]
    train_cfg = TRAIN if world == 2 else dict(TRAIN, grad_accum=1)
    for variant in variants:
        norms = []
        torch.nn.utils.clip_grad_norm_ = _recording(norms)
        try:
            model, _ = train(ModelConfig(attention=variant, **MODEL),
                             TrainConfig(**train_cfg, sequence_parallel=sp), _task(), f"{out}/{variant}",
                             progress=False)
            results[variant] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "norms": norms,
                                "metrics": read_metrics(f"{out}/{variant}") if rank == 0 else None}
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[variant] = traceback.format_exc()
    try:  # softmax variants refuse sequence parallelism, on every rank, before anything trains
        run_long_context(Preset(("linear-rope", "softmax-rope", "linear-rope-learned"), (LENGTH,), (0,), 64, 64,
                                MODEL, TRAIN),
                         sequence_parallel=0, out=f"{out}/lc", progress=False)
        results["softmax"] = "no error"
    except ValueError as e:
        results["softmax"] = str(e)
    torch.save(results, f"{out}/rank{rank}.pt")
    leave_distributed()


def _spawn(tmp, world: int, sp: int) -> list[dict]:
    run_ranks(_worker, (world, sp, str(tmp / "init"), str(tmp)), world, timeout=180)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("sp2"), 2, 2)


def _close(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def _check_ranks(ranks, variant):
    for rank, res in enumerate(ranks):
        assert isinstance(res[variant], dict), f"rank {rank} failed:\n{res[variant]}"
    states = [res[variant]["state"] for res in ranks]
    assert all(_close(s, states[0]) == 0 for s in states)  # every rank holds the same parameters and projections
    assert all(res[variant]["norms"] == ranks[0][variant]["norms"] for res in ranks)
    return states[0], ranks[0][variant]["metrics"], ranks[0][variant]["norms"]


def _same_norms(norms: list, ref: list) -> None:
    assert len(norms) == len(ref) == TRAIN["steps"]
    assert max(abs(a / b - 1) for a, b in zip(norms, ref)) <= TOL, (norms, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_sequence_parallel_ranks_train_like_one_process(two_ranks, variant, tmp_path, monkeypatch):
    state, metrics, norms = _check_ranks(two_ranks, variant)
    ref_norms = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", _recording(ref_norms))
    model, _ = train(ModelConfig(attention=variant, **MODEL), TrainConfig(**TRAIN), _task(), tmp_path,
                     progress=False)
    _same_norms(norms, ref_norms)  # the reduced gradient's scale: partial gradients summed, not averaged
    ref = model.state_dict()
    assert int(ref["blocks.0.attn.feature_map.redraws"]) == 1  # a redraw happened, identically on the ranks
    assert _close(state, ref) <= TOL
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in metrics] == [(r["step"], r["split"]) for r in rows]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(metrics, rows)) <= TOL  # train and validation rows
    assert max(abs(a.get("accuracy", 0) - b.get("accuracy", 0)) for a, b in zip(metrics, rows)) <= TOL


def test_softmax_and_learned_rotations_refuse_sequence_parallelism(two_ranks):
    for res in two_ranks:  # named before anything trains (linear-rope comes first in the grid)
        assert res["softmax"].startswith("variants: no sequence-parallel path for 'softmax-rope': softmax attention "
                                         "(every rank would need every key and value: ring attention, not "
                                         "implemented); 'linear-rope-learned': learned rotations"), res["softmax"]
    with pytest.raises(ValueError, match="group: variant 'softmax-t5' has no sequence-parallel path: softmax"):
        ByteLM(ModelConfig(attention="softmax-t5", **MODEL), group=object())
    with pytest.raises(ValueError, match="sequence_parallel: expected 1 for variant 'linear-rope-learned' "
                                         r"\(learned rotations"):
        train(ModelConfig(attention="linear-rope-learned", **MODEL), TrainConfig(**TRAIN, sequence_parallel=2),
              _task(), "/nonexistent")
    with pytest.raises(ValueError, match="sequence_parallel: expected a divisor of the world size 1, got 2"):
        train(ModelConfig(**MODEL), TrainConfig(**TRAIN, sequence_parallel=2), _task(), "/nonexistent")


def test_sequence_slices_cover_the_sequence_in_rank_order():
    for n, p in ((45, 2), (7, 3), (8, 4), (3, 3)):
        slices = [sequence_slice(n, p, i) for i in range(p)]
        assert [s.start for s in slices] == [0] + [s.stop for s in slices[:-1]] and slices[-1].stop == n
        assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1


def test_two_replicas_of_two_sequence_parallel_ranks_train_like_one_process(tmp_path, monkeypatch):
    """Both axes: 2 data-parallel replicas x 2 ranks per sequence against one process seeing both replicas'
    windows in one batch."""
    (tmp_path / "ranks").mkdir()
    ranks = _spawn(tmp_path / "ranks", 4, 2)
    state, metrics, norms = _check_ranks(ranks, VARIANTS[0])
    cfg = TrainConfig(**dict(TRAIN, grad_accum=1))
    ref_norms = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", _recording(ref_norms))
    model, _ = train(ModelConfig(attention=VARIANTS[0], **MODEL), cfg, _Replicas(_task(), cfg.seed, 2),
                     tmp_path / "one", progress=False)
    _same_norms(norms, ref_norms)
    assert _close(state, model.state_dict()) <= TOL
    rows = read_metrics(tmp_path / "one")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(metrics, rows)) <= TOL


def test_memory_profile_path_at_tiny_n(tmp_path):
    """The sequence-parallel memory profile end to end at N = 64 (2 gloo ranks, one pass), and its tables."""
    shape = dict(b=1, h=2, d=8, r=16, causal=True, mode="fwd+bwd", backward=True)
    one = profiling.measure(parallel_profile.case_sequence_parallel(64, ranks=1, **shape), warmup=0, repeats=1,
                            case=parallel_profile.CASE, params=dict(shape, n=64, ranks=1))
    two = profiling.run_point(parallel_profile.CASE, dict(shape, n=64, ranks=2), warmup=0, repeats=1, threads=1,
                              memory=False, runner=parallel_profile.RUNNER, timeout=120)
    assert two.status == "ok" and two.seconds > 0 and two.peak_mib >= 0, two.status
    rows = parallel_profile.write_sequence_parallel_profile([one, two], str(tmp_path))
    assert [(r["mode"], r["ranks"], r["n"]) for r in rows] == [("fwd+bwd", 1, 64), ("fwd+bwd", 2, 64)]
    assert [(r["n"], r["ranks"]) for r in parallel_profile.ratios([one, two])] == [(64, 2)]
    for name in ("memory_sp.csv", "ratios.csv", "memory_sp.json", "memory_sp.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert parallel_profile.read_sequence_parallel_profile(str(tmp_path)) == [one, two]
