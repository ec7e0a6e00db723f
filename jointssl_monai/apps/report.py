"""``jointssl report RUN_DIR --output report/``: one static HTML page with PNG figures of what a run learned.

A run folder is the ``bundle_root`` of a pretraining run (``jointssl demo`` writes ``runs/demo``), holding

- ``runs/pretrain/history.json`` (per-epoch averages) and TensorBoard events (per-iteration scalars),
- ``models/ssl/checkpoints/checkpoint_final.pt`` (or the newest checkpoint) and ``models/ssl/encoder.json``,
- ``datalist.json`` (the demo writes it; pass ``datalist`` otherwise),
- optionally a fine-tuning output of ``bundle/configs/train.json`` in the same root: ``models/model.pt`` and
  predicted masks ``eval/*_seg.nii.gz`` (written by ``inference.json`` or ``evaluate.json``).

The figures: loss curves per component; code entropy, clusters in use, largest cluster share and slice-token
spread over time; cluster occupancy; a 2D map (PCA, and t-SNE when scikit-learn is installed) of slice and
volume embeddings coloured by modality and source; a nearest-neighbour grid (query slices and their closest
slices from other sources); attention over slices for a few volumes; and, for a fine-tuning output, the
predicted masks over the real slices with Dice per case.

Embeddings come from the network rebuilt from the checkpoint (its sizes are read from the weights' shapes and
the encoder card; what the weights cannot tell, such as the stem stride, takes the bundle's default and may be
overridden with ``network``) applied to the deterministic part of the pretraining pipeline (load, orientation,
intensity scaling, slice sequence, in-plane resize) without augmentation.

Plotting needs matplotlib (the ``report`` extra, ``pip install "jointssl-monai[report]"``); it is imported
only when a report is made. Nothing here is imported by the core package.
"""

from __future__ import annotations

import copy
import html
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jointssl_monai.apps.value_report import VALUE_FILE, draw_value, load_value_results, value_table

__all__ = [
    "DPI",
    "FIGURES",
    "REPORT_EXTRA",
    "Embeddings",
    "MissingPlottingError",
    "RunFolder",
    "embed_run",
    "figure_pixels",
    "find_run",
    "infer_network_kwargs",
    "make_report",
    "rebuild_network",
    "require_matplotlib",
    "segmentation_cases",
]

logger = logging.getLogger(__name__)

#: What to install when matplotlib is missing.
REPORT_EXTRA = 'pip install "jointssl-monai[report]"'
#: Resolution of every figure; sizes below are in inches, so a figure is ``inches * DPI`` pixels.
DPI = 100
#: File name: (title, size in inches). Every figure has this exact size, whatever it shows.
FIGURES: dict[str, tuple[str, tuple[int, int]]] = {
    "loss_curves.png": ("Loss per component", (12, 7)),
    "cluster_health.png": ("Code entropy, clusters in use, largest cluster, slice-token spread", (12, 7)),
    "cluster_occupancy.png": ("Cluster occupancy", (12, 6)),
    "embedding_pca.png": ("Embedding map (PCA)", (15, 5)),
    "embedding_tsne.png": ("Embedding map (t-SNE)", (12, 5)),
    "nearest_neighbours.png": ("Nearest-neighbour slices", (12, 8)),
    "slice_attention.png": ("Attention over slices", (12, 4)),
    "segmentation_overlays.png": ("Segmentation overlays", (12, 6)),
    "ssl_value.png": ("Does the pretraining help? (value benchmark)", (12, 6)),
}
LOSSES = (
    ("loss", "total (weighted sum)"),
    ("loss_intra", "intra: slice/image clustering"),
    ("loss_inter", "inter: volume clustering"),
    ("loss_mask", "masked slice modelling"),
)
LEVELS = ("intra", "inter")
#: The deterministic slice policy that stands for a random one of the run (no augmentation in the report).
DETERMINISTIC_POLICY = {"random": "center", "random_stride": "stride"}
#: The thresholds of ``ClusterHealthHandler`` (its defaults): largest share and token spread of a collapse.
COLLAPSE_SHARE = 0.9
MIN_TOKEN_SPREAD = 1e-3


class MissingPlottingError(ImportError):
    """matplotlib is not installed (the ``report`` extra)."""


def require_matplotlib() -> None:
    """Raise :class:`MissingPlottingError` with the install line when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise MissingPlottingError(
            f"jointssl report needs matplotlib, which is not installed: {REPORT_EXTRA}"
        ) from err


def figure_pixels(name: str) -> tuple[int, int]:
    """Width and height in pixels of the figure file ``name`` (a key of :data:`FIGURES`)."""
    w, h = FIGURES[name][1]
    return w * DPI, h * DPI


# ---------------------------------------------------------------------------------------------- run folder


@dataclass
class RunFolder:
    """The files of a run folder that the report reads (``None`` where absent)."""

    root: Path
    history: list[dict[str, Any]]
    log_dir: Path
    checkpoint: Path | None
    card: dict[str, Any]
    datalist: Path | None

    @property
    def finetuned_model(self) -> Path:
        return self.root / "models" / "model.pt"


def find_run(run_dir: str | Path, datalist: str | Path | None = None, checkpoint: str | Path | None = None):
    """Locate the logs, checkpoint, encoder card and datalist of the run in ``run_dir`` (its bundle root).

    Raises:
        FileNotFoundError: ``run_dir`` holds neither a loss history nor a checkpoint.
    """
    from jointssl_monai.utils.checkpoints import latest_checkpoint

    root = Path(run_dir)
    log_dir = root / "runs" / "pretrain"
    history_file = log_dir / "history.json"
    history = json.loads(history_file.read_text()).get("epochs", []) if history_file.is_file() else []
    ckpt_dir = root / "models" / "ssl" / "checkpoints"
    if checkpoint is not None:
        ckpt: Path | None = Path(checkpoint)
    elif (ckpt_dir / "checkpoint_final.pt").is_file():
        ckpt = ckpt_dir / "checkpoint_final.pt"
    else:
        newest = latest_checkpoint(ckpt_dir)
        ckpt = Path(newest) if newest else None
    if not history and ckpt is None:
        raise FileNotFoundError(
            f"{root} is not a pretraining run folder: neither runs/pretrain/history.json nor a checkpoint in "
            "models/ssl/checkpoints (pass the bundle_root of the run, e.g. runs/demo)"
        )
    card_file = root / "models" / "ssl" / "encoder.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    data = Path(datalist) if datalist is not None else root / "datalist.json"
    return RunFolder(root, history, log_dir, ckpt, card, data if data.is_file() else None)


def read_scalars(log_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-iteration scalars of the TensorBoard events in ``log_dir``: ``{tag: (steps, values)}``."""
    if not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return {}
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
    return out


