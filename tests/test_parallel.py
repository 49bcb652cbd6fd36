"""Sequence parallelism (``group=``): 2 gloo ranks spawned by the test, each holding a slice of one sequence,
against the single-process call on the whole sequence (outputs, gradients of q, k, v, states, the layer)."""

from __future__ import annotations

import datetime
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks

from linrope import LinearRotaryAttention, RotaryEmbedding, SoftmaxAttention
from linrope.features import favor_plus, gaussian_orthogonal_matrix
from linrope.functional import favor_attention, linear_attention

WORLD = 2
B, H, D, R, DV = 2, 2, 16, 32, 8

# name -> (function, causal, rope pairing ('interleaved', 'half' or None), slice lengths, dtype, extras)
CASES = {
    "favor-causal-rope-uneven": dict(fn="favor", causal=True, rope="interleaved", lengths=(40, 88)),
    "favor-causal-rope-float64": dict(fn="favor", causal=True, rope="interleaved", lengths=(72, 56),
                                      dtype=torch.float64),
    "favor-causal-norope-even": dict(fn="favor", causal=True, rope=None, lengths=(64, 64)),
    "favor-causal-halfsplit-holes": dict(fn="favor", causal=True, rope="half", lengths=(48, 80), mask="holes"),
    "favor-causal-large-activations": dict(fn="favor", causal=True, rope="interleaved", lengths=(60, 68), std=3.0),
    "favor-causal-stream": dict(fn="favor", causal=True, rope="interleaved", lengths=(30, 50), initial=37),
    "favor-causal-decay-stream": dict(fn="favor", causal=True, rope="interleaved", lengths=(33, 47), initial=21,
                                      decay=(0.8, 0.97)),
    "features-causal-decay-holes": dict(fn="features", causal=True, rope="half", lengths=(41, 39), mask="holes",
                                        decay=(0.9, 0.5)),
    "favor-bidir-rope-uneven": dict(fn="favor", causal=False, rope="interleaved", lengths=(50, 78)),
    "favor-bidir-rank-padded": dict(fn="favor", causal=False, rope="interleaved", lengths=(64, 40),
                                    mask="second-rank"),
    "features-causal-rope-holes": dict(fn="features", causal=True, rope="interleaved", lengths=(45, 83),
                                       mask="holes"),
    "features-bidir-halfsplit": dict(fn="features", causal=False, rope="half", lengths=(70, 58)),
    "features-causal-gates-stream": dict(fn="features", causal=True, rope="interleaved", lengths=(37, 43), initial=19,
                                         gates=True, decay=(0.95, 0.9)),
    "favor-causal-positions-per-example": dict(fn="favor", causal=True, rope="interleaved", lengths=(52, 76),
                                               positions="per-example"),
}
LAYERS = {
    "layer-features": dict(rope="features"),
    "layer-inputs": dict(rope="inputs"),
    "layer-gqa": dict(rope="features", kv_heads=1),
    "layer-gqa-multiscale": dict(rope="features", kv_heads=2, decay="multiscale"),  # per-query-head states
    "layer-gated-gqa": dict(rope="features", kv_heads=2, gate=True),
}
DECODE = 3  # tokens decoded after the parallel prefill


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _data(name: str, case: dict, N: int):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same on every rank
    dt, std = case.get("dtype", torch.float32), case.get("std", 1.0)
    x = {n: torch.randn(B, H, N, D, generator=g, dtype=dt) * std for n in ("q", "k")}
    x["v"] = torch.randn(B, H, N, DV, generator=g, dtype=dt)
    x["w"] = torch.randn(B, H, N, DV, generator=g, dtype=dt)  # the loss is (out * w).sum()
    x["W"] = gaussian_orthogonal_matrix(R, D, generator=g).to(dt)
    mask = None
    if case.get("mask") == "holes":
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[:, 0] = True
    elif case.get("mask") == "second-rank":  # example 1 has no key at all on rank 1
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, case["lengths"][0]:] = False
    x["mask"] = mask
    x["positions"] = (torch.randint(0, 3 * N, (B, N), generator=g) if case.get("positions") == "per-example"
                      else None)
    x["log_gates"] = -0.3 * torch.rand(B, H, N, generator=g, dtype=dt) if case.get("gates") else None
    return x


def _names(x) -> tuple:
    return ("q", "k", "v") + (("log_gates",) if x["log_gates"] is not None else ())


def _call(case, x, sl, group, rotary, state=None, return_state=False):
    """The case's function on positions ``sl`` of the data (all of them in one process)."""
    kw = dict(causal=case["causal"], rotary=rotary, chunk_size=16, group_size=32, group=group,
              key_padding_mask=None if x["mask"] is None else x["mask"][:, sl],
              positions=None if x["positions"] is None else x["positions"][:, sl],
              initial_state=state, return_state=return_state, decay=case.get("decay"))
    if x["log_gates"] is not None:
        kw["log_gates"] = x["log_gates"][:, :, sl]
    q, k, v = (x[n][:, :, sl] for n in ("q", "k", "v"))
    if case["fn"] == "favor":
        return favor_attention(q, k, v, x["W"], **kw)
    qf, _ = favor_plus(q, x["W"], is_query=True)
    kf, ks = favor_plus(k, x["W"], is_query=False)
    return linear_attention(qf, kf, v, k_logscale=ks, **kw)


