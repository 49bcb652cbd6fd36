import math

import pytest
import torch

from linrope import RotaryEmbedding
from reference import assert_close, rotation_matrices


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dim", [2, 8, 64])
def test_matches_explicit_block_diagonal_rotation(dim, interleaved):
    x = torch.randn(2, 3, 17, dim, dtype=torch.float64)
    R = rotation_matrices(torch.arange(17), dim, interleaved=interleaved)
    ref = torch.einsum("nij,bhnj->bhni", R, x)
    assert_close("rotate", ref, RotaryEmbedding(dim, interleaved=interleaved).rotate(x), rtol=1e-12)


def test_half_split_is_a_permutation_of_interleaved():
    dim = 16
    perm = torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))  # half layout index -> interleaved index
    x = torch.randn(3, 40, dim, dtype=torch.float64)
    a = RotaryEmbedding(dim, interleaved=True).rotate(x)
    b = RotaryEmbedding(dim, interleaved=False).rotate(x[..., perm])
    assert_close("permutation", a[..., perm], b, rtol=1e-12)


def test_positions_offsets_and_explicit_tensors():
    rot = RotaryEmbedding(8)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    R = rotation_matrices(torch.arange(100, 105), 8)
    ref = torch.einsum("nij,bhnj->bhni", R, x)
    assert_close("int offset", ref, rot.rotate(x, 100), rtol=1e-12)
    assert_close("tensor", ref, rot.rotate(x, torch.arange(100, 105)), rtol=1e-12)
    neg = torch.tensor([-3, 0, 7, 2, 5000])
    assert_close("negative/unsorted", torch.einsum("nij,bhnj->bhni", rotation_matrices(neg, 8), x),
                 rot.rotate(x, neg), rtol=1e-12)


def test_inverse_undoes_rotation_and_scale_interpolates():
    rot = RotaryEmbedding(8, scale=4.0)
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    assert_close("inverse", x, rot.rotate(rot.rotate(x), inverse=True), rtol=1e-12)
    # scale 4 at position 8 equals scale 1 at position 2
    assert_close("scale", RotaryEmbedding(8).rotate(x[:, 2:3], 2), rot.rotate(x[:, 2:3], 8), rtol=1e-12)


