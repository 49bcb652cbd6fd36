"""A fuzz of the public functional API: random options, shapes (empty ones included), masks, non-finite
inputs, bad arguments and states passed between calls. Every draw must give either a clear error that names an
argument, or an output equal, row by row, to the float64 quadratic reference (``linrope.reference``)."""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linrope import AttentionState, RotaryEmbedding, favor_attention, linear_attention
from linrope.reference import favor_attention_naive, linear_attention_naive

# every test twice: the torch engine, and the compiled causal pass where it covers the call (conftest.py)
pytestmark = pytest.mark.usefixtures("engine_kernel")

ARGUMENTS = ("q", "k", "v", "qf", "kf", "projection", "positions", "key_padding_mask", "chunk_size", "group_size",
             "decay", "initial_state", "rotary", "k_logscale", "cu_seqlens", "return_state", "key_positions")
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw):
    c = dict(kind=draw(st.sampled_from(["favor", "features"])), causal=draw(st.booleans()),
             rope=draw(st.sampled_from([None, "interleaved", "half"])), B=draw(st.integers(0, 2)),
             H=draw(st.sampled_from([0, 1, 2, 3])), N=draw(st.integers(0, 40)), d=draw(st.sampled_from([4, 8])),
             r=draw(st.sampled_from([8, 16])), dv=draw(st.sampled_from([1, 5])),
             chunk=draw(st.sampled_from([1, 3, 4, 16])), per_group=draw(st.integers(1, 3)),
             mask=draw(st.sampled_from([None, "holes", "prefix", "none-kept"])),
             bad=draw(st.sampled_from([None, "key", "value", "padded"])),
             decay=draw(st.sampled_from([None, 0.9, (0.5, 0.9, 0.99)])), pieces=draw(st.integers(1, 3)),
             sigma=draw(st.floats(0.1, 2.0)), seed=draw(st.integers(0, 2**16)),
             wrong=draw(st.sampled_from([None] * 6 + ["positions", "chunk_size", "decay", "mask", "state"])))
    if c["B"] == 0 or c["H"] == 0:  # empty calls stay small
        c["N"] = min(c["N"], 3)
    return c