# ------------------------------------------------------------------------------------------------ network


def _linear_indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.weight$")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k)) and state[k].ndim == 2]
    return sorted(found)


def infer_network_kwargs(
    state: Mapping[str, torch.Tensor], card: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``JointSSLNet`` arguments read from a network state dict (and the encoder card), and the assumptions
    made for what the weights do not tell.

    Raises:
        ValueError: the state dict is not a ``JointSSLNet``'s.
    """
    from monai.networks.nets.resnet import ResNetEncoder

    from jointssl_monai.transfer import guess_resnet_name

    card = dict(card or {})
    if "encoder.proj.weight" not in state or "aggregator.layers.0.norm1.weight" not in state:
        raise ValueError(
            "the checkpoint's network is not a jointssl_monai JointSSLNet (no encoder/aggregator)"
        )
    resnet = {k[len("encoder.resnet.") :]: v for k, v in state.items() if k.startswith("encoder.resnet.")}
    backbone = card.get("backbone") or guess_resnet_name(resnet)
    if backbone is None:
        raise ValueError("cannot tell the slice encoder's backbone; pass network={'backbone': ...}")
    proj = state["encoder.proj.weight"]
    d_model = int(proj.shape[0])
    stages = ResNetEncoder.num_channels_per_output()[ResNetEncoder.backbone_names.index(backbone)][1:]
    kw: dict[str, Any] = {
        "backbone": backbone,
        "in_channels": int(resnet["conv1.weight"].shape[1]),
        "d_model": d_model,
        "multi_stage": int(proj.shape[1]) == sum(stages),
    }
    heads = {}
    for level in LEVELS:
        linears = _linear_indices(state, f"{level}_head.mlp")
        bn = any(k.startswith(f"{level}_head.mlp.") and k.endswith("running_mean") for k in state)
        out = int(state[f"{level}_head.mlp.{linears[-1]}.weight"].shape[0])
        hidden = int(state[f"{level}_head.mlp.{linears[0]}.weight"].shape[0]) if len(linears) > 1 else out
        heads[level] = (hidden, out, len(linears), bn)
    kw.update(
        proj_hidden_dim=heads["intra"][0],
        proj_dim=heads["intra"][1],
        proj_num_layers=heads["intra"][2],
        proj_batch_norm=heads["intra"][3],
        inter_proj_batch_norm=heads["inter"][3],
    )
    for level in LEVELS:
        count = len(_linear_indices(state, f"{level}_prototypes.heads"))
        kw[f"{level}_prototypes"] = [
            int(state[f"{level}_prototypes.heads.{h}.weight"].shape[0]) for h in range(count)
        ]
    layers = len({m.group(1) for k in state if (m := re.match(r"aggregator\.layers\.(\d+)\.", k))})
    kw["num_layers"] = layers
    kw["ff_dim"] = int(state["aggregator.layers.0.ff.0.weight"].shape[0])
    kw["mask_decoder_hidden_dim"] = int(state["masked_modeling.decoder.0.weight"].shape[0])
    assumed = ["ResNet stem stride 2 (conv1_t_stride, not stored in the weights)"]
    offsets = state.get("aggregator.layers.0.attn.to_offsets.0.weight")
    if offsets is not None:
        dim_head, kernel = int(offsets.shape[0]), int(offsets.shape[2])
        to_q = state["aggregator.layers.0.attn.to_q.weight"]
        cpb = _linear_indices(state, "aggregator.layers.0.attn.rel_pos_bias.mlp")
        kw.update(attention="deformable", dim_head=dim_head, heads=int(to_q.shape[0]) // dim_head)
        kw["deformable_kwargs"] = {
            "offset_kernel_size": kernel,
            "downsample_factor": min(4, kernel),
            "grouped_projections": int(to_q.shape[1]) != d_model,
            "cpb_hidden_dim": int(
                state[f"aggregator.layers.0.attn.rel_pos_bias.mlp.{cpb[0]}.weight"].shape[0]
            ),
            "cpb_depth": len(cpb) - 1,
        }
        assumed.append("deformable attention with the bundle's key downsampling (4), offset scale and grid")
    else:
        inner = int(state["aggregator.layers.0.attn.to_qkv.weight"].shape[0]) // 3
        dim_head = 64 if inner % 64 == 0 else inner
        kw.update(attention="full", heads=inner // dim_head, dim_head=dim_head)
        assumed.append(
            f"full attention split as {inner // dim_head} heads of {dim_head} (not in the weights)"
        )
    return kw, assumed


def rebuild_network(
    state: Mapping[str, torch.Tensor], card: Mapping[str, Any] | None = None, overrides: dict | None = None
):
    """The ``JointSSLNet`` of a checkpoint's network state, weights loaded (strictly), in eval mode.

    Returns:
        ``(network, kwargs, assumptions)``.
    """
    from jointssl_monai.networks import JointSSLNet

    kwargs, assumed = infer_network_kwargs(state, card)
    kwargs.update(overrides or {})
    if overrides:
        assumed.append(f"overridden: {overrides}")
    net = JointSSLNet.from_settings(**kwargs)
    try:
        net.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the rebuilt network ({kwargs}) does not match the checkpoint; pass the run's settings with "
            f"network={{...}}: {err}"
        ) from err
    net.intra_prototypes.normalize_()  # training normalises them before every step
    net.inter_prototypes.normalize_()
    return net.eval(), kwargs, assumed


# --------------------------------------------------------------------------------------------- embeddings


@dataclass
class Embeddings:
    """What the network makes of the run's data (one row per valid slice or 2D image)."""

    items: list[dict[str, Any]]  # name, modality, dims, slices
    slice_item: np.ndarray  # (N,) row of ``items``
    slice_pos: np.ndarray  # (N,) slice position in the sequence (0 for 2D images)
    slice_emb: np.ndarray  # (N, d_model) slice-encoder embeddings
    thumbs: np.ndarray  # (N, H, W) uint8 pictures of the slices as the network saw them
    volume_item: np.ndarray  # (V,) row of ``items`` of each volume
    volume_emb: np.ndarray  # (V, d_model) volume features Z
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # item -> (layers, heads, L, L)
    intra_codes: list[np.ndarray] = field(default_factory=list)  # per prototype head, (N,)
    inter_codes: list[np.ndarray] = field(default_factory=list)  # per prototype head, (V,)
    skipped: list[str] = field(default_factory=list)


def _item_name(entry: Mapping[str, Any]) -> str:
    if entry.get("sample"):
        return str(entry["sample"])
    image = entry["image"]
    if isinstance(image, (list, tuple)):
        return Path(str(image[0])).parent.name or "series"
    name = Path(str(image)).name
    return re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", name) or name


def _subsample(n: int, limit: int) -> list[int]:
    if n <= limit:
        return list(range(n))
    return sorted({round(i) for i in np.linspace(0, n - 1, limit)})


@torch.no_grad()
def embed_run(
    network,
    entries: Sequence[Mapping[str, Any]],
    num_slices: int,
    spatial_size: Sequence[int],
    slice_policy: str = "center",
    max_items: int = 48,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> Embeddings:
    """Embed (at most ``max_items``, evenly spaced) datalist entries with the deterministic pretraining
    pipeline: slice embeddings, volume features, attention over slices, prototype assignments."""
    from jointssl_monai.data import SKIPPED_KEY, ResizeInPlaned, build_pretrain_transforms

    det, _ = build_pretrain_transforms(
        num_slices=num_slices,
        spatial_size=spatial_size,
        slice_policy=DETERMINISTIC_POLICY.get(slice_policy, slice_policy),
        skip_bad_inputs=True,
    )
    resize = ResizeInPlaned("image", spatial_size)
    items: list[dict[str, Any]] = []
    stacks: list[torch.Tensor] = []
    skipped = []
    for i in _subsample(len(entries), max_items):
        entry = dict(entries[i])
        data = det({**entry, "index": i, "modality": entry.get("modality", "OT")})
        if SKIPPED_KEY in data:
            skipped.append(str(data[SKIPPED_KEY]))
            continue
        image = torch.as_tensor(data["image"]).float()
        if image.ndim == 3:  # a 2D image keeps its size in the deterministic part
            image = torch.as_tensor(resize({"image": image})["image"]).float()[:, None]
            count = 1
        else:
            count = int(data["num_slices"])
        items.append(
            {
                "name": _item_name(entry),
                "modality": str(data.get("modality", "OT")).upper(),
                "dims": int(entry["dims"]),
                "slices": count,
            }
        )
        stacks.append(image[:, :count].transpose(0, 1))  # (L, C, H, W)
    if not items:
        raise ValueError(f"no usable image among the datalist entries: {skipped}")
    network = network.to(device)
    slices = torch.cat(stacks)
    emb = torch.cat([network.encoder(b.to(device)).float().cpu() for b in slices.split(batch_size)])
    slice_item = np.concatenate([np.full(len(s), k) for k, s in enumerate(stacks)])
    slice_pos = np.concatenate([np.arange(len(s)) for s in stacks])
    thumbs = (slices[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    volume_item, volume_emb, attention = [], [], {}
    for k, item in enumerate(items):
        if item["dims"] != 3:
            continue
        tokens = emb[slice_item == k][None].to(device)
        _, z, maps = network.aggregator(tokens, None, return_attention=True)
        volume_item.append(k)
        volume_emb.append(z.float().cpu())
        attention[k] = torch.stack([m[0] for m in maps]).cpu().numpy()
    volume_z = torch.cat(volume_emb) if volume_emb else torch.zeros(0, emb.shape[1])

    def codes(head, prototypes, x: torch.Tensor) -> list[np.ndarray]:
        if len(x) == 0:
            return [np.zeros(0, dtype=int) for _ in prototypes.heads]
        if len(x) > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules()):
            # BatchNorm with the statistics of these rows, as in training (a copy: the running statistics
            # stay as they are); the running statistics of a short run are far from its batches' and can
            # squash every row onto one prototype
            head = copy.deepcopy(head).train()
        scores = prototypes(F.normalize(head(x.to(device)), dim=1))
        return [s.argmax(dim=1).cpu().numpy() for s in scores]

    return Embeddings(
        items=items,
        slice_item=slice_item,
        slice_pos=slice_pos,
        slice_emb=emb.numpy(),
        thumbs=thumbs,
        volume_item=np.array(volume_item, dtype=int),
        volume_emb=volume_z.numpy(),
        attention=attention,
        intra_codes=codes(network.intra_head, network.intra_prototypes, emb),
        inter_codes=codes(network.inter_head, network.inter_prototypes, volume_z),
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------- segmentation


def _stem(path: str | Path) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def segmentation_cases(run_dir: str | Path) -> tuple[list[dict[str, Any]], str]:
    """The fine-tuning cases of a run folder with a predicted mask, and a sentence on what was found.

    A fine-tuning output is ``models/model.pt`` (``bundle/configs/train.json``) with predicted masks
    ``eval/<image>_seg.nii.gz`` on the images' own grids (``inference.json``/``evaluate.json``), for the
    bundle's test images (:func:`jointssl_monai.apps.sample_datalists.brain_extraction_datalist`, split
    ``"test"``; their labels are derived into ``eval/sample_labels`` as the bundle does).
    """
    root = Path(run_dir)
    if not (root / "models" / "model.pt").is_file():
        return [], (
            "This run folder holds no fine-tuning output (no models/model.pt), so there are no "
            "segmentation overlays. Fine-tune with bundle/configs/train.json in the same bundle_root, then "
            "write predicted masks with configs/inference.json or configs/evaluate.json."
        )
    predictions = sorted((root / "eval").glob("*_seg.nii.gz"))
    if not predictions:
        return [], (
            "models/model.pt is here but eval/ holds no predicted masks (*_seg.nii.gz): run "
            "configs/inference.json (or train.json with evaluate.json) with this bundle_root to write them."
        )
    from jointssl_monai.apps.sample_datalists import brain_extraction_datalist

    try:
        cases = brain_extraction_datalist("test", root / "eval" / "sample_labels")
    except Exception as err:
        return [], f"predicted masks found, but the bundle's test images are not available: {err}"
    found = []
    for case in cases:
        prediction = root / "eval" / f"{_stem(case['image'])}_seg.nii.gz"
        if prediction.is_file():
            found.append({"name": _stem(case["image"]), **case, "prediction": str(prediction)})
    if not found:
        names = ", ".join(p.name for p in predictions)
        return [], f"the predicted masks ({names}) match none of the bundle's test images"
    return found, f"{len(found)} fine-tuning case(s) with a predicted mask in eval/"


def _load_ras(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A volume in RAS, ``(X, Y, Z)``, and its voxel spacing."""
    from monai.transforms import LoadImage, Orientation

    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    return np.asarray(image)[0], spacing


def dice(prediction: np.ndarray, label: np.ndarray) -> float:
    """Dice of two foreground masks (``> 0``); 1.0 when both are empty."""
    p, g = prediction > 0, label > 0
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total


# ---------------------------------------------------------------------------------------------- figures


def _figure(name: str):
    from matplotlib.figure import Figure

    return Figure(figsize=FIGURES[name][1], dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, facecolor="white")


def _empty(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="0.35", transform=ax.transAxes
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _series(ax, key: str, label: str, history, scalars, epoch_length: int, color) -> bool:
    drawn = False
    if key in scalars:
        steps, values = scalars[key]
        ax.plot(steps / max(epoch_length, 1), values, color=color, alpha=0.3, lw=0.8)
        drawn = True
    epochs = [(e["epoch"], e[key]) for e in history if key in e and e[key] is not None]
    epochs = [(x, y) for x, y in epochs if math.isfinite(y)]
    if epochs:
        x, y = zip(*epochs, strict=True)
        ax.plot(x, y, "o-", color=color, ms=3.5, lw=1.5, label=label)
        drawn = True
    return drawn


def plot_losses(path: Path, history, scalars, epoch_length: int) -> None:
    fig = _figure(path.name)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, LOSSES, strict=True):
        ax.set_title(f"{key}: {title}", fontsize=11)
        if _series(ax, key, "epoch mean", history, scalars, epoch_length, "C0"):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.plot([], [], color="C0", alpha=0.3, lw=0.8, label="per iteration")
            ax.legend(fontsize=8)
        else:
            _empty(ax, "not used in this run")
    _save(fig, path)


def plot_health(path: Path, history, prototypes: Mapping[str, list[int]]):
    # the per-epoch averages of every iteration (history.json); TensorBoard holds only the epoch's last check
    scalars: dict = {}
    epoch_length = 1
    fig = _figure(path.name)
    axes = fig.subplots(2, 2).ravel()
    panels = [
        ("normalized_entropy", "normalised code entropy (1 = even use of the prototypes)"),
        ("clusters_used", "clusters in use"),
        ("largest_share", "largest cluster's share"),
    ]
    for ax, (stat, title) in zip(axes, panels, strict=False):
        ax.set_title(title, fontsize=11)
        drawn = False
        for c, level in enumerate(LEVELS):
            k = ", ".join(map(str, prototypes.get(level, []))) or "?"
            drawn |= _series(
                ax, f"{level}_{stat}", f"{level} (K = {k})", history, scalars, epoch_length, f"C{c}"
            )
        if not drawn:
            _empty(ax, "not logged in this run")
            continue
        if stat == "largest_share":
            ax.axhline(COLLAPSE_SHARE, color="C3", ls="--", lw=1, label="collapse warning")
            ax.set_ylim(0, 1.05)
        if stat == "normalized_entropy":
            ax.set_ylim(0, 1.05)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[3]
    ax.set_title("slice-token spread (0 = every slice of a volume has the same token)", fontsize=11)
    if _series(ax, "mask_token_spread", "epoch mean", history, scalars, epoch_length, "C2"):
        ax.axhline(MIN_TOKEN_SPREAD, color="C3", ls="--", lw=1, label="collapse warning")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        _empty(ax, "not logged in this run")
    _save(fig, path)


def occupancy_panels(emb: Embeddings, loss_state: Mapping[str, torch.Tensor], prototypes):
    """Per level and prototype head: ``(level, head, counts, source)``. DeepCluster-v2 levels use the
    k-means assignments stored in the checkpoint (what training used); others the argmax of the prototype
    scores of this report's embeddings."""
    panels = []
    for level in LEVELS:
        stored = loss_state.get(f"{level}_loss.assignments")
        for h, k in enumerate(prototypes.get(level, [])):
            if stored is not None and stored.ndim == 2 and h < stored.shape[0]:
                codes = stored[h][stored[h] >= 0].cpu().numpy()
                source = f"k-means assignments in the checkpoint, {len(codes)} samples"
            else:
                codes = (emb.intra_codes if level == "intra" else emb.inter_codes)[h]
                what = "slices and images" if level == "intra" else "volumes"
                source = f"nearest prototype of {len(codes)} {what} of this report"
            panels.append((level, h, np.bincount(codes.astype(int), minlength=k)[:k], source))
    return panels


def plot_occupancy(path: Path, panels) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(path.name)
    levels = [lv for lv in LEVELS if any(p[0] == lv for p in panels)] or ["intra"]
    cols = max([sum(p[0] == lv for p in panels) for lv in levels] + [1])
    cols = min(cols, 3)
    axes = np.atleast_2d(fig.subplots(len(levels), cols, squeeze=False))
    for r, level in enumerate(levels):
        mine = [p for p in panels if p[0] == level][:cols]
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(mine):
                ax.axis("off")
                continue
            _, h, counts, source = mine[c]
            total = max(int(counts.sum()), 1)
            order = np.sort(counts)[::-1]
            ax.bar(np.arange(1, len(order) + 1), order, width=1.0, color=f"C{r}", lw=0)
            used = int((counts > 0).sum())
            ax.set_title(
                f"{level}, head {h + 1}: {used} of {len(counts)} clusters in use, largest "
                f"{order[0] / total:.0%}\n({source})",
                fontsize=9,
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("cluster, largest first")
            ax.set_ylabel("members")
            ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def _pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    coords = x @ vt[:2].T
    coords *= np.sign(coords[np.abs(coords).argmax(axis=0), range(coords.shape[1])] + 1e-12)
    var = s**2 / max(float((s**2).sum()), 1e-12)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, np.pad(var[:2], (0, max(0, 2 - len(var[:2]))))


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(set(labels)) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(sorted(set(labels)))}


def _scatter(ax, coords, emb: Embeddings, rows: np.ndarray, by: str) -> None:
    labels = [emb.items[i][by] for i in rows]
    # one colour per value over all items, so that a modality keeps its colour from panel to panel
    colours = {k: v for k, v in _colours([item[by] for item in emb.items]).items() if k in set(labels)}
    dims = np.array([emb.items[i]["dims"] for i in rows])
    for lab, colour in colours.items():
        sel = np.array([x == lab for x in labels])
        for d, marker, size in ((3, "o", 14), (2, "^", 60)):
            pick = sel & (dims == d)
            if pick.any():
                ax.scatter(
                    coords[pick, 0],
                    coords[pick, 1],
                    s=size,
                    marker=marker,
                    color=colour,
                    edgecolors="k" if d == 2 else "none",
                    linewidths=0.5,
                )
        ax.scatter([], [], color=colour, label=lab)
    if len(colours) <= 14:
        title = "source" if by == "name" else by
        ax.legend(fontsize=7, loc="best", framealpha=0.8, title=title, title_fontsize=7)


def plot_embeddings_pca(path: Path, emb: Embeddings) -> None:
    fig = _figure(path.name)
    axes = fig.subplots(1, 3)
    coords, var = _pca(emb.slice_emb)
    for ax, by in zip(axes[:2], ("modality", "name"), strict=True):
        _scatter(ax, coords, emb, emb.slice_item, by)
        what = "modality" if by == "modality" else "source"
        ax.set_title(f"slices (o) and 2D images (^) by {what}", fontsize=11)
        ax.set_xlabel(f"PC 1 ({var[0]:.0%})")
        ax.set_ylabel(f"PC 2 ({var[1]:.0%})")
    ax = axes[2]
    ax.set_title("volume features Z by modality", fontsize=11)
    if len(emb.volume_item) >= 2:
        vcoords, vvar = _pca(emb.volume_emb)
        _scatter(ax, vcoords, emb, emb.volume_item, "modality")
        for (x, y), k in zip(vcoords, emb.volume_item, strict=True):
            ax.annotate(emb.items[k]["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"PC 1 ({vvar[0]:.0%})")
        ax.set_ylabel(f"PC 2 ({vvar[1]:.0%})")
    else:
        _empty(ax, "fewer than two volumes: nothing to map")
    _save(fig, path)


def tsne_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def plot_embeddings_tsne(path: Path, emb: Embeddings, seed: int = 0) -> None:
    from sklearn.manifold import TSNE

    n = len(emb.slice_emb)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # one OpenMP thread: beside torch's (idle, spinning) threads, more made t-SNE several times slower
    with threadpool_limits(limits=1):
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        coords = tsne.fit_transform(emb.slice_emb)
    fig = _figure(path.name)
    axes = fig.subplots(1, 2)
    for ax, by in zip(axes, ("modality", "name"), strict=True):
        _scatter(ax, coords, emb, emb.slice_item, by)
        what = "modality" if by == "modality" else "source"
        ax.set_title(
            f"slices (o) and 2D images (^) by {what}, t-SNE (perplexity {perplexity:.0f})", fontsize=10
        )
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


def _show_slice(ax, picture: np.ndarray, dims: int) -> None:
    # (H, W) in MONAI's order: axial slices of RAS volumes are (X, Y), 2D images (columns, rows)
    ax.imshow(picture.T, cmap="gray", vmin=0, vmax=255, origin="lower" if dims == 3 else "upper")
    ax.set_xticks([])
    ax.set_yticks([])


def nearest_neighbours(emb: Embeddings, queries: int = 4, k: int = 5) -> list[tuple[int, list[tuple]]]:
    """Query rows (the middle slice of the largest volumes, then 2D images) with their ``k`` closest rows
    (cosine similarity of slice embeddings) from other sources: ``[(query, [(row, similarity), ...])]``."""
    x = F.normalize(torch.as_tensor(emb.slice_emb), dim=1)
    order = sorted(range(len(emb.items)), key=lambda i: (-emb.items[i]["dims"], -emb.items[i]["slices"], i))
    picks = []
    for item in order[:queries]:
        rows = np.flatnonzero(emb.slice_item == item)
        picks.append(int(rows[len(rows) // 2]))
    out = []
    for q in picks:
        sim = (x @ x[q]).numpy()
        others = np.flatnonzero(emb.slice_item != emb.slice_item[q])
        best = others[np.argsort(-sim[others], kind="stable")[:k]]
        out.append((q, [(int(r), float(sim[r])) for r in best]))
    return out


def _row_label(emb: Embeddings, row: int) -> str:
    item = emb.items[emb.slice_item[row]]
    return f"{item['name']} (2D)" if item["dims"] == 2 else f"{item['name']}, slice {emb.slice_pos[row]}"


def plot_neighbours(path: Path, emb: Embeddings, pairs, k: int = 5) -> None:
    fig = _figure(path.name)
    rows = max(len(pairs), 1)
    axes = np.atleast_2d(fig.subplots(rows, k + 1, squeeze=False))
    if not pairs or all(not n for _, n in pairs):
        for ax in axes.ravel():
            ax.axis("off")
        _empty(axes[0, 0], "a single source: no neighbours from other sources")
    for r, (q, neighbours) in enumerate(pairs):
        ax = axes[r, 0]
        _show_slice(ax, emb.thumbs[q], emb.items[emb.slice_item[q]]["dims"])
        ax.set_title(f"query: {_row_label(emb, q)}", fontsize=8, color="C3")
        for side in ax.spines.values():
            side.set_edgecolor("C3")
            side.set_linewidth(2.5)
        for c in range(k):
            ax = axes[r, c + 1]
            if c >= len(neighbours):
                ax.axis("off")
                continue
            row, sim = neighbours[c]
            _show_slice(ax, emb.thumbs[row], emb.items[emb.slice_item[row]]["dims"])
            ax.set_title(f"{_row_label(emb, row)}\ncosine {sim:.3f}", fontsize=8)
    _save(fig, path)


def plot_attention(path: Path, emb: Embeddings, count: int = 4) -> list[str]:
    fig = _figure(path.name)
    chosen = sorted(
        (k for k, a in emb.attention.items() if a.shape[-1] >= 2), key=lambda k: (-emb.items[k]["slices"], k)
    )[:count]
    if not chosen:
        ax = fig.subplots()
        _empty(ax, "no volume with two or more slices: no attention over slices to show")
        _save(fig, path)
        return []
    from matplotlib.ticker import MaxNLocator

    axes = np.atleast_1d(fig.subplots(1, count))
    for ax in axes[len(chosen) :]:
        ax.axis("off")
    for ax, k in zip(axes, chosen, strict=False):
        maps = emb.attention[k]  # (layers, heads, L, L)
        layer = maps[-1].mean(axis=0)
        im = ax.imshow(layer, cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_title(
            f"{emb.items[k]['name']}\n{layer.shape[0]} slices, layer {maps.shape[0]} of {maps.shape[0]}, "
            f"{maps.shape[1]} heads",
            fontsize=8,
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key slice")
        ax.set_ylabel("query slice")
        fig.colorbar(im, ax=ax, shrink=0.7)
    _save(fig, path)
    return [emb.items[k]["name"] for k in chosen]


def plot_segmentation(path: Path, cases: list[dict[str, Any]], columns: int = 3) -> list[dict[str, Any]]:
    """Predicted mask (red) and reference (green outline) over three axial slices per case; Dice per case on
    the image's own grid. Returns ``[{"case", "dice", "slices"}]``."""
    from matplotlib.colors import ListedColormap

    red = ListedColormap(["red"])
    fig = _figure(path.name)
    shown = cases[:2]
    axes = np.atleast_2d(fig.subplots(len(shown), columns, squeeze=False))
    results = []
    for r, case in enumerate(shown):
        (image, spacing), (label, _), (pred, _) = (
            _load_ras(case[k]) for k in ("image", "label", "prediction")
        )
        if not image.shape == label.shape == pred.shape:
            raise ValueError(
                f"{case['name']}: image {image.shape}, label {label.shape} and prediction {pred.shape} differ"
            )
        score = dice(pred, label)
        z_with = np.flatnonzero((label > 0).any(axis=(0, 1)))
        if len(z_with) == 0:
            z_with = np.arange(image.shape[2])
        zs = [int(z_with[int(q * (len(z_with) - 1))]) for q in np.linspace(0.25, 0.75, columns)]
        low, high = np.percentile(image, [1, 99])
        for c, z in enumerate(zs):
            ax = axes[r, c]
            aspect = float(spacing[1] / spacing[0])  # rows are Y, columns X: true proportions on screen
            ax.imshow(image[..., z].T, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), origin="lower",
                      aspect=aspect)  # fmt: skip
            overlay = np.ma.masked_where(pred[..., z].T <= 0, np.ones_like(pred[..., z].T, dtype=float))
            ax.imshow(overlay, cmap=red, alpha=0.45, origin="lower", vmin=0, vmax=1, aspect=aspect)
            if (label[..., z] > 0).any():
                ax.contour((label[..., z] > 0).T.astype(float), levels=[0.5], colors="lime", linewidths=1)
            ax.set_title(f"{case['name']}, axial slice {z}: Dice {score:.3f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        results.append({"case": case["name"], "dice": score, "slices": zs})
    _save(fig, path)
    return results


# ------------------------------------------------------------------------------------------------- report


def _summary_rows(run: RunFolder, kwargs, emb: Embeddings | None, epoch_length: int) -> list[tuple[str, str]]:
    last = run.history[-1] if run.history else {}
    rows = [("run folder", run.root.name or str(run.root))]
    if run.history:
        rows.append(("epochs", f"{last['epoch']} ({epoch_length} iterations each)"))
    if run.card:
        rows.append(
            (
                "encoder",
                f"{run.card.get('backbone')}, d_model {run.card.get('d_model')}, "
                f"{run.card.get('num_slices')} slices of {run.card.get('spatial_size')}",
            )
        )
        rows.append(
            ("objectives", f"intra {run.card.get('intra_method')}, inter {run.card.get('inter_method')}")
        )
    if kwargs:
        rows.append(
            (
                "aggregator",
                f"{kwargs['num_layers']} layer(s), {kwargs['attention']} attention, "
                f"{kwargs['heads']} heads of {kwargs['dim_head']}",
            )
        )
        rows.append(("prototypes", f"intra {kwargs['intra_prototypes']}, inter {kwargs['inter_prototypes']}"))
    if emb is not None:
        volumes = sum(i["dims"] == 3 for i in emb.items)
        modalities = Counter(i["modality"] for i in emb.items)
        rows.append(
            (
                "data in this report",
                f"{volumes} volumes ({len(emb.volume_item)} with features), "
                f"{len(emb.items) - volumes} 2D images, {len(emb.slice_emb)} slices; "
                + ", ".join(f"{m} {n}" for m, n in sorted(modalities.items())),
            )
        )
    for key, _ in LOSSES:
        if key in last:
            rows.append((f"last epoch {key}", f"{last[key]:.4f}"))
    for level in LEVELS:
        if f"{level}_clusters_used" in last:
            rows.append(
                (
                    f"last epoch {level} clusters",
                    f"{last[f'{level}_clusters_used']:.1f} in use, largest share "
                    f"{last[f'{level}_largest_share']:.0%}, normalised entropy "
                    f"{last[f'{level}_normalized_entropy']:.3f}",
                )
            )
    return rows


def collapse_warnings(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Collapse signs in the last epoch's averages (the thresholds of ``ClusterHealthHandler``)."""
    if not history:
        return ["no epoch finished: no loss history to judge"]
    last = history[-1]
    out = []
    for level in LEVELS:
        share = last.get(f"{level}_largest_share")
        if share is not None and share >= COLLAPSE_SHARE:
            out.append(
                f"{level} level: the largest cluster holds {share:.0%} of the samples in the last epoch "
                f"({last.get(f'{level}_clusters_used', float('nan')):.1f} clusters in use): collapse "
                "suspected"
            )
    spread = last.get("mask_token_spread")
    if spread is not None and math.isfinite(spread) and spread < MIN_TOKEN_SPREAD:
        out.append(
            f"slice tokens: spread {spread:.1e} < {MIN_TOKEN_SPREAD:g} in the last epoch: the tokens of a "
            "volume barely differ from slice to slice"
        )
    return out


CAPTIONS = {
    "loss_curves.png": (
        "Each loss component per iteration (light, from TensorBoard) and per epoch (points, "
        "runs/pretrain/history.json). A component the run does not train is marked as such."
    ),
    "cluster_health.png": (
        "Collapse diagnostics of the training batches (with the SwAV queue / DeepCluster bank), averaged per "
        "epoch: normalised entropy of the codes, clusters in use and the largest cluster's share per level, "
        "and how much the slice tokens of a volume differ from slice to slice. Dashed: the thresholds of the "
        "collapse warning."
    ),
    "cluster_occupancy.png": (
        "How many samples each prototype holds, largest first, at the end of the run: DeepCluster-v2 "
        "levels from the k-means assignments stored in the checkpoint, SwAV levels from the nearest "
        "prototype of each embedding of this report (projection-head BatchNorm with the statistics of these "
        "embeddings, as in training; not the Sinkhorn codes, which are balanced by construction, so this "
        "can show fewer clusters than the training diagnostics above)."
    ),
    "embedding_pca.png": (
        "Slice-encoder embeddings of every valid slice and 2D image (left, centre) and the volume features Z "
        "of the aggregator (right), projected on their first two principal components."
    ),
    "embedding_tsne.png": "The slice and image embeddings mapped with t-SNE.",
    "nearest_neighbours.png": (
        "Query slices (red frame) and their closest slices or images from other sources by cosine similarity "
        "of the slice embeddings. Slices as the network sees them (intensity-scaled, resized); volume slices "
        "shown in RAS with anterior up."
    ),
    "slice_attention.png": (
        "Attention of the aggregator's last layer over the slices of a few volumes, averaged over heads "
        "(deformable attention: the weights of its sampled points spread onto the slices they read)."
    ),
    "segmentation_overlays.png": (
        "Fine-tuned predictions (red) and reference masks (green outline) on real slices, Dice per case on "
        "the image's own grid."
    ),
    "ssl_value.png": (
        "Every seed's score of the value benchmark (bench_results/ssl_value.json) per task and setting, by "
        "initialisation; grey lines join the SSL and random runs of one seed. The table gives the means and "
        "the paired gain with its 95 % interval."
    ),
}


def _page(title: str, summary, warnings, figures, notes, segmentation_note: str = "", value=None) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1540px;margin:1em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}"
        "figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #ddd}"
        ".warn{background:#fde8e8;border:1px solid #d33;padding:.5em 1em}"
        ".ok{background:#e8f6e8;border:1px solid #3a3;padding:.5em 1em}.note{color:#555}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        "<table>",
        *(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary),
        "</table>",
    ]
    if warnings:
        parts.append('<div class="warn"><b>Collapse checks</b><ul>')
        parts += [f"<li>{esc(w)}</li>" for w in warnings]
        parts.append("</ul></div>")
    else:
        parts.append('<p class="ok"><b>Collapse checks:</b> no sign of collapse in the last epoch.</p>')
    for name, (heading, caption, (w, h)) in figures.items():
        parts += [
            f'<h2 id="{esc(Path(name).stem)}">{esc(heading)}</h2>',
            f'<figure><img src="{esc(name)}" width="{w}" height="{h}" alt="{esc(heading)}">',
            f"<figcaption>{esc(caption)}</figcaption></figure>",
        ]
    if value is not None:  # the value benchmark's table, under its figure
        header, rows = value
        parts.append("<table><tr>" + "".join(f"<td><b>{esc(h)}</b></td>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if "segmentation_overlays.png" not in figures:
        parts.append(
            f'<h2 id="segmentation_overlays">Segmentation overlays</h2><p>{esc(segmentation_note)}</p>'
        )
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f'<li class="note">{esc(n)}</li>' for n in notes]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def make_report(
    run_dir: str | Path,
    output: str | Path = "report",
    datalist: str | Path | None = None,
    checkpoint: str | Path | None = None,
    max_items: int = 48,
    network: dict | None = None,
    device: str = "auto",
    seed: int = 0,
    slice_policy: str = "center",
    value_json: str | Path | None = None,
) -> Path:
    """Write ``output/index.html`` with the PNG figures beside it and ``output/report.json`` (what was drawn,
    Dice per case, notes); return the page's path.

    Args:
        run_dir: the run's bundle root (``jointssl demo``'s ``runs/demo``).
        output: folder of the report (created).
        datalist: the run's datalist (default ``run_dir/datalist.json``).
        checkpoint: the checkpoint to embed with (default ``checkpoint_final.pt``, else the newest).
        max_items: datalist entries embedded at most (evenly spaced).
        network: ``JointSSLNet`` arguments overriding what is read from the checkpoint (e.g.
            ``{"conv1_t_stride": 1}``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        seed: seed of t-SNE.
        slice_policy: the run's ``slice_policy`` (not recorded in the run folder); a random one is replaced by
            its deterministic counterpart (``random`` by ``center``, ``random_stride`` by ``stride``).
        value_json: the value benchmark's results (default ``run_dir/bench_results/ssl_value.json`` when it
            exists): a figure of every seed and a table of paired gains close the page.

    Raises:
        MissingPlottingError: matplotlib is not installed.
        FileNotFoundError: ``run_dir`` is not a run folder.
    """
    require_matplotlib()
    from jointssl_monai.data import pretrain_datalist
    from jointssl_monai.utils.checkpoints import safe_load

    start = time.perf_counter()
    run = find_run(run_dir, datalist, checkpoint)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in FIGURES:
        (out / stale).unlink(missing_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    notes: list[str] = []
    figures: dict[str, tuple[str, str, tuple[int, int]]] = {}

    def add(name: str, heading: str | None = None) -> None:
        figures[name] = (heading or FIGURES[name][0], CAPTIONS[name], figure_pixels(name))

    ckpt = safe_load(run.checkpoint) if run.checkpoint is not None else {}
    state = ckpt.get("network") if isinstance(ckpt, dict) else None
    trainer = ckpt.get("trainer", {}) if isinstance(ckpt, dict) else {}
    epoch_length = int(
        trainer.get("epoch_length") or (run.history[0].get("iterations") if run.history else 1) or 1
    )
    scalars = read_scalars(run.log_dir)
    if not scalars:
        notes.append("no TensorBoard events in runs/pretrain: curves show the per-epoch history only")

    kwargs: dict[str, Any] = {}
    emb = net = None
    if state is None:
        notes.append("no checkpoint with network weights: no embeddings, occupancy, neighbours or attention")
    else:
        net, kwargs, assumed = rebuild_network(state, run.card, network)
        notes.append(f"network rebuilt from the checkpoint {run.checkpoint}; assumed: {'; '.join(assumed)}")
        if run.datalist is None:
            notes.append("no datalist.json in the run folder (pass --datalist): no embeddings of the data")
        else:
            entries = pretrain_datalist(datalist=str(run.datalist), skip_bad_inputs=True)
            emb = embed_run(
                net,
                entries,
                num_slices=int(run.card.get("num_slices", 64)),
                spatial_size=run.card.get("spatial_size", [128, 128]),
                slice_policy=slice_policy,
                max_items=max_items,
                device=device,
            )
            if len(entries) > len(emb.items) + len(emb.skipped):
                notes.append(f"{len(emb.items)} of {len(entries)} datalist entries embedded (max_items)")
            notes += [f"skipped a bad input: {s}" for s in emb.skipped]
    prototypes = {lv: list(kwargs.get(f"{lv}_prototypes", [])) for lv in LEVELS}

    plot_losses(out / "loss_curves.png", run.history, scalars, epoch_length)
    add("loss_curves.png")
    plot_health(out / "cluster_health.png", run.history, prototypes)
    add("cluster_health.png")
    if emb is not None:
        loss_state = ckpt.get("loss", {}) if isinstance(ckpt, dict) else {}
        plot_occupancy(out / "cluster_occupancy.png", occupancy_panels(emb, loss_state, prototypes))
        add("cluster_occupancy.png")
        plot_embeddings_pca(out / "embedding_pca.png", emb)
        add("embedding_pca.png")
        if not tsne_available():
            notes.append("t-SNE map left out: scikit-learn is not installed (pip install scikit-learn)")
        elif len(emb.slice_emb) < 5:
            notes.append("t-SNE map left out: fewer than 5 slices")
        else:
            plot_embeddings_tsne(out / "embedding_tsne.png", emb, seed)
            add("embedding_tsne.png")
        pairs = nearest_neighbours(emb)
        plot_neighbours(out / "nearest_neighbours.png", emb, pairs)
        add("nearest_neighbours.png")
        shown = plot_attention(out / "slice_attention.png", emb)
        add("slice_attention.png")
        if not shown:
            notes.append("no volume with two or more slices: the attention figure is empty")
    cases, seg_note = segmentation_cases(run.root)
    dice_rows: list[dict[str, Any]] = []
    if cases:
        dice_rows = plot_segmentation(out / "segmentation_overlays.png", cases)
        add(
            "segmentation_overlays.png",
            "Segmentation overlays ("
            + ", ".join(f"{d['case']}: Dice {d['dice']:.3f}" for d in dice_rows)
            + ")",
        )

    value = None
    value_file = Path(value_json) if value_json else run.root / VALUE_FILE
    if value_json or value_file.is_file():
        value_rows = load_value_results(value_file)["rows"]
        fig = _figure("ssl_value.png")
        draw_value(fig.add_subplot(), value_rows)
        _save(fig, out / "ssl_value.png")
        add("ssl_value.png")
        value = value_table(value_rows)

    warnings = collapse_warnings(run.history)
    summary = _summary_rows(run, kwargs, emb, epoch_length)
    title = f"jointssl report: {run.root.resolve().name}"
    page = out / "index.html"
    page.write_text(_page(title, summary, warnings, figures, notes, seg_note, value), encoding="utf-8")
    manifest = {
        "run_dir": str(run.root),
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "figures": [
            {"file": n, "title": t, "width": w, "height": h} for n, (t, _, (w, h)) in figures.items()
        ],
        "warnings": warnings,
        "segmentation": {"note": seg_note, "cases": dice_rows},
        "value": None if value is None else {"header": value[0], "rows": value[1]},
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(manifest, indent=2))
    logger.info(f"report written to {page} in {manifest['seconds']} s")
    return page
