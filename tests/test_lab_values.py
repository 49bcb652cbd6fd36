"""The lab's reported numbers against values computed by hand: bits per byte, loss and accuracy of ``evaluate`` and
the per-position losses behind the extrapolation plots, for a model whose probabilities are known (to 1e-6: the
lab takes cross-entropy of float32 logits)."""

import math

import pytest
import torch
from torch import nn

from lab.data import IGNORE
from lab.train import evaluate, position_losses

# targets of 3 windows of 4 positions; IGNORE is not scored: 9 scored targets, 3 of them byte 0
Y = torch.tensor([[0, 5, IGNORE, 7], [0, 0, 9, IGNORE], [IGNORE, 1, 2, 3]])


class KnownProbabilities(nn.Module):
    """Whatever the input: byte 0 has probability 3/258, every other byte 1/258 (logit ln 3 against 0)."""

    def __init__(self):
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(()))  # evaluate finds the device from the parameters
        self.blocks = nn.ModuleList()  # position_losses counts the blocks

    def forward(self, x):
        logits = torch.zeros(*x.shape, 256) + self.zero
        logits[..., 0] = math.log(3)
        return logits


@pytest.mark.parametrize("batch_size", [8, 2])
def test_evaluate_reports_bits_per_byte_of_known_probabilities(batch_size):
    """Loss ln(258/3) nats on a byte 0, ln 258 on any other; bits per byte = nats / ln 2; accuracy: the argmax is
    byte 0, right on 3 of the 9 scored targets."""
    x = torch.randint(0, 256, Y.shape, generator=torch.Generator().manual_seed(0))
    got = evaluate(KnownProbabilities(), x, Y, batch_size=batch_size)
    assert got["loss"] == pytest.approx((3 * math.log(86) + 6 * math.log(258)) / 9, rel=1e-6)
    assert got["bpb"] == pytest.approx((3 * math.log2(86) + 6 * math.log2(258)) / 9, rel=1e-6)
    assert got["bpb"] == pytest.approx(7.4829064218, rel=1e-6)
    assert got["accuracy"] == pytest.approx(1 / 3, rel=1e-6)


def test_position_losses_average_each_position_over_its_scored_targets():
    x = torch.zeros(Y.shape, dtype=torch.long)
    got = position_losses(KnownProbabilities(), x, Y, batch_size=2)
    want = torch.tensor([math.log(86), (math.log(86) + 2 * math.log(258)) / 3, math.log(258), math.log(258)],
                        dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
