"""SequenceEncoder: shape, padding invariance, gradients, eval determinism."""

from __future__ import annotations

import pytest
import torch

from mit_lightning.backbones.sequence import SequenceEncoder
from mit_lightning.errors import UserError


def lengths_to_mask(lengths: list[int], steps: int) -> torch.Tensor:
    return torch.arange(steps)[None] < torch.tensor(lengths)[:, None]


@pytest.fixture
def encoder() -> SequenceEncoder:
    torch.manual_seed(0)
    return SequenceEncoder(input_dim=5, width=16, layers=3, heads=4, dropout=0.1, max_length=32)


def test_output_shape(encoder):
    features = torch.randn(3, 7, 5)
    output = encoder(features, lengths_to_mask([7, 3, 1], 7))
    assert output.shape == (3, encoder.out_dim) == (3, 16)
    assert encoder(features).shape == (3, 16)  # no mask: every step is real


@pytest.mark.parametrize("grad", [False, True], ids=["inference-path", "autograd-path"])
def test_output_ignores_padding(encoder, grad):
    encoder.eval()
    torch.manual_seed(1)
    features = torch.randn(3, 9, 5)
    mask = lengths_to_mask([9, 4, 2], 9)
    noisy = features.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 5) * 100
    noisy[1, 6, 0] = float("-inf")
    noisy[2, 8, 1] = float("nan")
    with torch.set_grad_enabled(grad):
        reference = encoder(features, mask)
        assert torch.allclose(encoder(noisy, mask), reference, atol=1e-5)
        # the same as the sample alone without any padding
        alone = encoder(features[1:2, :4], torch.ones(1, 4, dtype=torch.bool))
        assert torch.allclose(alone, reference[1:2], atol=1e-5)
        assert not torch.allclose(reference[1], encoder(features, None)[1], atol=1e-3)  # the mask matters


def test_row_without_real_steps_reads_its_first_step(encoder):
    encoder.eval()
    features = torch.randn(2, 6, 5)
    mask = lengths_to_mask([0, 1], 6)
    with torch.no_grad():
        output = encoder(features, mask)
        first = encoder(features[:1, :1], None)
    assert torch.isfinite(output).all()
    assert torch.allclose(output[0], first[0], atol=1e-5)


def test_gradients_reach_every_parameter(encoder):
    encoder.train()
    features = torch.randn(4, 6, 5)
    output = encoder(features, lengths_to_mask([6, 5, 2, 1], 6))
    (output * torch.randn_like(output)).sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_dropout_only_in_training(encoder):
    features = torch.randn(2, 5, 5)
    mask = lengths_to_mask([5, 3], 5)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(features, mask), encoder(features, mask))
    encoder.train()
    with torch.no_grad():
        assert not torch.allclose(encoder(features, mask), encoder(features, mask))


def test_sequences_longer_than_max_length_are_refused(encoder):
    with pytest.raises(UserError, match="max_length is 32"):
        encoder(torch.randn(1, 33, 5))
