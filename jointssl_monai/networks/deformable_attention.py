"""1D deformable self-attention over a sequence of slice tokens.

The aggregator ``f_inter`` of Nguyen et al. (AAAI 2023, arXiv:2212.01893) assembles slice embeddings with
deformable self-attention (Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022, in one
dimension): every query attends to a small set of key/value points, about one per ``downsample_factor``
slices, whose positions are shifted by offsets predicted from the queries. Relative positions enter as a
continuous bias produced by a small MLP (Liu et al., "Swin Transformer V2", CVPR 2022, log-spaced continuous
position bias).

Reference: the authors use ``DeformableAttention1D`` of lucidrains' PyPI package ``deformable-attention``,
pinned at version 0.0.18 in their environment file, with ``downsample_factor=4, offset_scale=2,
offset_kernel_size=6`` and its defaults otherwise (8 heads of 64, ``offset_groups = heads``, grouped
query/key/value projections, ``dropout=0``).

That version's 1D sampler has a defect: ``grid_sample_1d`` appends the zero coordinate on the wrong side, so
the sampling position becomes the x (width) coordinate of a width-1 image and the coordinate along the
sequence (the height) is always 0. Every key/value point then reads the middle of the sequence (slice
``(n - 1) / 2``, interpolated), multiplied by ``max(0, 1 - |u| / 2)`` where ``u`` is its normalised position:
no other slice is ever read and the offsets only rescale that one key. Version 0.0.19 changes exactly that
line. This module computes what 0.0.18 computes with the sampler corrected (the 0.0.19 sampler); reproducing
the defect is not offered, since it leaves nothing to attend to. With its default options and a sequence
without padding, the output equals that reference up to float32 rounding (a test copies the weights and
compares; another test pins the defect of the uncorrected sampler). The layout differs: tokens are
``(B, S, dim)``, slices as tokens (the paper's wording), where the reference takes ``(b, dim, n)``. The
authors' code applies it to the transposed tensor (``dim`` = the number of slices, the sequence running over
the features); that is not offered here.

Other differences, by design:

- padding: a batch may hold sequences of different valid lengths ``L`` (a prefix ``valid`` mask). Every
  sequence is treated as if it were alone at length ``L`` (its own number of points, grid, normalisation and
  zero border), keys beyond its points are masked and padded queries are zeroed before the offset
  convolution, so outputs at valid positions depend neither on padding content nor on the padded length.
  The reference has no padding.
- short sequences: the reference has ``M = L // downsample_factor`` points, so it fails for
  ``L < downsample_factor`` (its offset convolution has no output) and has a single point for
  ``downsample_factor <= L < 2 * downsample_factor``, where the softmax over one key is constant: queries,
  keys and the position bias then have no effect and every slice gets the same interpolated value. Here
  ``M = max(L // downsample_factor, min(L, 2))``: two points for ``2 <= L < 2 * downsample_factor`` (the
  same formulas with ``M = 2``, points ``v = 0`` and ``v = 1`` in cells of ``L`` slices) and one for
  ``L = 1``. Only such short sequences differ from the reference (never the authors' 64 slices).
- ``offset_groups`` is fixed to ``heads`` (the reference's default): every head has its own offsets. The
  reference's ``group_key_values=False`` (a dense key/value projection mixing channels sampled at different
  heads' positions) has no counterpart; ``grouped_projections=False`` here gives dense projections with the
  keys of each head read at its own positions, which equals the reference when the dense weights are block
  diagonal.
- keys and values are projected from every slice and then interpolated; the reference interpolates the input
  features and then projects them. Both are the same since interpolation and a bias-free linear map commute
  (and zeros outside the sequence stay zeros).
- ``offset_kernel_size - downsample_factor`` may be odd here (the extra padding goes to the right); the
  reference requires it even.
- ``F.scaled_dot_product_attention`` replaces the explicit softmax (same maths; dropout draws differ).
- the position-bias MLP has no output bias: the reference's adds the same constant to every logit, which the
  softmax ignores (it never gets a gradient there either).
- ``grid="centred"`` (not the default) is a geometry of ours: block-centred reference points, clamped
  positions and a bias over relative positions in slices.

``offset_scale`` means what it means in the reference: the largest offset in grid cells, not in slices. With
``grid="normalized"`` a cell is ``L / max(M - 1, 1)`` slices (``64 / 15`` at 64 slices and factor 4, so
``offset_scale=2`` reaches about +/-8.5 slices); with ``grid="centred"`` a cell is ``downsample_factor``
slices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContinuousPositionBias1D", "DeformableAttention1D", "GroupedLinear", "check_prefix_mask"]

GRIDS = ("normalized", "centred")


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


class GroupedLinear(nn.Module):
    """Bias-free linear map whose input and output features are split into ``groups`` blocks, block ``g`` of
    the output reading only block ``g`` of the input (a 1x1 grouped convolution on the last axis).

    ``weight`` has shape ``(out_features, in_features // groups)``; ``groups=1`` is ``nn.Linear(bias=False)``
    with the same state dict.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"GroupedLinear: in_features ({in_features}) and out_features ({out_features}) must be "
                f"divisible by groups ({groups})."
            )
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's (and nn.Conv1d's) default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight)
        g = self.groups
        w = self.weight.reshape(g, -1, self.weight.shape[1])
        out = torch.einsum("...gi,goi->...go", x.reshape(*x.shape[:-1], g, -1), w)
        return out.reshape(*x.shape[:-1], -1)


