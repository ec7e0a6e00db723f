"""Reading a pretraining run for ``jointssl report``: its folder, scalars, network and embeddings, and the
predicted masks of a fine-tuning output in the same root.

Embeddings come from the network rebuilt from the checkpoint (its sizes are read from the weights' shapes and
the encoder card; what the weights cannot tell, such as the stem stride, takes the bundle's default and may be
overridden with ``network``) applied to the deterministic part of the pretraining pipeline (load, orientation,
intensity scaling, slice sequence, in-plane resize) without augmentation.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DETERMINISTIC_POLICY",
    "LEVELS",
    "Embeddings",
    "RunFolder",
    "dice",
    "embed_run",
    "find_run",
    "infer_network_kwargs",
    "load_ras",
    "read_scalars",
    "rebuild_network",
    "segmentation_cases",
]


logger = logging.getLogger(__name__)

LEVELS = ("intra", "inter")
#: The deterministic slice policy that stands for a random one of the run (no augmentation in the report).
DETERMINISTIC_POLICY = {"random": "center", "random_stride": "stride"}


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


def load_ras(path: str) -> tuple[np.ndarray, np.ndarray]:
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
