"""``JointSSLNet``: the whole pretraining model of joint image-volume intra-inter contrastive clustering.

Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter Contrastive
Clustering", AAAI 2023 (arXiv:2212.01893). Every slice of every volume view and every 2D image is embedded by
the slice encoder ``f_intra``; slice and image embeddings feed the intra-level clustering; the slice tokens of
each volume view are assembled by the aggregator ``f_inter`` into ``Z`` for the inter-level clustering; a
masked copy of view ``s`` feeds masked slice modelling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jointssl_monai.networks.aggregator import SliceAggregator
from jointssl_monai.networks.heads import MultiPrototypes, ProjectionHead
from jointssl_monai.networks.masked_modeling import MaskedSliceModeling
from jointssl_monai.networks.slice_encoder import SliceEncoder
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput

__all__ = ["JointSSLNet"]


class JointSSLNet(nn.Module):
    """Slice encoder + slice aggregator + masked slice modelling + intra/inter projection heads and
    prototypes.

    One forward pass takes a mixed batch (the keys of ``jointssl_monai.outputs.BATCH_KEYS``) and returns a
    :class:`~jointssl_monai.outputs.JointSSLOutput`. All global-view slices of all volumes (valid ones only)
    and all 2D images go through the slice encoder in one call (one call per distinct slice shape).

    Masked slice modelling runs on both views, as in the authors' stage B (each view's sequence gets its own
    random mask; the loss sums the views). Both views' ``Z`` come from unmasked tokens; the two unmasked and
    the two masked sequences share one aggregator call (batch ``4B``).

    The authors' staged recipe maps onto flags: stage A ``use_inter=False, use_mask=False``; stage B
    ``use_intra=False, use_inter=False, freeze_encoder=True``; stage C ``use_intra=False, use_mask=False``
    with the whole network trained, slice encoder included (their stage C optimises every parameter of
    ``ResNet_Trans``). Every part is built whatever the flags, so checkpoints of all stages share one key set;
    the parameters of a disabled branch are frozen (``requires_grad=False``) so that distributed data
    parallel does not wait for their gradients. ``freeze_encoder`` also keeps the encoder in eval mode (fixed
    BatchNorm statistics) and runs it without autograd.

    The network is built from its parts, as ``pretrain.json`` lists them; :meth:`from_settings` builds the
    parts from flat settings.

    Example::

        net = JointSSLNet.from_settings(backbone="resnet18", d_model=128, intra_prototypes=64)

    Args:
        encoder: the slice encoder ``f_intra`` (:class:`SliceEncoder`), ``(N, C, H, W) -> (N, d_model)``.
        aggregator: the slice aggregator ``f_inter`` (:class:`SliceAggregator`) over ``d_model`` tokens.
        masked_modeling: the mask token and decoder of masked slice modelling (:class:`MaskedSliceModeling`).
        intra_head: the projection head of the slice/image level (:class:`ProjectionHead`).
        inter_head: the projection head of the volume level.
        intra_prototypes: the prototypes of the slice/image level (:class:`MultiPrototypes`).
        inter_prototypes: the prototypes of the volume level.
        use_intra: compute the intra (slice/image) clustering branch.
        use_inter: compute the inter (volume) clustering branch.
        use_mask: compute masked slice modelling.
        freeze_encoder: freeze the slice encoder (authors' stage B).
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        aggregator: SliceAggregator,
        masked_modeling: MaskedSliceModeling,
        intra_head: ProjectionHead,
        inter_head: ProjectionHead,
        intra_prototypes: MultiPrototypes,
        inter_prototypes: MultiPrototypes,
        use_intra: bool = True,
        use_inter: bool = True,
        use_mask: bool = True,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        if not (use_intra or use_inter or use_mask):
            raise ValueError("JointSSLNet: at least one of use_intra, use_inter, use_mask must be True.")
        if use_mask and masked_modeling.mask_ratio == 0:
            raise ValueError("mask_ratio must be > 0 when masked slice modelling is on (w_mask > 0), got 0")
        d_model = encoder.d_model
        sizes = (
            ("aggregator.d_model", aggregator.d_model, d_model),
            ("masked_modeling.d_model", masked_modeling.d_model, d_model),
            ("intra_head.in_dim", intra_head.in_dim, d_model),
            ("inter_head.in_dim", inter_head.in_dim, d_model),
            ("intra_prototypes.dim", intra_prototypes.dim, intra_head.out_dim),
            ("inter_prototypes.dim", inter_prototypes.dim, inter_head.out_dim),
        )
        mismatches = [f"{name} is {got}, expected {want}" for name, got, want in sizes if got != want]
        if mismatches:
            raise ValueError(
                f"JointSSLNet: the parts do not fit (encoder.d_model={d_model}): " + "; ".join(mismatches)
            )
        self.use_intra, self.use_inter, self.use_mask = use_intra, use_inter, use_mask
        self.freeze_encoder = freeze_encoder
        self.in_channels = encoder.in_channels
        self.d_model = d_model
        self.encoder = encoder
        self.aggregator = aggregator
        self.masked_modeling = masked_modeling
        self.intra_head = intra_head
        self.inter_head = inter_head
        self.intra_prototypes = intra_prototypes
        self.inter_prototypes = inter_prototypes

        unused: list[nn.Module] = []
        if freeze_encoder:
            unused.append(self.encoder)
        if not use_intra:
            unused += [self.intra_head, self.intra_prototypes]
        if not use_inter:
            unused += [self.inter_head, self.inter_prototypes]
        if not use_mask:
            unused.append(self.masked_modeling)
        if not (use_inter or use_mask):
            unused.append(self.aggregator)
        for module in unused:
            module.requires_grad_(False)
        if freeze_encoder:
            self.encoder.eval()

    @classmethod
    def from_settings(
        cls,
        backbone: str = "resnet50",
        in_channels: int = 1,
        d_model: int = 640,
        multi_stage: bool = True,
        conv1_t_stride: int = 2,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        num_layers: int = 4,
        ff_dim: int = 720,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        attention: str = "deformable",
        position_encoding: bool | None = None,
        deformable_kwargs: dict | None = None,
        mask_ratio: float = 0.1,
        mask_decoder_hidden_dim: int | None = None,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        proj_num_layers: int = 2,
        proj_batch_norm: bool = True,
        inter_proj_batch_norm: bool = False,
        intra_prototypes: int | Sequence[int] = 3000,
        inter_prototypes: int | Sequence[int] = 3000,
        use_intra: bool = True,
        use_inter: bool = True,
        use_mask: bool = True,
        freeze_encoder: bool = False,
    ) -> JointSSLNet:
        """Build the parts from flat settings (the paper's values by default), in the order ``pretrain.json``
        lists them, and the network from them.

        Args:
            backbone: slice encoder: ResNet name (``resnet10`` ... ``resnet200``).
            in_channels: slice encoder: channels of a slice or image.
            d_model: slice-token and volume-feature size (every part).
            multi_stage: slice encoder: embedding from every ResNet stage (else the last stage only).
            conv1_t_stride: slice encoder: stride of the ResNet stem convolution.
            gradient_checkpointing: slice encoder: recompute activations in the backward pass.
            channels_last: slice encoder: channels-last memory format.
            num_layers: aggregator: layers.
            ff_dim: aggregator: feed-forward width.
            heads: aggregator: attention heads.
            dim_head: aggregator: size of each attention head.
            dropout: aggregator: dropout.
            attention: aggregator: ``"deformable"`` or ``"full"``.
            position_encoding: aggregator: sinusoidal slice positions (``None``: only for ``"full"``).
            deformable_kwargs: aggregator: extra arguments of :class:`DeformableAttention1D`.
            mask_ratio: masked slice modelling: fraction of valid slices masked.
            mask_decoder_hidden_dim: masked slice modelling: decoder width (default ``d_model``).
            proj_hidden_dim: projection heads: hidden width.
            proj_dim: projection heads: output (clustering space) size.
            proj_num_layers: projection heads: linear layers.
            proj_batch_norm: intra projection head: BatchNorm.
            inter_proj_batch_norm: inter projection head: BatchNorm (default off: its batch is only ``2 x``
                volumes per process, and BatchNorm over two rows encodes the difference of the views).
            intra_prototypes: prototypes of the intra level; a sequence gives several heads (DeepCluster-v2).
            inter_prototypes: prototypes of the inter level; a sequence gives several heads.
            use_intra: compute the intra (slice/image) clustering branch.
            use_inter: compute the inter (volume) clustering branch.
            use_mask: compute masked slice modelling.
            freeze_encoder: freeze the slice encoder (authors' stage B).
        """
        encoder = SliceEncoder(
            backbone, in_channels, d_model, multi_stage, conv1_t_stride, gradient_checkpointing, channels_last
        )
        aggregator = SliceAggregator(
            d_model,
            num_layers,
            ff_dim,
            heads,
            dim_head,
            dropout,
            attention,
            position_encoding,
            deformable_kwargs,
        )
        masked_modeling = MaskedSliceModeling(d_model, mask_ratio, mask_decoder_hidden_dim)
        intra_head = ProjectionHead(d_model, proj_hidden_dim, proj_dim, proj_num_layers, proj_batch_norm)
        inter_head = ProjectionHead(
            d_model, proj_hidden_dim, proj_dim, proj_num_layers, inter_proj_batch_norm
        )
        return cls(
            encoder,
            aggregator,
            masked_modeling,
            intra_head,
            inter_head,
            MultiPrototypes(proj_dim, intra_prototypes),
            MultiPrototypes(proj_dim, inter_prototypes),
            use_intra=use_intra,
            use_inter=use_inter,
            use_mask=use_mask,
            freeze_encoder=freeze_encoder,
        )

    @staticmethod
    def _check_level(level: str) -> None:
        if level not in ("intra", "inter"):
            raise ValueError(f"JointSSLNet: level must be 'intra' or 'inter', got {level!r}.")

    def prototypes(self, level: str) -> MultiPrototypes:
        """The prototype layers of the ``"intra"`` (slice/image) or ``"inter"`` (volume) clustering level."""
        self._check_level(level)
        return self.intra_prototypes if level == "intra" else self.inter_prototypes

    def projection_head(self, level: str) -> ProjectionHead:
        """The projection head of the ``"intra"`` or ``"inter"`` clustering level."""
        self._check_level(level)
        return self.intra_head if level == "intra" else self.inter_head

    def uses(self, level: str) -> bool:
        """Whether the forward pass computes the ``"intra"``, ``"inter"`` or ``"mask"`` branch."""
        return {"intra": self.use_intra, "inter": self.use_inter, "mask": self.use_mask}[level]

    def train(self, mode: bool = True) -> JointSSLNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def _check_volumes(
        self, volume_views: Sequence[torch.Tensor] | None, num_slices: torch.Tensor | None
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        if volume_views is None:
            return None, None
        views = list(volume_views)
        if len(views) != 2:
            raise ValueError(f"volume_views must hold 2 global views, got {len(views)}.")
        shape = views[0].shape
        for i, v in enumerate(views):
            if v.ndim != 5 or v.shape[1] != self.in_channels or v.shape != shape:
                raise ValueError(
                    f"volume_views[{i}] must have shape (B, {self.in_channels}, S, H, W), the same in both "
                    "views, "
                    f"got {tuple(v.shape)} (view 0: {tuple(shape)})."
                )
        b, s = shape[0], shape[2]
        device = views[0].device
        if num_slices is None:
            num_slices = torch.full((b,), s, dtype=torch.long, device=device)
        num_slices = torch.as_tensor(num_slices, device=device)
        if num_slices.shape != (b,) or bool(((num_slices < 1) | (num_slices > s)).any()):
            raise ValueError(
                f"num_slices must be (B,)=({b},) with values in [1, {s}], got {num_slices.tolist()}."
            )
        valid = torch.arange(s, device=device)[None] < num_slices[:, None]
        return views, valid

    def _check_images(
        self, image_views: Sequence[torch.Tensor] | None, name: str = "image_views", count: int | None = 2
    ) -> list[torch.Tensor] | None:
        if image_views is None:
            return None
        views = list(image_views)
        if count is not None and len(views) != count:
            raise ValueError(f"{name} must hold {count} global views, got {len(views)}.")
        for i, v in enumerate(views):
            if v.ndim != 4 or v.shape[1] != self.in_channels or v.shape[0] != views[0].shape[0]:
                raise ValueError(
                    f"{name}[{i}] must have shape (B2, {self.in_channels}, H, W) with the same B2 in every "
                    "view, "
                    f"got {tuple(v.shape)}."
                )
        return views

    def _encode(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Embed every chunk of slices, one encoder call per distinct ``(C, H, W)``; returns one tensor per
        chunk."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(chunks):
            groups.setdefault(tuple(c.shape[1:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(chunks)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            for idx in groups.values():
                emb = self.encoder(torch.cat([chunks[i] for i in idx], dim=0))
                for i, e in zip(idx, emb.split([chunks[i].shape[0] for i in idx]), strict=True):
                    out[i] = e
        return out  # type: ignore[return-value]

    @staticmethod
    def _branch(
        head: nn.Module, prototypes: MultiPrototypes, inputs: list[torch.Tensor], num_global: int
    ) -> ClusterBranch:
        """Project all views in one head call (BatchNorm sees every view), normalise, score against
        prototypes."""
        emb = F.normalize(head(torch.cat(inputs, dim=0)), dim=1)
        parts = emb.split([x.shape[0] for x in inputs])
        scores = [prototypes(p) for p in parts]
        return ClusterBranch(
            embeddings=list(parts[:num_global]), scores=scores[:num_global], local_scores=scores[num_global:]
        )

    def forward(
        self,
        volume_views: Sequence[torch.Tensor] | None = None,
        num_slices: torch.Tensor | None = None,
        image_views: Sequence[torch.Tensor] | None = None,
        image_local_views: Sequence[torch.Tensor] | None = None,
        volume_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> JointSSLOutput:
        """Run the pretraining model on a mixed batch.

        Args:
            volume_views: two views ``(B, C, S, H, W)`` of the volumes, padded slices at the end, or ``None``.
            num_slices: ``(B,)`` valid slices per volume (default: all ``S``).
            image_views: two views ``(B2, C, H, W)`` of the 2D images, or ``None``.
            image_local_views: extra small crops ``(B2, C, h, w)`` of the images (multi-crop), or ``None``.
            volume_index: dataset indices of the volumes; accepted so that a collated batch can be passed as
                ``net(**batch)``, not used.
            image_index: dataset indices of the images; accepted likewise, not used.

        Returns:
            The :class:`~jointssl_monai.outputs.JointSSLOutput` of the batch.
        """
        vols, valid = self._check_volumes(volume_views, num_slices)
        imgs = self._check_images(image_views)
        if vols is None and imgs is None:
            raise ValueError("JointSSLNet: the batch holds neither volume_views nor image_views.")
        local: list[torch.Tensor] = []
        if image_local_views is not None and self.use_intra:
            if imgs is None:
                raise ValueError("image_local_views were given without image_views.")
            local = self._check_images(image_local_views, "image_local_views", count=None) or []
            if local and local[0].shape[0] != imgs[0].shape[0]:
                raise ValueError(
                    f"image_local_views must have B2={imgs[0].shape[0]} rows, got {local[0].shape[0]}."
                )

        chunks: list[torch.Tensor] = []
        if vols is not None:
            chunks += [v.transpose(1, 2)[valid] for v in vols]  # valid slices only, volume-major
        n_vol = len(chunks)
        if imgs is not None and self.use_intra:  # 2D images feed the intra level only
            chunks += imgs
        n_img_views = len(chunks) - n_vol
        chunks += local
        embedded = self._encode(chunks)
        vol_emb, img_emb = embedded[:n_vol], embedded[n_vol : n_vol + n_img_views]
        local_emb = embedded[n_vol + n_img_views :]

        out = JointSSLOutput(valid=valid)
        device = (vols or imgs)[0].device  # type: ignore[index]
        n_img = imgs[0].shape[0] if imgs is not None else 0
        source, slice_pos = [], []
        if vols is not None:
            b_idx, s_idx = valid.nonzero(as_tuple=True)  # type: ignore[union-attr]
            source.append(b_idx)
            slice_pos.append(s_idx)
        n_volumes = vols[0].shape[0] if vols is not None else 0
        source.append(n_volumes + torch.arange(n_img, device=device))
        slice_pos.append(torch.zeros(n_img, dtype=torch.long, device=device))
        out.intra_source, out.intra_slice = torch.cat(source), torch.cat(slice_pos)

        if self.use_intra:
            rows = [torch.cat(vol_emb[v : v + 1] + img_emb[v : v + 1], dim=0) for v in range(2)]
            out.intra = self._branch(self.intra_head, self.intra_prototypes, rows + local_emb, num_global=2)
            if local_emb:
                out.intra.local_rows = out.intra_source.shape[0] - n_img + torch.arange(n_img, device=device)

        if vols is not None and (self.use_inter or self.use_mask):
            b, s = valid.shape  # type: ignore[union-attr]
            tokens = [
                e.new_zeros(b, s, self.d_model).masked_scatter(valid[..., None], e)  # type: ignore[index]
                for e in vol_emb
            ]
            seqs = list(tokens) if self.use_inter else []
            masks = []
            if self.use_mask:
                masks = [self.masked_modeling.sample_mask(valid) for _ in tokens]  # type: ignore[arg-type]
                seqs += [self.masked_modeling.mask_tokens(t, m) for t, m in zip(tokens, masks, strict=True)]
            ctx, z = self.aggregator(torch.cat(seqs, dim=0), valid.repeat(len(seqs), 1))  # type: ignore[union-attr]
            if self.use_inter:
                out.volume_features = [z[:b], z[b : 2 * b]]
                out.inter = self._branch(self.inter_head, self.inter_prototypes, out.volume_features, 2)
            if self.use_mask:
                decoded = (
                    self.masked_modeling(ctx[-len(masks) * b :]) * valid.repeat(len(masks), 1)[..., None]
                )  # type: ignore[union-attr]
                out.masked_prediction = list(decoded.split(b))
                out.masked_target = [t.detach() for t in tokens]
                out.mask = masks
        return out
