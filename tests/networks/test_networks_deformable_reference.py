"""``DeformableAttention1D`` against lucidrains' ``DeformableAttention1D`` (PyPI ``deformable-attention``
0.0.18, the version the authors pin), with the authors' settings and weights copied from the reference.

0.0.18's ``grid_sample_1d`` samples along the wrong axis (every point reads the middle of the sequence); the
comparisons patch in the corrected sampler (the one 0.0.19 has), and one test pins the defect itself.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import require_module

# In the test extra (deformable-attention==0.0.18): a skip locally when missing, a failure under CI=true.
reference = require_module(
    "deformable_attention.deformable_attention_1d", distribution="deformable-attention", version="0.0.18"
)

from jointssl_monai.networks import DeformableAttention1D  # noqa: E402

DIM = 640
SETTINGS = {"heads": 8, "dim_head": 64, "downsample_factor": 4, "offset_kernel_size": 6, "offset_scale": 2}
ATOL = 1e-5


def _sample_along_sequence(feats, grid, **kwargs):
    """The corrected 1D sampler: ``grid`` is the coordinate along the sequence (the height of a width-1
    image), the width coordinate is 0."""
    xy = torch.stack([torch.zeros_like(grid), grid], dim=-1)[..., None, :]  # (N, M, 1, 2)
    return F.grid_sample(feats[..., None], xy, **kwargs)[..., 0]


@pytest.fixture
def corrected_sampler(monkeypatch):
    monkeypatch.setattr(reference, "grid_sample_1d", _sample_along_sequence)


def load_reference_weights(ours, ref):
    """Copy the reference's weights into ours (1x1 convolutions become linear maps; dense projections get the
    block-diagonal weights of the grouped ones)."""
    heads = ours.heads
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            weight = getattr(ref, name).weight[..., 0]  # (inner, dim // heads), grouped by head
            if not ours.grouped_projections:
                weight = torch.block_diag(*weight.chunk(heads, dim=0))
            getattr(ours, name).weight.copy_(weight)
        ours.to_out.weight.copy_(ref.to_out.weight[..., 0])
        ours.to_out.bias.copy_(ref.to_out.bias)
        ours.to_offsets[0].load_state_dict(ref.to_offsets[0].state_dict())  # depth-wise convolution
        ours.to_offsets[2].load_state_dict(ref.to_offsets[2].state_dict())  # point-wise convolution
        ours_mlp = [m for m in ours.rel_pos_bias.modules() if isinstance(m, torch.nn.Linear)]
        ref_mlp = [m for m in ref.rel_pos_bias.modules() if isinstance(m, torch.nn.Linear)]
        assert [m.weight.shape for m in ours_mlp] == [m.weight.shape for m in ref_mlp]
        for mine, theirs in zip(ours_mlp, ref_mlp, strict=True):
            mine.weight.copy_(theirs.weight)
            if mine.bias is not None:  # the last layer has none: its bias adds a constant to every logit
                mine.bias.copy_(theirs.bias)


def _pair(offset_gain=1.0, seed=0, **kwargs):
    """Reference and ours with the same weights; ``offset_gain`` scales the offset network's last layer."""
    torch.manual_seed(seed)
    ref = reference.DeformableAttention1D(dim=DIM, **SETTINGS).eval()
    with torch.no_grad():
        ref.to_offsets[2].weight.mul_(offset_gain)
    ours = DeformableAttention1D(DIM, **{**SETTINGS, **kwargs}).eval()
    load_reference_weights(ours, ref)
    return ours, ref


def _run_reference(ref, x):
    """Reference on ``(B, S, dim)`` tokens: returns ``(B, S, dim)`` and its sampling positions in slices."""
    out, vgrid = ref(x.transpose(1, 2), return_vgrid=True)
    num_points = vgrid.shape[-1]
    cell = x.shape[1] / max(num_points - 1, 1)  # grid_sample(align_corners=False) on the normalised grid
    return out.transpose(1, 2), (vgrid * cell - 0.5).reshape(x.shape[0], ref.heads, num_points)