def make(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, N, d, r, dv = c["B"], c["H"], c["N"], c["d"], c["r"], c["dv"]
    q, k = (c["sigma"] * torch.randn(B, H, N, d, generator=gen) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=gen)
    W = torch.randn(r, d, generator=gen) / math.sqrt(d)
    mask = None
    if c["mask"] == "holes":
        mask = torch.rand(B, N, generator=gen) > 0.3
    elif c["mask"] == "prefix":
        mask = torch.arange(N).expand(B, N) >= N // 3
    elif c["mask"] == "none-kept":
        mask = torch.zeros(B, N, dtype=torch.bool)
    return q, k, v, W, mask


def attend(c, q, k, v, W, **kw):
    rot = None if c["rope"] is None else RotaryEmbedding(c["r"], interleaved=c["rope"] == "interleaved")
    common = dict(causal=c["causal"], rotary=rot, chunk_size=c["chunk"], group_size=c["chunk"] * c["per_group"], **kw)
    if c["kind"] == "favor":
        return favor_attention(q, k, v, W, **common)
    return linear_attention((q @ W.T).exp(), (k @ W.T).exp(), v, **common)


def reference(c, q, k, v, W, mask):
    rot = None if c["rope"] is None else RotaryEmbedding(c["r"], interleaved=c["rope"] == "interleaved")
    decay = None if c["decay"] is None else c["decay"] if isinstance(c["decay"], tuple) else (c["decay"],) * c["H"]
    kw = dict(causal=c["causal"], rotary=rot, key_padding_mask=mask, decay=decay)
    if c["kind"] == "favor":
        return favor_attention_naive(q.double(), k.double(), v.double(), W.double(), **kw)
    W = W.double()
    return linear_attention_naive((q.double() @ W.T).exp(), (k.double() @ W.T).exp(), v.double(), **kw)


def names_an_argument(err: Exception) -> bool:
    return bool(re.match(rf"({'|'.join(ARGUMENTS)})((, |/)({'|'.join(ARGUMENTS)}))*: ", str(err)))


@FUZZ
@given(c=cases())
def test_every_draw_is_a_clear_error_or_the_float64_reference_row_by_row(c):
    q, k, v, W, mask = make(c)
    kw = dict(key_padding_mask=mask)
    decay_ok = c["decay"] is None or (c["causal"] and (not isinstance(c["decay"], tuple) or len(c["decay"]) == c["H"]))
    if c["decay"] is not None:
        kw["decay"] = c["decay"]
    if c["wrong"] == "positions":
        kw["positions"] = torch.arange(c["N"] + 2)
    elif c["wrong"] == "chunk_size":
        c = {**c, "chunk": 0}
    elif c["wrong"] == "decay":
        kw["decay"] = True
    elif c["wrong"] == "mask":
        kw["key_padding_mask"] = torch.ones(c["B"], c["N"] + 1, dtype=torch.bool)
    elif c["wrong"] == "state":  # one feature too many
        B, H, r = c["B"], c["H"], c["r"]
        kw["initial_state"] = AttentionState(torch.zeros(B, H, r + 1, c["dv"]), torch.zeros(B, H, r + 1),
                                             torch.zeros(B, H), 0)
    seen = torch.ones(c["B"], c["H"], c["N"], dtype=torch.bool)  # rows that see the planted non-finite input
    b0, h0, p = 0, c["H"] - 1, c["N"] // 2
    planted = c["bad"] is not None and c["B"] * c["H"] * c["N"] > 0
    if planted:
        kept = mask is None or bool(mask[b0, p])
        if c["bad"] == "padded" and mask is not None and not kept:
            v[b0, h0, p] = math.nan  # under the mask: must reach no row
        elif c["bad"] in ("key", "value") and kept:
            (k if c["bad"] == "key" else v)[b0, h0, p, 0] = math.nan
        else:
            planted = False
    try:
        if c["causal"] and c["pieces"] > 1 and c["wrong"] is None and c["N"] > 0:
            cuts = sorted({0, c["N"], *torch.linspace(0, c["N"], c["pieces"] + 1).long().tolist()})
            outs, state = [], None
            for a, b in zip(cuts, cuts[1:]):
                sl = slice(a, b)
                o, state = attend(c, q[:, :, sl], k[:, :, sl], v[:, :, sl], W, initial_state=state,
                                  return_state=True, **{**kw, "key_padding_mask": None if mask is None else mask[:, sl]})
                outs.append(o)
            got = torch.cat(outs, 2)
            if c["wrong"] is None and decay_ok and state is not None:  # a state continued with another decay
                other = None if c["decay"] is not None else 0.5
                try:
                    attend(c, q[:, :, :1], k[:, :, :1], v[:, :, :1], W, initial_state=state, decay=other)
                    raise AssertionError("a state continued with another decay was accepted")
                except ValueError as err:
                    assert str(err).startswith("initial_state: made by a call with"), err
        else:
            got = attend(c, q, k, v, W, **kw)
    except (ValueError, TypeError) as err:
        assert names_an_argument(err), f"unclear error: {err}"
        expected_error = c["wrong"] is not None or not decay_ok
        assert expected_error, f"a valid call was refused: {err}"
        return
    assert c["wrong"] is None and decay_ok, f"bad input {c['wrong']!r} / decay {c['decay']!r} was accepted"
    assert got.shape == (c["B"], c["H"], c["N"], c["dv"])
    if got.numel() == 0:
        return
    clean_v, clean_k = torch.nan_to_num(v, nan=0.0), torch.nan_to_num(k, nan=0.0)
    ref = reference(c, q, clean_k, clean_v, W, mask)
    if planted and c["bad"] != "padded":
        seen = torch.zeros_like(seen)
        seen[b0, h0, (p if c["causal"] else 0):] = True
        if c["bad"] == "key" and c["kind"] == "features":  # exp(nan) features: every row of that head sees it
            seen[b0, h0] = torch.arange(c["N"]) >= (p if c["causal"] else 0)
        assert not torch.isfinite(got[seen]).all(-1).any(), "a row that sees a NaN came out finite"
        got, ref = got[~seen], ref[~seen]
    assert torch.isfinite(got).all(), "a row that sees no NaN is not finite"
    if got.numel() == 0:
        return
    err = (got.double() - ref).norm(dim=-1)
    scale = ref.norm(dim=-1)
    assert (err <= 1e-3 * scale + 1e-5 * scale.max().clamp_min(1e-30)).all(), \
        f"worst row {(err / scale.clamp_min(1e-30)).max():.2e}"
