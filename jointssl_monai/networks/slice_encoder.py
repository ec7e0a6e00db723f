"""Slice encoder ``f_intra``: a MONAI 2D ResNet that embeds every slice (or 2D image) into one vector.

Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter Contrastive
Clustering", AAAI 2023 (arXiv:2212.01893), Fig. 2: every 2D slice is embedded by a 2D CNN ``f_intra``.
Following the authors' released code, the embedding is the global-average-pooled output of every ResNet stage,
each L2-normalised, concatenated and linearly projected to ``d_model`` (640 by default).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNetFeatures
from monai.networks.nets.resnet import ResNetEncoder
from torch import nn
from torch.utils.checkpoint import checkpoint

from jointssl_monai.utils.arguments import check_int

__all__ = ["SliceEncoder"]


class SliceEncoder(nn.Module):
    """2D ResNet slice encoder whose backbone weights drop into ``FlexibleUNet(backbone=...).encoder``.

    The backbone is MONAI's :class:`~monai.networks.nets.ResNetFeatures` (``spatial_dims=2``), kept at
    :attr:`resnet`; its state dict has exactly the key set of ``FlexibleUNet(in_channels, out_channels,
    backbone=backbone, spatial_dims=2).encoder``, so :meth:`encoder_state_dict` can be copied there with
    ``monai.networks.utils.copy_model_state(unet.encoder, encoder.encoder_state_dict())``.

    Args:
        backbone: ResNet name, one of ``resnet10, resnet18, resnet34, resnet50, resnet101, resnet152,
        resnet200``.
        in_channels: number of input channels of a slice.
        d_model: size of the slice embedding.
        multi_stage: pool the output of every stage (``layer1`` to ``layer4``), L2-normalise each and
            concatenate them before the projection (the authors' choice); ``False`` uses ``layer4`` only.
        conv1_t_stride: stride of the 7x7 stem convolution. ``2`` is what ``ResNetFeatures`` and
            ``FlexibleUNet`` use, so pretrained filters see the scale they see after transfer; ``1`` keeps
            full resolution in the stem at about 3x the time and memory of a training pass.
            The stride is not part of the state dict, so either value keeps the FlexibleUNet key set.
        gradient_checkpointing: recompute the stem and each stage in the backward pass instead of storing
            their activations (less memory, about one extra forward of compute). BatchNorm running
            statistics are updated again during recomputation.
        channels_last: run the backbone in ``torch.channels_last`` memory format.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        in_channels: int = 1,
        d_model: int = 640,
        multi_stage: bool = True,
        conv1_t_stride: int = 2,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        names = ResNetEncoder.backbone_names
        check_int("in_channels", in_channels, 1)
        check_int("d_model", d_model, 1)
        if backbone not in names:
            raise ValueError(f"SliceEncoder: unknown backbone {backbone!r}, expected one of {names}.")
        if conv1_t_stride not in (1, 2):
            raise ValueError(f"SliceEncoder: conv1_t_stride must be 1 or 2, got {conv1_t_stride}.")
        self.backbone = backbone
        self.in_channels = in_channels
        self.d_model = d_model
        self.multi_stage = multi_stage
        self.conv1_t_stride = conv1_t_stride
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last

        self.resnet = ResNetFeatures(backbone, pretrained=False, spatial_dims=2, in_channels=in_channels)
        # ResNetFeatures hard-codes a stride-2 stem; the stride is a hyper-parameter, not a weight.
        self.resnet.conv1.stride = (conv1_t_stride, conv1_t_stride)
        stage_channels = ResNetEncoder.num_channels_per_output()[names.index(backbone)][1:]
        self.stage_channels = tuple(stage_channels)
        in_features = sum(stage_channels) if multi_stage else stage_channels[-1]
        self.proj = nn.Linear(in_features, d_model)
        if channels_last:
            self.resnet.to(memory_format=torch.channels_last)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(x)))
        return x if r.no_max_pool else r.maxpool(x)

    def _run(self, fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of slices.

        Args:
            x: ``(N, in_channels, H, W)`` slices or 2D images.

        Returns:
            ``(N, d_model)`` slice embeddings.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SliceEncoder: slices must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self._run(self._stem, x)
        pooled = []
        for stage in (self.resnet.layer1, self.resnet.layer2, self.resnet.layer3, self.resnet.layer4):
            h = self._run(stage, h)
            if self.multi_stage or stage is self.resnet.layer4:
                pooled.append(F.normalize(h.mean(dim=(2, 3)), dim=1))
        return self.proj(torch.cat(pooled, dim=1))

    def encoder_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """Backbone weights named exactly as ``FlexibleUNet(backbone=self.backbone,
        spatial_dims=2).encoder``."""
        return self.resnet.state_dict()