@pytest.mark.parametrize("offset_gain", [1.0, 30.0])
@pytest.mark.parametrize("length", [64, 62, 67, 9])
def test_matches_reference(corrected_sampler, length, offset_gain):
    ours, ref = _pair(offset_gain)
    x = torch.randn(2, length, DIM)
    with torch.no_grad():
        expected, expected_pos = _run_reference(ref, x)
        out, pos = ours(x, return_positions=True)
    assert pos.shape == expected_pos.shape == (2, 8, length // 4)
    torch.testing.assert_close(pos, expected_pos, rtol=0, atol=1e-4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=ATOL)
    # the offsets matter; at gain 30 they exceed the 2 slices that offset_scale=2 in slices could reach
    grid_points = torch.arange(length // 4) * length / (length // 4 - 1) - 0.5
    assert (pos - grid_points).abs().max() > (4.0 if offset_gain > 1 else 0.5)


def test_defaults_are_the_authors_settings(corrected_sampler):
    """Built with nothing but the token size, the module is the authors' (8 heads of 64, downsampling 4,
    offset kernel 6, offset scale 2, the reference's position-bias MLP on log distances)."""
    torch.manual_seed(0)
    ref = reference.DeformableAttention1D(dim=DIM, **SETTINGS).eval()
    with torch.no_grad():
        ref.to_offsets[2].weight.mul_(30.0)
    ours = DeformableAttention1D(DIM).eval()
    load_reference_weights(ours, ref)
    x = torch.randn(1, 64, DIM)
    with torch.no_grad():
        expected, expected_pos = _run_reference(ref, x)
        out, pos = ours(x, return_positions=True)
    torch.testing.assert_close(pos, expected_pos, rtol=0, atol=1e-4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=ATOL)


def test_offsets_in_slices_would_not_match(corrected_sampler):
    """The comparison notices the unit: offsets scaled to +/-2 slices (the old meaning) do not match."""
    ours, ref = _pair(30.0, offset_scale=2 * 15 / 64)  # 2 slices: a cell is 64 / 15 slices
    x = torch.randn(2, 64, DIM)
    with torch.no_grad():
        expected, expected_pos = _run_reference(ref, x)
        out, pos = ours(x, return_positions=True)
    assert (pos - expected_pos).abs().max() > 4
    assert (out - expected).abs().max() > 100 * ATOL


def test_padded_rows_match_reference_alone(corrected_sampler):
    ours, ref = _pair(30.0)
    short, full = torch.randn(1, 62, DIM), torch.randn(1, 64, DIM)
    x = torch.cat([torch.cat([short, 100 * torch.randn(1, 2, DIM)], dim=1), full])
    valid = torch.arange(64)[None] < torch.tensor([[62], [64]])
    with torch.no_grad():
        out = ours(x, valid)
        torch.testing.assert_close(out[:1, :62], _run_reference(ref, short)[0], rtol=1e-5, atol=ATOL)
        torch.testing.assert_close(out[1:], _run_reference(ref, full)[0], rtol=1e-5, atol=ATOL)


def test_dense_projections_with_block_diagonal_weights_match_reference(corrected_sampler):
    ours, ref = _pair(30.0, grouped_projections=False)
    assert ours.to_q.weight.shape == (512, DIM)
    x = torch.randn(2, 64, DIM)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _run_reference(ref, x)[0], rtol=1e-5, atol=ATOL)


def test_reference_0_0_18_sampler_reads_only_the_middle_of_the_sequence():
    """The defect of 0.0.18 that ours does not reproduce: whatever the position ``u`` in [-1, 1]
    (normalised), the sample is the middle of the sequence scaled by ``max(0, 1 - |u| / 2)``."""
    feats = torch.randn(3, 5, 8)  # (batch, channels, sequence)
    u = torch.tensor([-1.5, -1.0, -0.25, 0.0, 0.6, 1.0, 2.5])
    out = reference.grid_sample_1d(
        feats, u.expand(3, -1), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    middle = (feats[..., 3] + feats[..., 4]) / 2
    torch.testing.assert_close(out, middle[..., None] * (1 - u.abs() / 2).clamp(min=0))
    corrected = _sample_along_sequence(
        feats, u.expand(3, -1), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    torch.testing.assert_close(corrected[..., 3], middle)  # u = 0 is the middle in both
    torch.testing.assert_close(corrected[..., 5], feats[..., 7] / 2)  # u = 1: half of the last slice
