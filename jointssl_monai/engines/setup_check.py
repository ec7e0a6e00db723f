"""The pretraining set-up check: what crosses the network, the loss and the data, which no constructor sees.

Each part validates its own arguments when it is built; :func:`check_pretrain_setup` refuses the
combinations in which a clustering level or a projection head cannot learn (too few rows for the prototypes,
stale copies in a queue, BatchNorm over a handful of rows), before any work starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from jointssl_monai.losses import JointSSLLoss
    from jointssl_monai.networks import JointSSLNet

__all__ = ["MIN_BATCH_NORM_ROWS", "MIN_KMEANS_ROWS_PER_CLUSTER", "check_pretrain_setup", "queue_room"]

#: Fewest rows a projection head's BatchNorm may normalise per process and call.
MIN_BATCH_NORM_ROWS = 8
#: k-means (DeepCluster-v2) needs at least this many bank rows per cluster, or clusters hold single items.
MIN_KMEANS_ROWS_PER_CLUSTER = 2


def queue_room(data_rows: int, step_rows: int, world_size: int = 1) -> int:
    """Longest per-process SwAV queue that holds no stale copy of a current item.

    The processes' queues and batches together must not hold more rows than the data set has:
    ``world_size * (queue + step_rows) <= data_rows``.
    """
    return max(0, data_rows // max(1, world_size) - step_rows)


def _has_batch_norm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def check_pretrain_setup(
    network: JointSSLNet,
    loss: JointSSLLoss,
    volumes_per_batch: int,
    images_per_batch: int,
    num_slices: int,
    num_volumes: int | None = None,
    num_images: int | None = None,
    world_size: int | None = None,
) -> None:
    """Refuse set-ups in which a clustering level or a projection head cannot learn, before any work.

    What crosses components, and so no constructor can check:

    - **K below the rows clustered.** SwAV's Sinkhorn spreads the rows of a step (all processes, plus the
      queue) equally over the ``K`` prototypes: with fewer rows than prototypes every row is its own cluster
      (SwAV itself clusters 4096 rows into 3000). DeepCluster-v2's k-means clusters the bank (one row per
      slice or volume of the data set) and needs ``MIN_KMEANS_ROWS_PER_CLUSTER`` rows per cluster, or most
      centroids hold one item or stay empty.
    - **No stale duplicates in a SwAV queue.** A queue longer than :func:`queue_room` holds old copies of
      the very items of the current batch, which the equal partition then has to split apart (a volume-level
      queue of 256 over 32 volumes made the volume-level loss climb far above ``log K``).
    - **BatchNorm over enough rows.** A projection head with BatchNorm sees both views of the rows of one
      process; with fewer than ``MIN_BATCH_NORM_ROWS`` rows it encodes the difference between the views.

    Args:
        network: the :class:`~jointssl_monai.networks.JointSSLNet`.
        loss: the :class:`~jointssl_monai.losses.JointSSLLoss`.
        volumes_per_batch: volumes per step and process.
        images_per_batch: 2D images per step and process.
        num_slices: slices per volume sample (an upper bound of the valid slices).
        num_volumes: volumes in the data set (enables the data-set checks).
        num_images: 2D images in the data set.
        world_size: processes (default: the initialised process group's size, else 1).

    Raises:
        ValueError: naming every problem with the config keys and numbers involved.
    """
    from jointssl_monai.utils.dist import world_size as current_world_size

    world = int(world_size or current_world_size())
    levels = {
        "intra": (
            network.uses("intra"),
            volumes_per_batch * num_slices + images_per_batch,
            None if num_volumes is None else num_volumes * num_slices + (num_images or 0),
            "slice/image rows",
        ),
        "inter": (network.uses("inter") and volumes_per_batch > 0, volumes_per_batch, num_volumes, "volumes"),
    }
    problems = []
    for level, (active, step_rows, data_rows, what) in levels.items():
        criterion = loss.level(level)
        if not active or criterion is None:
            continue
        k = max(network.prototypes(level).num_prototypes)
        if loss.method(level) == "swav":
            rows = world * (step_rows + criterion.queue_length)
            if rows < k:
                problems.append(
                    f"{level}_prototypes = {k} with swav: Sinkhorn clusters {rows} {what} per step "
                    f"({world} process(es) x ({step_rows} per step + {level}_queue_length "
                    f"{criterion.queue_length})); use at most {rows} prototypes or a longer queue"
                )
            room = None if data_rows is None else queue_room(data_rows, step_rows, world)
            if room is not None and criterion.queue_length > room:
                problems.append(
                    f"{level}_queue_length = {criterion.queue_length} with {data_rows} {what} in the data "
                    f"set and {step_rows * world} per step: the queue would hold stale copies of the batch's "
                    f"own items; use at most {room}"
                )
        else:  # deepcluster
            rows = criterion.num_samples if data_rows is None else min(data_rows, criterion.num_samples)
            if rows < MIN_KMEANS_ROWS_PER_CLUSTER * k:
                problems.append(
                    f"{level}_prototypes = {k} with deepcluster: k-means clusters a bank of {rows} {what}; "
                    f"use at most {rows // MIN_KMEANS_ROWS_PER_CLUSTER} prototypes per head"
                )
    heads = {"intra": 2 * (volumes_per_batch * num_slices + images_per_batch), "inter": 2 * volumes_per_batch}
    for level, rows in heads.items():
        head = network.projection_head(level)
        trained = any(p.requires_grad for p in head.parameters())
        if trained and _has_batch_norm(head) and rows < MIN_BATCH_NORM_ROWS:
            key = "proj_batch_norm" if level == "intra" else "inter_proj_batch_norm"
            problems.append(
                f"{key} = true: the {level} projection head's BatchNorm would normalise {rows} rows per "
                f"process (both views); it needs at least {MIN_BATCH_NORM_ROWS}: turn it off or batch more"
            )
    if problems:
        raise ValueError(
            f"pretraining set-up refused ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems)
        )