def _run_case(name: str, case: dict, rank: int) -> dict:
    lengths = case["lengths"]
    initial = case.get("initial", 0)
    N = initial + sum(lengths)
    x = _data(name, case, N)
    rope = case["rope"]
    rotary = None if rope is None else RotaryEmbedding(R, interleaved=rope == "interleaved")
    stream = initial > 0
    # one process: the prefix (if any) streamed in, then the rest, as the reference
    for n in _names(x):
        x[n].requires_grad_(True)
    state = None
    if stream:
        _, state = _call(case, x, slice(0, initial), None, rotary, return_state=True)
        state = state.detach()
    ref = _call(case, x, slice(initial, N), None, rotary, state=state, return_state=stream)
    ref_out, ref_state = ref if stream else (ref, None)
    (ref_out * x["w"][:, :, initial:]).sum().backward()
    ref_grads = {n: x[n].grad[:, :, initial:].clone() for n in _names(x)}
    for n in _names(x):
        x[n].grad = None
    # this rank's slice
    a = initial + sum(lengths[:rank])
    sl = slice(a, a + lengths[rank])
    res = _call(case, x, sl, dist.group.WORLD, rotary, state=state, return_state=stream)
    out, st = res if stream else (res, None)
    (out * x["w"][:, :, sl]).sum().backward()
    local = slice(a - initial, a - initial + lengths[rank])
    errs = {"out": _rel(out, ref_out[:, :, local])}
    for n in _names(x):
        errs["d" + n] = _rel(x[n].grad[:, :, sl], ref_grads[n][:, :, local])
    if stream:
        errs["state.numerator"] = _rel(st.numerator, ref_state.numerator)
        errs["state.key_sum"] = _rel(st.key_sum, ref_state.key_sum)
        errs["state.log_ref"] = _rel(st.log_ref, ref_state.log_ref)
        errs["state.offset"] = float(st.offset != ref_state.offset)
    return errs


def _run_layer(kw: dict, rank: int) -> dict:
    torch.manual_seed(0)
    dim, lengths = 32, (44, 84)
    N = sum(lengths)
    single = LinearRotaryAttention(dim, heads=4, nb_features=R, causal=True, chunk_size=16, seed=3, **kw)
    par = LinearRotaryAttention(dim, heads=4, nb_features=R, causal=True, chunk_size=16, seed=3,
                                group=dist.group.WORLD, **kw)
    par.load_state_dict(single.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N + DECODE, dim, generator=g)
    w = torch.randn(2, N, dim, generator=g)
    xs = x[:, :N].clone().requires_grad_(True)
    ref = single(xs)
    (ref * w).sum().backward()
    full = single(x)  # the decoded tokens' reference: one pass over prefill and decoded tokens
    a = sum(lengths[:rank])
    sl = slice(a, a + lengths[rank])
    xp = x[:, sl].clone().requires_grad_(True)
    out, state = par(xp, return_state=True)
    (out * w[:, sl]).sum().backward()
    errs = {"out": _rel(out, ref[:, sl]), "dx": _rel(xp.grad, xs.grad[:, sl])}
    for name, p in par.named_parameters():  # a parameter's gradient is the sum of the ranks' (DDP would do it)
        grad = p.grad.clone()
        dist.all_reduce(grad)
        errs["d" + name] = _rel(grad, dict(single.named_parameters())[name].grad)
    par.group = None  # decode on one process from the state after the whole sequence
    with torch.no_grad():
        for t in range(DECODE):
            y, state = par(x[:, N + t:N + t + 1], state=state, return_state=True)
            errs[f"decode{t}"] = _rel(y, full[:, N + t:N + t + 1])
    return errs


def _mismatch(rank: int) -> str:
    """Ranks that disagree (here on r) get a clear error on every rank, not a hang."""
    x = torch.randn(1, 1, 8, D)
    try:
        favor_attention(x, x, x, gaussian_orthogonal_matrix(R + 2 * rank, D), causal=True, group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return "no error"


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = _run_case(name, case, rank)
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[name] = traceback.format_exc()
    for name, kw in LAYERS.items():
        try:
            results[name] = _run_layer(kw, rank)
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc()
    results["mismatch"] = _mismatch(rank)
    torch.save(results, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    run_ranks(_worker, (str(tmp / "init"), str(tmp / "out")), WORLD, timeout=240)
    return [torch.load(tmp / f"out.{r}") for r in range(WORLD)]


def _check(results, name, tol):
    for rank, res in enumerate(results):
        r = res[name]
        assert isinstance(r, dict), f"rank {rank} failed:\n{r}"
        bad = {k: v for k, v in r.items() if not v <= tol}
        assert not bad, f"rank {rank}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("name", list(CASES))
def test_functions_match_one_process(ranks, name):
    _check(ranks, name, 1e-12 if CASES[name].get("dtype") == torch.float64 else 1e-5)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_one_process_and_decodes_after(ranks, name):
    _check(ranks, name, 1e-5)


def test_ranks_that_disagree_raise_on_every_rank(ranks):
    for res in ranks:
        assert "ranks differ in r" in res["mismatch"], res["mismatch"]


def test_group_errors_without_spawning():
    x = torch.randn(1, 1, 8, D)
    W = gaussian_orthogonal_matrix(R, D)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        favor_attention(x, x, x, W, causal=True, group=object())
    with pytest.raises(ValueError, match="cu_seqlens: expected group=None"):
        favor_attention(x, x, x, W, causal=True, group=object(), cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="group: expected self-attention"):
        favor_attention(x, torch.randn(1, 1, 5, D), torch.randn(1, 1, 5, D), W, group=object())
    with pytest.raises(ValueError, match="group: expected None: SoftmaxAttention"):
        SoftmaxAttention(32, heads=2, group=object())

