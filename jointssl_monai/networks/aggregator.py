"""Slice aggregator ``f_inter``: a post-norm Transformer over slice tokens, pooled into the volume feature
``Z``.

Nguyen et al. (AAAI 2023, arXiv:2212.01893), Fig. 2: the slice embeddings of a volume are assembled by a
Transformer with deformable self-attention into one holistic volume feature ``Z``. Defaults follow the
authors' released code: 4 post-norm layers, feed-forward 720, GELU, dropout 0.1, no class token, ``Z`` = mean
over (valid) slices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jointssl_monai.networks.deformable_attention import DeformableAttention1D, check_prefix_mask
from jointssl_monai.utils.arguments import check_int

__all__ = ["FullAttention1D", "SliceAggregator", "SliceTransformerLayer", "sinusoidal_position_encoding"]


def sinusoidal_position_encoding(num_positions: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed sine/cosine encoding ``(num_positions, dim)`` of slice positions (Vaswani et al., 2017)."""
    pos = torch.arange(num_positions, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_positions, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe.to(dtype) if dtype is not None else pe


class FullAttention1D(nn.Module):
    """Multi-head self-attention over all valid slices with ``F.scaled_dot_product_attention`` (bias-free
    query/key/value projection).

    Args:
        dim: token size.
        heads: number of heads.
        dim_head: size of each head.
        dropout: dropout on the attention weights.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend over slices; ``return_attention`` also returns the softmax weights ``(B, heads, S, S)``
        (float32, without dropout; computed beside the output, which does not change)."""
        b, s, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, s, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.to_out(out.transpose(1, 2).reshape(b, s, -1))
        if not return_attention:
            return out
        with torch.no_grad():
            logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.dim_head)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            attention = logits.softmax(dim=-1)
        return out, attention


class SliceTransformerLayer(nn.Module):
    """Post-norm Transformer layer: ``x = LN(x + Attn(x)); x = LN(x + FF(x))`` with a GELU feed-forward.

    Args:
        d_model: token size.
        ff_dim: hidden width of the feed-forward block.
        heads: number of attention heads.
        dim_head: size of each head.
        dropout: dropout on the residual branches, inside the feed-forward and on the attention weights.
        attention: ``"deformable"`` (:class:`DeformableAttention1D`) or ``"full"`` (:class:`FullAttention1D`).
        deformable_kwargs: extra arguments of :class:`DeformableAttention1D`.
    """

    def __init__(
        self,
        d_model: int,
        ff_dim: int,
        heads: int,
        dim_head: int,
        dropout: float,
        attention: str = "deformable",
        deformable_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if attention == "deformable":
            self.attn: nn.Module = DeformableAttention1D(
                d_model, heads=heads, dim_head=dim_head, dropout=dropout, **(deformable_kwargs or {})
            )
        elif attention == "full":
            self.attn = FullAttention1D(d_model, heads=heads, dim_head=dim_head, dropout=dropout)
        else:
            raise ValueError(f"attention must be 'deformable' or 'full', got {attention!r}.")
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model)
        )
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer; ``return_attention`` also returns the attention over slices ``(B, heads, S, S)``."""
        if return_attention:
            a, attention = self.attn(x, valid, return_attention=True)
        else:
            a = self.attn(x, valid)
        x = self.norm1(x + self.drop1(a))
        x = self.norm2(x + self.drop2(self.ff(x)))
        return (x, attention) if return_attention else x


class SliceAggregator(nn.Module):
    """Transformer over the slice tokens of each volume and masked mean pooling into ``Z``.

    Attention runs over slices as tokens (the paper's wording); the released code's variant with slices as
    channels is not provided.

    Args:
        d_model: token size.
        num_layers: number of Transformer layers.
        ff_dim: feed-forward width.
        heads: attention heads.
        dim_head: size of each head.
        dropout: dropout rate.
        attention: ``"deformable"`` (default) or ``"full"``.
        position_encoding: add a sinusoidal slice position encoding to the input tokens. ``None`` means on for
            ``"full"`` (which is otherwise blind to slice order) and off for ``"deformable"`` (whose relative
            position bias already carries order).
        deformable_kwargs: extra arguments of :class:`DeformableAttention1D` (``downsample_factor``,
            ``offset_kernel_size``, ``offset_scale`` in downsampled grid cells, ``grid``,
            ``grouped_projections``, ``cpb_hidden_dim``, ``cpb_depth``, ``cpb_log_distance``).
    """

    def __init__(
        self,
        d_model: int = 640,
        num_layers: int = 4,
        ff_dim: int = 720,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        attention: str = "deformable",
        position_encoding: bool | None = None,
        deformable_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_layers", num_layers, 0)
        check_int("ff_dim", ff_dim, 1)
        self.d_model = d_model
        self.position_encoding = attention == "full" if position_encoding is None else position_encoding
        self.layers = nn.ModuleList(
            SliceTransformerLayer(d_model, ff_dim, heads, dim_head, dropout, attention, deformable_kwargs)
            for _ in range(num_layers)
        )

    def forward(
        self, tokens: torch.Tensor, valid: torch.Tensor | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Contextualise slice tokens and pool them.

        Args:
            tokens: ``(B, S, d_model)`` slice embeddings.
            valid: optional ``(B, S)`` bool, True at real slices (a prefix of every row).
            return_attention: also return the attention over slices of every layer, a list of
                ``(B, heads, S, S)`` float32 tensors (query slice, key slice; see
                :meth:`DeformableAttention1D.forward`). The outputs do not change.

        Returns:
            ``(B, S, d_model)`` output tokens (zeros at padded slices) and ``Z``, ``(B, d_model)``, the mean
            of the output tokens over valid slices; then the attention list if asked.
        """
        if tokens.ndim != 3 or tokens.shape[-1] != self.d_model:
            raise ValueError(
                f"SliceAggregator: tokens must be (B, S, {self.d_model}), got {tuple(tokens.shape)}."
            )
        b, s, _ = tokens.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=tokens.device)
        lengths = check_prefix_mask(valid, (b, s))
        x = tokens
        if self.position_encoding:
            x = x + sinusoidal_position_encoding(s, self.d_model, tokens.device, tokens.dtype)
        attentions = []
        for layer in self.layers:
            if return_attention:
                x, attention = layer(x, valid, return_attention=True)
                attentions.append(attention)
            else:
                x = layer(x, valid)
        x = x * valid[..., None]
        z = x.sum(dim=1) / lengths[:, None].to(x.dtype)
        return (x, z, attentions) if return_attention else (x, z)
