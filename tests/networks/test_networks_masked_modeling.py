"""Masked slice modelling: the mask token, the mask sampler's randomness and the decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.networks import MaskedSliceModeling


def test_decoder_is_a_two_layer_gelu_mlp_of_width_d_model_by_default():
    torch.manual_seed(0)
    mm = MaskedSliceModeling(6)
    first, last = mm.decoder[0], mm.decoder[-1]
    assert first.weight.shape == (6, 6)  # hidden width defaults to d_model
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(mm(x), F.gelu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias)
    assert MaskedSliceModeling(6, hidden_dim=4).decoder[0].weight.shape == (4, 6)


def test_default_width_is_the_default_token_size():
    """Like the encoder and the aggregator, 640-wide tokens by default: the mask token replaces them and the
    decoder maps them back to that size (shapes only, on the meta device)."""
    with torch.device("meta"):
        mm = MaskedSliceModeling()
        tokens = torch.empty(1, 3, 640)
        masked = mm.mask_tokens(tokens, torch.tensor([[True, False, False]]))
        assert masked.shape == tokens.shape and mm(masked).shape == tokens.shape
        with pytest.raises(RuntimeError):
            mm(torch.empty(1, 3, 641))


def test_mask_ratio_must_be_below_one():
    MaskedSliceModeling(4, mask_ratio=0.0)
    MaskedSliceModeling(4, mask_ratio=0.99)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            MaskedSliceModeling(4, mask_ratio=bad)


def test_mask_token_starts_small():
    """The learned mask token is initialised from ``N(0, 0.02^2)``, well inside the embeddings' scale."""
    torch.manual_seed(0)
    token = MaskedSliceModeling(20000, hidden_dim=1).mask_token.detach()
    torch.testing.assert_close(token.std(), torch.tensor(0.02), rtol=0.03, atol=0)
    assert abs(float(token.mean())) < 0.001


def test_mask_sampling_draws_from_the_given_generator_only():
    mm = MaskedSliceModeling(4, mask_ratio=0.3)
    valid = torch.ones(3, 20, dtype=torch.bool)
    torch.manual_seed(0)
    first = mm.sample_mask(valid, torch.Generator().manual_seed(7))
    torch.manual_seed(1)  # the global generator changes; the given one decides alone
    second = mm.sample_mask(valid, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert not torch.equal(first, mm.sample_mask(valid, torch.Generator().manual_seed(8)))


def test_mask_token_takes_the_tokens_dtype():
    mm = MaskedSliceModeling(4)
    tokens = torch.randn(1, 3, 4, dtype=torch.bfloat16)
    masked = mm.mask_tokens(tokens, torch.tensor([[False, True, False]]))
    assert masked.dtype == torch.bfloat16
    assert torch.equal(masked[0, 1], mm.mask_token.detach().to(torch.bfloat16))
