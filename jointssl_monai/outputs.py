"""Typed containers passed between the data layer, the networks, the losses and the trainer.

They fix the contract between the parts, so that each can be built and tested on its own:

- the collate function of ``jointssl_monai.data`` returns a dict with the keys of :data:`BATCH_KEYS`;
- :class:`jointssl_monai.networks.JointSSLNet` returns a :class:`JointSSLOutput`;
- :class:`jointssl_monai.losses.JointSSLLoss` consumes it.

Conventions:

- Two global views ``s`` and ``t`` of every sample. For volumes, slice position ``i`` of view ``s`` and slice
  position ``i`` of view ``t`` come from the same slice of the source volume (view transforms keep the slice
  axis), so slice-level (intra) clustering can pair them.
- A 2D image is a one-slice sample: it feeds the intra level only.
- Intra rows are ordered: every valid slice of every volume (volume-major, then slice position), then every
  2D image. ``intra_source`` maps each row to its sample in the concatenation ``[volumes..., images...]`` and
  ``intra_slice`` to its slice position (0 for 2D images), so that the trainer can build memory-bank keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BATCH_KEYS", "ClusterBranch", "JointSSLOutput"]

#: Keys of a collated pretraining batch. Volume or image entries are ``None`` when the batch holds none.
BATCH_KEYS = (
    "volume_views",  # list of 2 tensors (B, C, S, H, W); padded slices are zeros
    "num_slices",  # (B,) long: valid slices per volume, 1 <= num_slices <= S
    "volume_index",  # (B,) long: dataset index of each volume
    "image_views",  # list of 2 tensors (B2, C, H, W)
    "image_index",  # (B2,) long: dataset index of each 2D image
    "image_local_views",  # optional list of tensors (B2, C, h, w): extra small crops (multi-crop), or None
    "skipped_inputs",  # list of (file, reason) of the items left out as bad inputs (skip_bad_inputs)
)


@dataclass
class ClusterBranch:
    """Projected embeddings and prototype scores of one clustering level, for every view.

    Attributes:
        embeddings: per global view, ``(N, D)`` L2-normalised projections; row ``i`` is the same item in
            every view.
        scores: per global view, per prototype head, ``(N, K_h)`` cosine scores ``embeddings @ prototypes.T``
            (prototypes L2-normalised; no temperature applied).
        local_scores: per extra local view (multi-crop), per head, ``(N_local, K_h)`` scores; empty without
            multi-crop.
        local_rows: ``(N_local,)`` long, the rows of the global views that the local views belong to.
    """

    embeddings: list[torch.Tensor]
    scores: list[list[torch.Tensor]]
    local_scores: list[list[torch.Tensor]] = field(default_factory=list)
    local_rows: torch.Tensor | None = None

    @property
    def num_views(self) -> int:
        return len(self.embeddings)


@dataclass
class JointSSLOutput:
    """What one forward pass of the pretraining network returns for the three objectives.

    Attributes:
        intra: slice/image level branch (``L_intra``); ``None`` when disabled.
        inter: volume level branch (``L_inter``), rows are volumes; ``None`` without volumes or when disabled.
        intra_source: ``(N_intra,)`` long, sample of each intra row in ``[volumes..., images...]``.
        intra_slice: ``(N_intra,)`` long, slice position of each intra row (0 for 2D images).
        volume_features: per global view, ``(B, d_model)`` holistic volume features ``Z``.
        masked_prediction: per masked view, ``(B, S, d_model)`` slice embeddings predicted from that view's
            masked sequence.
        masked_target: per masked view, ``(B, S, d_model)`` that view's slice embeddings before masking
            (detached).
        mask: per masked view, ``(B, S)`` bool, the positions replaced by the mask token (valid slices only).
        valid: ``(B, S)`` bool, the valid (non-padded) slice positions.
    """

    intra: ClusterBranch | None = None
    inter: ClusterBranch | None = None
    intra_source: torch.Tensor | None = None
    intra_slice: torch.Tensor | None = None
    volume_features: list[torch.Tensor] | None = None
    masked_prediction: list[torch.Tensor] | None = None
    masked_target: list[torch.Tensor] | None = None
    mask: list[torch.Tensor] | None = None
    valid: torch.Tensor | None = None

    def branch(self, level: str) -> ClusterBranch | None:
        """The ``"intra"`` or ``"inter"`` clustering branch."""
        if level not in ("intra", "inter"):
            raise ValueError(f"JointSSLOutput: level must be 'intra' or 'inter', got {level!r}.")
        return self.intra if level == "intra" else self.inter