class ContinuousPositionBias1D(nn.Module):
    """Attention bias ``MLP(sign(d) * log(1 + |d|))`` of a continuous relative position ``d``, one MLP shared
    by all heads (as in the reference, where heads differ through their sampling positions only).

    Args:
        hidden_dim: width of the hidden layers.
        depth: number of hidden layers (Linear + ReLU), followed by a linear map to one value.
        log_distance: feed ``sign(d) * log1p(|d|)`` rather than ``d`` (Swin V2).
    """

    def __init__(self, hidden_dim: int, depth: int = 2, log_distance: bool = True) -> None:
        super().__init__()
        if depth < 1 or hidden_dim < 1:
            raise ValueError(f"hidden_dim and depth must be >= 1, got {hidden_dim} and {depth}.")
        self.log_distance = log_distance
        layers: list[nn.Module] = [nn.Linear(1, hidden_dim), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
        # no output bias: a constant added to every logit changes nothing after the softmax (the reference's
        # output bias is such a constant, so it never gets a gradient)
        layers.append(nn.Linear(hidden_dim, 1, bias=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        """Map relative positions of any shape (e.g. ``(B, H, S, M)``) to biases of the same shape."""
        if self.log_distance:
            rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        return self.mlp(rel[..., None])[..., 0]


class DeformableAttention1D(nn.Module):
    """Deformable multi-head self-attention over tokens ``(B, S, dim)``.

    For a sequence of valid length ``L`` and ``f = downsample_factor``, each head predicts one offset per grid
    point ``m`` with a depth-wise convolution (kernel ``offset_kernel_size``, stride ``f``, window centred on
    slices ``m*f .. m*f + f - 1``) over that head's queries, then GELU, a point-wise convolution shared by the
    heads, and ``offset_scale * tanh(.)``. The grid, and so the unit of the offsets, depends on ``grid``:

    - ``"normalized"`` (default; the reference's): ``M = max(L // f, min(L, 2))`` points ``v = m + offset``,
      in cells of ``c = L / max(M - 1, 1)`` slices, normalised to ``u = 2 v / max(M - 1, 1) - 1`` and read as
      ``grid_sample(align_corners=False)`` reads them: at slice position ``((u + 1) L - 1) / 2 = v c - 0.5``
      (with zero offsets, point 0 and point ``M - 1`` sit half a slice outside the sequence), by linear
      interpolation with zeros outside the sequence. The position bias gets ``2 i / max(L - 1, 1) - 1 - u``
      for query slice ``i`` (query and key coordinates normalised differently, as in the reference).
    - ``"centred"``: ``M = ceil(L / f)`` points at the centres ``m*f + (f - 1) / 2`` of consecutive blocks of
      ``f`` slices (a block cut short by the end of the sequence uses the centre of its valid slices),
      shifted by ``f * offset`` slices, clamped into ``[0, L - 1]`` and read by linear interpolation; the
      position bias gets ``i - position`` in slices.

    Keys and values of a head are read at its positions; attention logits ``q k / sqrt(dim_head)`` get the
    continuous position bias (:class:`ContinuousPositionBias1D`).

    Args:
        dim: token size.
        heads: number of heads.
        dim_head: size of each head.
        downsample_factor: about one key/value point per this many slices.
        offset_kernel_size: kernel of the depth-wise offset convolution (``>= downsample_factor``).
        offset_scale: largest offset, in grid cells (see above); ``None`` means ``downsample_factor`` (the
            reference's default). The authors pass 2.
        dropout: dropout on the attention weights.
        grid: ``"normalized"`` (the reference's geometry) or ``"centred"`` (see above).
        grouped_projections: project the queries, keys and values of head ``h`` from feature block ``h`` of
            ``heads`` equal blocks only (the reference's ``group_queries`` and ``group_key_values`` with
            ``offset_groups = heads``; needs ``dim % heads == 0``); ``False`` uses dense projections.
        cpb_hidden_dim: hidden width of the position-bias MLP; ``None`` means ``max(dim // 4, 1)`` (the
            reference's).
        cpb_depth: number of hidden layers of the position-bias MLP (the reference's is 2).
        cpb_log_distance: log-spaced relative positions for the bias MLP.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        downsample_factor: int = 4,
        offset_kernel_size: int = 6,
        offset_scale: float | None = 2.0,
        dropout: float = 0.0,
        grid: str = "normalized",
        grouped_projections: bool = True,
        cpb_hidden_dim: int | None = None,
        cpb_depth: int = 2,
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
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")
        if grouped_projections and dim % heads:
            raise ValueError(
                f"grouped_projections needs dim ({dim}) divisible by heads ({heads}); "
                "pass grouped_projections=False for dense projections."
            )
        self.heads = heads
        self.dim_head = dim_head
        self.downsample_factor = downsample_factor
        self.offset_kernel_size = offset_kernel_size
        self.offset_scale = float(downsample_factor if offset_scale is None else offset_scale)
        self.dropout = dropout
        self.grid = grid
        self.grouped_projections = grouped_projections
        inner = heads * dim_head
        groups = heads if grouped_projections else 1
        self.to_q = GroupedLinear(dim, inner, groups)
        self.to_k = GroupedLinear(dim, inner, groups)
        self.to_v = GroupedLinear(dim, inner, groups)
        self.to_offsets = nn.Sequential(
            nn.Conv1d(dim_head, dim_head, offset_kernel_size, stride=downsample_factor, groups=dim_head),
            nn.GELU(),
            nn.Conv1d(dim_head, 1, 1, bias=False),
        )
        hidden = max(dim // 4, 1) if cpb_hidden_dim is None else cpb_hidden_dim
        self.rel_pos_bias = ContinuousPositionBias1D(hidden, cpb_depth, cpb_log_distance)
        self.to_out = nn.Linear(inner, dim)

    def num_points(self, lengths: torch.Tensor) -> torch.Tensor:
        """Number of key/value points of sequences of ``lengths`` slices (an integer tensor)."""
        f = self.downsample_factor
        if self.grid == "normalized":  # L // f, but two points for 2 <= L < 2 f (see the module notes)
            return torch.maximum(lengths // f, lengths.clamp(max=2))
        return -(-lengths // f)

    def _offsets(self, q: torch.Tensor, valid: torch.Tensor, num_points: int) -> torch.Tensor:
        """Per-head offsets ``(B, H, M)`` in grid cells from queries ``(B, H, S, dh)`` (padded queries zeroed
        first)."""
        b, h, s, dh = q.shape
        f, k = self.downsample_factor, self.offset_kernel_size
        x = (q * valid[:, None, :, None]).reshape(b * h, s, dh).transpose(1, 2)
        # window m covers [m*f - pad_left, m*f - pad_left + k - 1], centred on the block m*f .. m*f + f - 1;
        # the right padding gives at least num_points windows (zeros beyond the sequence)
        pad_left = (k - f) // 2
        pad_right = max(k - f - pad_left + num_points * f - s, 0)
        off = self.to_offsets(F.pad(x, (pad_left, pad_right)))[..., :num_points]
        return (self.offset_scale * torch.tanh(off)).reshape(b, h, num_points)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        return_positions: bool = False,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Attend over slices.

        Args:
            x: ``(B, S, dim)`` tokens.
            valid: optional ``(B, S)`` bool, True at real slices (a prefix of every row).
            return_positions: also return the sampling positions ``(B, heads, M)`` in slice units, ``M`` the
                number of points of ``S`` slices. A padded sequence has fewer points of its own: the entries
                of the points it lacks are masked keys and mean nothing.
            return_attention: also return the attention over slices ``(B, heads, S, S)`` (float32, without
                dropout): the softmax weights of the key/value points spread onto the slices they
                interpolate, so that ``to_out(attention @ values)`` is the output in eval mode (``values``:
                ``to_v(x)`` split into heads). A query's row sums to at most 1 (points outside the sequence
                read zeros); rows of padded queries mean nothing. The output is computed as without it.

        Returns:
            ``(B, S, dim)`` outputs, then the positions and the attention, each if asked.
        """
        if x.ndim != 3:
            raise ValueError(f"DeformableAttention1D: tokens must be (B, S, dim), got {tuple(x.shape)}.")
        b, s, _ = x.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=x.device)
        lengths = check_prefix_mask(valid, (b, s))
        h, dh, f = self.heads, self.dim_head, self.downsample_factor
        num_points = int(self.num_points(torch.tensor(s)))
        points = self.num_points(lengths)  # (B,) points of each sequence alone
        last = (lengths - 1)[:, None, None]

        q = self.to_q(x).reshape(b, s, h, dh).transpose(1, 2)  # (B, H, S, dh)
        kv = torch.stack([self.to_k(x), self.to_v(x)]).reshape(2, b, s, h, dh).transpose(2, 3)  # (2,B,H,S,dh)
        offsets = self._offsets(q, valid, num_points)  # (B, H, M), grid cells
        grid = torch.arange(num_points, device=x.device, dtype=x.dtype)
        query_pos = torch.arange(s, device=x.device, dtype=x.dtype)

        if self.grid == "normalized":
            length = lengths.to(x.dtype)[:, None, None]
            # the reference's normalised key coordinate (its vgrid_scaled); v = grid + offsets in cells
            u = 2.0 * (grid + offsets) / (points - 1).clamp(min=1)[:, None, None] - 1.0
            pos = ((u + 1) * length - 1) / 2  # grid_sample's unnormalisation (align_corners=False)
            query_u = 2.0 * query_pos / (lengths - 1).clamp(min=1)[:, None] - 1.0  # (B, S)
            rel = query_u[:, None, :, None] - u[:, :, None, :]
        else:
            start = torch.arange(num_points, device=x.device) * f
            in_block = (lengths[:, None] - start[None]).clamp(min=1, max=f)  # (B, M)
            ref = (start[None] + (in_block - 1) / 2).to(x.dtype)[:, None]  # (B, 1, M)
            pos = torch.minimum((ref + f * offsets).clamp(min=0), last.to(x.dtype))
            rel = query_pos[None, None, :, None] - pos[:, :, None, :]

        # linear interpolation between the two neighbouring slices; slices outside [0, L - 1] read as zeros
        # (with grid="centred" positions are already inside)
        lo_i = pos.detach().floor().long()
        hi_i = lo_i + 1
        w_hi = pos - lo_i.to(pos.dtype)
        w_lo = 1 - w_hi
        w_lo = w_lo * ((lo_i >= 0) & (lo_i <= last))
        w_hi = w_hi * ((hi_i >= 0) & (hi_i <= last))

        def gather(idx: torch.Tensor) -> torch.Tensor:
            idx = torch.minimum(idx.clamp(min=0), last)
            return kv.gather(3, idx[None, ..., None].expand(2, -1, -1, -1, dh))

        # one dtype for the weights: under autocast kv is half precision while positions stay float32
        k, v = (
            gather(lo_i) * w_lo[None, ..., None].to(kv.dtype)
            + gather(hi_i) * w_hi[None, ..., None].to(kv.dtype)
        ).unbind(0)

        key_valid = torch.arange(num_points, device=x.device)[None] < points[:, None]  # (B, M)
        bias = self.rel_pos_bias(rel).masked_fill(~key_valid[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        out = self.to_out(out.transpose(1, 2).reshape(b, s, h * dh))
        extra: list[torch.Tensor] = [pos] if return_positions else []
        if return_attention:
            with torch.no_grad():
                logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(dh) + bias.float()
                weights = logits.softmax(dim=-1)  # (B, H, S, M)
                attention = weights.new_zeros(b, h, s, s)
                for idx, w in ((lo_i, w_lo), (hi_i, w_hi)):
                    index = torch.minimum(idx.clamp(min=0), last)[:, :, None, :].expand(-1, -1, s, -1)
                    attention.scatter_add_(3, index, weights * w.float()[:, :, None, :])
            extra.append(attention)
        return (out, *extra) if extra else out
