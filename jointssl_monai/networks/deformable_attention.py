"""1D deformable self-attention over a sequence of slice tokens.

The aggregator ``f_inter`` of Nguyen et al. (AAAI 2023, arXiv:2212.01893) assembles slice embeddings with
deformable self-attention (Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022, in one
dimension): every query attends to a small set of key/value points, one per block of ``downsample_factor``
slices, whose positions are shifted by offsets predicted from the queries. Relative positions enter as a
continuous bias produced by a small MLP (Liu et al., "Swin Transformer V2", CVPR 2022, log-spaced continuous
position bias).

Padding: sequences of a batch may have different valid lengths (a prefix ``valid`` mask). Sampling points of a
sequence are clamped into its own valid range, keys beyond it are masked and padded queries are zeroed before
the offset convolution, so the output at valid positions does not depend on padding content or on the padded
length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContinuousPositionBias1D", "DeformableAttention1D", "check_prefix_mask"]


def check_prefix_mask(valid: torch.Tensor, shape: tuple[int, int], name: str = "valid") -> torch.Tensor:
    """Validate a ``(B, S)`` bool padding mask whose True entries form a non-empty prefix; return the
    lengths."""
    if valid.shape != torch.Size(shape) or valid.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(shape)}, got {valid.dtype} {tuple(valid.shape)}."
        )
    lengths = valid.sum(dim=1)
    prefix = torch.arange(shape[1], device=valid.device)[None] < lengths[:, None]
    if not torch.equal(prefix, valid) or bool((lengths < 1).any()):
        raise ValueError(
            f"{name} must mark a non-empty prefix of valid slices in every sequence (padding at the end)."
        )
    return lengths


class ContinuousPositionBias1D(nn.Module):
    """Per-head attention bias ``MLP_h(sign(d) * log(1 + |d|))`` of a continuous relative offset ``d`` (in
    slices).

    Args:
        heads: number of attention heads (one bias per head). hidden_dim: width of the hidden layer.
        log_distance: feed ``sign(d) * log1p(|d|)`` rather than ``d`` (Swin V2), so that long offsets stay in
        range.
    """

    def __init__(self, heads: int, hidden_dim: int = 64, log_distance: bool = True) -> None:
        super().__init__()
        self.log_distance = log_distance
        # one independent 1 -> hidden -> 1 MLP per head, stored as batched weights
        self.w1 = nn.Parameter(torch.randn(heads, hidden_dim) * 0.5)
        self.b1 = nn.Parameter(torch.zeros(heads, hidden_dim))
        self.w2 = nn.Parameter(torch.randn(heads, hidden_dim) / math.sqrt(hidden_dim))
        self.b2 = nn.Parameter(torch.zeros(heads))

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        """Map relative offsets ``(B, H, S, M)`` to biases of the same shape."""
        if self.log_distance:
            rel = torch.sign(rel) * torch.log1p(rel.abs())
        hidden = F.relu(rel[..., None] * self.w1[:, None, None] + self.b1[:, None, None])
        return (hidden * self.w2[:, None, None]).sum(-1) + self.b2[:, None, None]


class DeformableAttention1D(nn.Module):
    """Deformable multi-head self-attention over tokens ``(B, S, dim)``.

    For a sequence of valid length ``L``, ``M = ceil(S / downsample_factor)`` reference points sit at the
    centres ``m * f + (f - 1) / 2`` of consecutive blocks of ``f = downsample_factor`` slices (a block cut
    short by the end of the sequence uses the centre of its valid slices); those with ``m >= ceil(L / f)`` are
    masked. Each head shifts them by its own offsets ``offset_scale * tanh(.)``, predicted by a depth-wise
    convolution (kernel ``offset_kernel_size``, stride ``f``, centred on the block) over that head's queries,
    followed by GELU and a point-wise convolution shared by the heads. Keys and values, projected from every
    slice, are read at the shifted positions by linear interpolation; positions are clamped into
    ``[0, L - 1]`` so only valid slices are ever read. Attention logits get a continuous relative-position
    bias of ``query position - sampling position``.

    Args:
        dim: token size.
        heads: number of heads.
        dim_head: size of each head.
        downsample_factor: one key/value point per this many slices.
        offset_kernel_size: kernel of the depth-wise offset convolution (``>= downsample_factor``).
        offset_scale: largest offset, in slices.
        dropout: dropout on the attention weights.
        cpb_hidden_dim: hidden width of the position-bias MLP.
        cpb_log_distance: log-spaced relative offsets for the bias MLP.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        downsample_factor: int = 4,
        offset_kernel_size: int = 6,
        offset_scale: float = 2.0,
        dropout: float = 0.0,
        cpb_hidden_dim: int = 64,
        cpb_log_distance: bool = True,
    ) -> None:
        super().__init__()
        if downsample_factor < 1:
            raise ValueError(f"downsample_factor must be >= 1, got {downsample_factor}.")
        if offset_kernel_size < downsample_factor:
            raise ValueError(
                f"offset_kernel_size ({offset_kernel_size}) must be >= "
                f"downsample_factor ({downsample_factor})."
            )
        self.heads = heads
        self.dim_head = dim_head
        self.downsample_factor = downsample_factor
        self.offset_kernel_size = offset_kernel_size
        self.offset_scale = offset_scale
        self.dropout = dropout
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_offsets = nn.Sequential(
            nn.Conv1d(dim_head, dim_head, offset_kernel_size, stride=downsample_factor, groups=dim_head),
            nn.GELU(),
            nn.Conv1d(dim_head, 1, 1, bias=False),
        )
        self.rel_pos_bias = ContinuousPositionBias1D(heads, cpb_hidden_dim, cpb_log_distance)
        self.to_out = nn.Linear(inner, dim)

    def _offsets(self, q: torch.Tensor, valid: torch.Tensor, num_points: int) -> torch.Tensor:
        """Per-head offsets ``(B, H, M)`` from queries ``(B, H, S, dh)``; padded queries are zeroed first."""
        b, h, s, dh = q.shape
        f, k = self.downsample_factor, self.offset_kernel_size
        x = (q * valid[:, None, :, None]).reshape(b * h, s, dh).transpose(1, 2)
        # window m covers [m*f - pad_left, m*f - pad_left + k - 1], centred on the block centre m*f + (f-1)/2
        pad_left = (k - f) // 2
        pad_right = (k - f - pad_left) + (num_points * f - s)
        off = self.to_offsets(F.pad(x, (pad_left, pad_right)))
        return (self.offset_scale * torch.tanh(off)).reshape(b, h, num_points)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, return_positions: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend over slices.

        Args:
            x: ``(B, S, dim)`` tokens.
            valid: optional ``(B, S)`` bool, True at real slices (a prefix of every row).
            return_positions: also return the sampling positions ``(B, heads, M)`` in slice units.

        Returns:
            ``(B, S, dim)`` outputs (and the positions if asked).
        """
        if x.ndim != 3:
            raise ValueError(f"DeformableAttention1D: tokens must be (B, S, dim), got {tuple(x.shape)}.")
        b, s, _ = x.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=x.device)
        lengths = check_prefix_mask(valid, (b, s))
        h, dh, f = self.heads, self.dim_head, self.downsample_factor
        num_points = -(-s // f)

        q = self.to_q(x).reshape(b, s, h, dh).transpose(1, 2)  # (B, H, S, dh)
        kv = self.to_kv(x).reshape(b, s, 2, h, dh).permute(2, 0, 3, 1, 4)  # (2, B, H, S, dh)

        # reference points: centre of the valid slices of each block (a sequence's last block may be short)
        last = (lengths - 1).to(x.dtype)[:, None, None]
        start = torch.arange(num_points, device=x.device) * f
        in_block = (lengths[:, None] - start[None]).clamp(min=1, max=f)  # (B, M)
        ref = (start[None] + (in_block - 1) / 2).to(x.dtype)[:, None]  # (B, 1, M)
        pos = torch.minimum((ref + self._offsets(q, valid, num_points)).clamp(min=0), last)  # (B, H, M)

        # linear interpolation between the two neighbouring slices (both inside the valid range)
        lo = pos.detach().floor()
        frac = (pos - lo)[..., None]
        lo_i = lo.long()
        hi_i = torch.minimum(lo_i + 1, (lengths - 1)[:, None, None])

        def gather(idx: torch.Tensor) -> torch.Tensor:
            return kv.gather(3, idx[None, ..., None].expand(2, -1, -1, -1, dh))

        # lerp needs one dtype on CUDA: under autocast kv is half precision while positions stay float32
        k, v = torch.lerp(gather(lo_i), gather(hi_i), frac[None].to(kv.dtype)).unbind(0)  # (B, H, M, dh)

        rel = torch.arange(s, device=x.device, dtype=x.dtype)[None, None, :, None] - pos[:, :, None, :]
        key_valid = torch.arange(num_points, device=x.device)[None] < (-(-lengths // f))[:, None]  # (B, M)
        bias = self.rel_pos_bias(rel).masked_fill(~key_valid[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        out = self.to_out(out.transpose(1, 2).reshape(b, s, h * dh))
        return (out, pos) if return_positions else out
