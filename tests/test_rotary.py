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


def test_cache_grows_and_low_precision_dtypes_are_kept():
    rot = RotaryEmbedding(16)
    rot.rotate(torch.randn(4, 16))
    x = torch.randn(3000, 16, dtype=torch.float16)
    y = rot.rotate(x)
    assert y.dtype == torch.float16
    ref = rot.rotate(x.float())
    assert (y.float() - ref).abs().max() < 1e-2
    # float32 angle math with float64 positions: position 1e6 is still accurate
    far = rot.rotate(torch.ones(1, 16, dtype=torch.float64), torch.tensor([10**6]))
    R = rotation_matrices(torch.tensor([10**6]), 16)
    assert_close("far position", (R @ torch.ones(16, dtype=torch.float64))[None], far, rtol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda: RotaryEmbedding(7), "dim"),
    (lambda: RotaryEmbedding(0), "dim"),
    (lambda: RotaryEmbedding(8, base=-1.0), "base"),
    (lambda: RotaryEmbedding(8, scale=0.0), "scale"),
    (lambda: RotaryEmbedding(8).rotate(torch.randn(3, 6)), "x"),
    (lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), torch.arange(4)), "positions"),
    (lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), torch.arange(3.0)), "positions"),
    (lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), 1.5), "positions"),
    (lambda: RotaryEmbedding(8).rotate(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long)), "positions"),
])
def test_invalid_input_names_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