def explicit_cos_sin(positions, dim, base=10000.0, scale=1.0):
    """cos, sin (len(positions), dim/2) in float64 from Python floats: theta_i = base ** (-2 i / dim)."""
    angles = torch.tensor([[p * base ** (-2 * i / dim) / scale for i in range(dim // 2)] for p in positions],
                          dtype=torch.float64)
    return angles.cos(), angles.sin()


# A float32 value in [-1, 1] is within half an ulp, 2**-25, of the float64 value it rounds; the float64 angle at
# 10**6 is itself within ~1e-10 rad. A float32 angle would be off by up to 0.03 rad.
F32_ROUNDING = 2.0**-25 + 1e-9


def test_low_precision_dtypes_are_kept_and_rotated_in_float32():
    rot = RotaryEmbedding(16)
    x = torch.randn(3000, 16, dtype=torch.float16)
    y = rot.rotate(x)
    assert y.dtype == torch.float16
    ref = rot.rotate(x.float())
    assert (y.float() - ref).abs().max() < 1e-2


def test_angles_at_position_one_million_match_float64():
    rot = RotaryEmbedding(16)
    far = rot.rotate(torch.ones(1, 16, dtype=torch.float64), torch.tensor([10**6]))
    R = rotation_matrices(torch.tensor([10**6]), 16)
    assert_close("far position", (R @ torch.ones(16, dtype=torch.float64))[None], far, rtol=1e-12)
    ref_cos, ref_sin = explicit_cos_sin([10**6, 10**6 + 1], 16)
    for positions in (10**6, torch.tensor([10**6, 10**6 + 1])):
        cos, sin = rot.cos_sin(positions, 2, "cpu", torch.float32)
        assert cos.dtype == sin.dtype == torch.float32
        assert (cos.double() - ref_cos).abs().max() <= F32_ROUNDING
        assert (sin.double() - ref_sin).abs().max() <= F32_ROUNDING


@pytest.mark.parametrize("max_cached", [0, 64, 1000])
def test_cache_is_bounded_and_every_path_gives_the_float64_angles(max_cached):
    dim = 32
    rot = RotaryEmbedding(dim, max_cached=max_cached)
    bound = max_cached * (dim // 2) * 4 * 2  # cos and sin, float32
    cases = [(None, 40), (0, 70), (max_cached - 3, 3), (max_cached - 3, 5), (10**6, 1), (10**9, 4), (-7, 9),
             (torch.tensor([3, 10**6, 0, 5]), 4), (torch.tensor([max_cached - 1, 2]), 2)]
    for positions, n in cases:
        start = 0 if positions is None else positions
        pos = positions.tolist() if isinstance(positions, torch.Tensor) else list(range(start, start + n))
        ref_cos, ref_sin = explicit_cos_sin(pos, dim)
        cos, sin = rot.cos_sin(positions, n, "cpu", torch.float32)
        assert cos.shape == sin.shape == (n, dim // 2)
        assert (cos.double() - ref_cos).abs().max() <= F32_ROUNDING, (positions, n)
        assert (sin.double() - ref_sin).abs().max() <= F32_ROUNDING, (positions, n)
        assert rot.cache_nbytes() <= bound, (positions, n, rot.cache_nbytes())
    cos64, _ = rot.cos_sin(10**6, 3, "cpu", torch.float64)
    assert (cos64 - explicit_cos_sin([10**6, 10**6 + 1, 10**6 + 2], dim)[0]).abs().max() <= 1e-9
    assert rot.cache_nbytes() <= 3 * bound  # float64 tables take twice the bytes of float32 ones


def test_cache_grows_by_powers_of_two_up_to_max_cached():
    rot = RotaryEmbedding(8, max_cached=4096)
    rot.cos_sin(None, 300, "cpu")
    assert rot.cache_nbytes() == 512 * 4 * 4 * 2
    rot.cos_sin(4000, 96, "cpu")  # ends exactly at max_cached: one table of max_cached rows
    assert rot.cache_nbytes() == 4096 * 4 * 4 * 2
    rot.cos_sin(4000, 97, "cpu")  # one position beyond: computed on the spot, the table stays
    assert rot.cache_nbytes() == 4096 * 4 * 4 * 2


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: RotaryEmbedding(7), ValueError, r"dim: expected a positive even integer, got 7", id="odd-dim"),
    pytest.param(lambda: RotaryEmbedding(0), ValueError, r"dim: expected a positive even integer, got 0",
                 id="zero-dim"),
    pytest.param(lambda: RotaryEmbedding(8, base=-1.0), ValueError, r"base: expected a finite number > 1, got -1\.0",
                 id="negative-base"),
    pytest.param(lambda: RotaryEmbedding(8, scale=0.0), ValueError, r"scale: expected a finite number > 0, got 0\.0",
                 id="zero-scale"),
    pytest.param(lambda: RotaryEmbedding(8, max_cached=-1), ValueError,
                 r"max_cached: expected an integer >= 0 \(0 disables the cache\), got -1",
                 id="negative-max_cached"),
    pytest.param(lambda: RotaryEmbedding(8).rotate(torch.randn(3, 6)), ValueError,
                 r"x: expected shape \(\.\.\., N, 8\), got \(3, 6\)", id="x-wrong-last-dim"),
    pytest.param(lambda: RotaryEmbedding(8).rotate(torch.arange(24).view(3, 8)), TypeError,
                 r"x: expected a floating-point tensor", id="x-integer"),
    pytest.param(lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), torch.arange(4)), ValueError,
                 r"positions: expected shape \(3,\) to match the sequence length", id="positions-too-long"),
    pytest.param(lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), torch.arange(3.0)), TypeError,
                 r"positions: expected an integer tensor, got dtype torch\.float32", id="positions-float-tensor"),
    pytest.param(lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), 1.5), TypeError,
                 r"positions: expected None, an int offset or an integer tensor of shape \(N,\) or \(B, N\), "
                 r"got float", id="positions-float"),
    pytest.param(lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long)),
                 ValueError, r"positions: expected shape \(3,\) to match the sequence length, got \(3, 1\)",
                 id="positions-2d"),
])
def test_invalid_input_names_the_argument_and_what_was_expected(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------- context extension
def _theta(dim, base=10000.0):
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def test_ntk_scaling_raises_the_base():
    """NTK-aware: base * s^(d/(d-2)); the highest frequency is kept, the lowest divided by exactly s."""
    rot = RotaryEmbedding(16, scale=4.0, scaling="ntk")
    expected = _theta(16, 10000.0 * 4.0 ** (16 / 14))
    torch.testing.assert_close(rot.frequencies(), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)
    assert rot.frequencies()[0] == 1.0
    assert abs(rot.frequencies()[-1] / _theta(16)[-1] - 1 / 4) < 1e-12


def test_yarn_frequencies_follow_the_paper():
    """YaRN (arXiv 2309.00071, eq. 19-20): r = L / lambda_i rotations per trained context; gamma ramps from 0
    (r < 1: interpolate, theta/s) to 1 (r > 32: keep theta); h(theta) = (1 - gamma) theta / s + gamma theta."""
    L, s, dim = 512, 8.0, 64
    rot = RotaryEmbedding(dim, scale=s, scaling="yarn", original_length=L)
    got = rot.frequencies()
    for i, theta in enumerate(_theta(dim)):
        r = L / (2 * math.pi / theta)
        gamma = 0.0 if r < 1 else 1.0 if r > 32 else (r - 1) / 31
        assert abs(got[i].item() - ((1 - gamma) * theta / s + gamma * theta)) < 1e-15 * max(theta, 1e-300) + 1e-18
    assert abs(rot.attention_factor - (0.1 * math.log(s) + 1)) < 1e-15
    assert RotaryEmbedding(64, scale=8.0).attention_factor == 1.0


def test_partial_rotation_leaves_the_other_pairs_unrotated():
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    for interleaved in (True, False):
        rot = RotaryEmbedding(16, interleaved=interleaved, rotary_fraction=0.25)  # 2 of 8 pairs
        y = rot.rotate(x, 100)
        R = rotation_matrices(torch.arange(100, 110), 16, interleaved=interleaved)
        pairs = [(2 * i, 2 * i + 1) if interleaved else (i, i + 8) for i in range(8)]
        rotated = [c for p in pairs[:2] for c in p]
        kept = [c for p in pairs[2:] for c in p]
        torch.testing.assert_close(y[..., kept], x[..., kept], rtol=0, atol=0)
        full = torch.einsum("nij,bnj->bni", R, x)
        torch.testing.assert_close(y[..., rotated], full[..., rotated], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, phrase", [
    pytest.param(dict(scaling="dynamic"), r"scaling: expected one of \('linear', 'ntk', 'yarn'\), got 'dynamic'",
                 id="scaling-name"),
    pytest.param(dict(scaling="yarn", scale=4.0), r"original_length: expected the trained context length",
                 id="yarn-without-length"),
    pytest.param(dict(scaling="yarn", scale=4.0, original_length=64, yarn_beta_fast=0.5),
                 r"yarn_beta_fast: expected a number > yarn_beta_slow \(1.0\), got 0.5", id="yarn-betas"),
    pytest.param(dict(rotary_fraction=0.0), r"rotary_fraction: expected a number in \(0, 1\], got 0.0",
                 id="fraction-zero"),
    pytest.param(dict(rotary_fraction=1.5), r"rotary_fraction: expected a number in \(0, 1\], got 1.5",
                 id="fraction-above-one"),
])
def test_context_extension_arguments_are_checked(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        RotaryEmbedding(16, **kwargs)
