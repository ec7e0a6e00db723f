"""Load a self-supervised slice encoder into a MONAI ``FlexibleUNet`` (2D, or inflated to 3D).

The pretraining of Nguyen et al. (AAAI 2023, arXiv:2212.01893) learns a 2D ResNet slice encoder ``f_intra``.
Its weights are exported as a plain state dict whose keys are those of
``monai.networks.nets.ResNetFeatures(<backbone>, spatial_dims=2)``, which is exactly the key set of
``FlexibleUNet(backbone=<backbone>, spatial_dims=2).encoder``. This module moves those weights:

- into a 2D ``FlexibleUNet``: same names, same shapes (prefix ``encoder.``);
- into a 3D ``FlexibleUNet``: every 2D kernel ``(O, I, kh, kw)`` is *inflated* to ``(O, I, kh, kw, kd)``
  (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017, the I3D convention). Pretraining
  slices are ``(X, Y)`` planes of MONAI's ``(C, X, Y, Z)`` volumes in that axis order, so ``kh`` acts on
  ``X``, ``kw`` on ``Y`` and the new depth taps on ``Z``, the last spatial axis, as in the 3D network's input;
- into a network whose first convolution takes another number of input channels (the stem is adapted).

It reports what was loaded, what was skipped and why, and what the target encoder did not receive, and it
refuses (raises) when nothing loads or, with ``strict=True`` (default), when the checkpoint is not the same
backbone as the network.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.resnet import resnet_params
from monai.networks.utils import copy_model_state

__all__ = [
    "EncoderLoadReport",
    "PretrainedEncoderMismatchError",
    "adapt_first_conv",
    "extract_encoder_state",
    "guess_resnet_name",
    "inflate_kernel",
    "load_pretrained_encoder",
]

logger = logging.getLogger(__name__)

#: entries of a training checkpoint that may hold the network's state dict (``save_dict`` names)
_CHECKPOINT_ENTRIES = ("net", "model", "network", "state_dict", "encoder")
_INFLATE_MODES = ("auto", "mean", "center")
_FIRST_CONV_MODES = ("auto", "repeat", "mean")


class PretrainedEncoderMismatchError(ValueError):
    """The checkpoint cannot be loaded into the network's encoder (nothing loads, or a strict mismatch)."""


@dataclass
class EncoderLoadReport:
    """What :func:`load_pretrained_encoder` did.

    Attributes:
        source: where the weights came from (a path, or ``"<state dict>"``).
        source_prefix: the prefix stripped from the checkpoint keys (``""`` for an exported encoder,
            e.g. ``"encoder.backbone."`` for a full pretraining checkpoint).
        target_prefix: the prefix of the encoder inside the network (``"encoder."`` for ``FlexibleUNet``).
        loaded: network keys that received a checkpoint value.
        transformed: network key -> how the value was changed on the way (inflated, first conv adapted).
        skipped: checkpoint key -> why it was not loaded (no such key in the encoder, shape mismatch).
        missing: encoder keys of the network that received nothing (they keep their initialisation).
        checkpoint_backbone: the ResNet recognised from the checkpoint's keys (``None`` if unknown).
        target_backbone: the ResNet recognised from the network's encoder.
        metadata: the ``encoder.json`` sidecar of the checkpoint, when there is one.
    """

    source: str
    source_prefix: str
    target_prefix: str
    loaded: list[str] = field(default_factory=list)
    transformed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    checkpoint_backbone: str | None = None
    target_backbone: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def complete(self) -> bool:
        """Every encoder key loaded and every checkpoint key used."""
        return bool(self.loaded) and not self.skipped and not self.missing

    def summary(self, max_items: int = 5) -> str:
        """A few readable lines: counts, then the first ``max_items`` keys of each problem list."""
        total = len(self.loaded) + len(self.missing)
        lines = [
            f"pretrained encoder from {self.source}: loaded {len(self.loaded)} of {total} encoder keys "
            f"(checkpoint prefix {self.source_prefix!r} -> network prefix {self.target_prefix!r}; "
            f"backbone checkpoint={self.checkpoint_backbone} network={self.target_backbone})"
        ]
        kinds: dict[str, int] = {}
        for how in self.transformed.values():
            kinds[how.split(":")[0]] = kinds.get(how.split(":")[0], 0) + 1
        if kinds:
            lines.append("  transformed: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for title, items in (
            ("skipped", [f"{k} ({why})" for k, why in self.skipped.items()]),
            ("missing (kept their initialisation)", list(self.missing)),
        ):
            if items:
                more = f" ... and {len(items) - max_items} more" if len(items) > max_items else ""
                lines.append(f"  {title}: {len(items)}: " + "; ".join(items[:max_items]) + more)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _read_checkpoint(checkpoint: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str, dict]:
    """Load ``checkpoint`` (path or mapping); return it, a printable source and the ``.json`` sidecar."""
    if isinstance(checkpoint, Mapping):
        return checkpoint, "<state dict>", {}
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained encoder checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or non-weights file
        raise PretrainedEncoderMismatchError(
            f"cannot read {str(path)!r} as a weights-only checkpoint: {err}"
        ) from err
    if not isinstance(data, Mapping):
        raise PretrainedEncoderMismatchError(f"{str(path)!r} holds a {type(data).__name__}, not a state dict")
    sidecar = path.with_suffix(".json")
    metadata = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return data, str(path), metadata


def _tensor_entries(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def extract_encoder_state(
    checkpoint: Mapping[str, Any], target_keys: list[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the encoder inside a checkpoint and return its state dict with the target's key names.

    Accepts an exported encoder (keys already equal to ``target_keys``), a training checkpoint with a
    ``"net"``/``"model"``/``"network"``/``"state_dict"`` entry, and any prefix in front of the encoder keys
    (``encoder.backbone.``, ``module.`` from DistributedDataParallel, ...). The prefix is the one under which
    the most ``target_keys`` are found; ties go to the shortest prefix.

    Args:
        checkpoint: the loaded checkpoint.
        target_keys: the state-dict keys of the encoder to fill (without its own prefix).

    Returns:
        ``(state, prefix)``: the checkpoint entries that start with ``prefix``, with ``prefix`` removed.

    Raises:
        PretrainedEncoderMismatchError: no tensor of the checkpoint ends with an encoder key name.
    """
    state = _tensor_entries(checkpoint)
    if not state:
        for entry in _CHECKPOINT_ENTRIES:
            if isinstance(checkpoint.get(entry), Mapping):
                state = _tensor_entries(checkpoint[entry])
                if state:
                    break
    if not state:
        raise PretrainedEncoderMismatchError(
            f"checkpoint holds no tensors at its top level nor under {list(_CHECKPOINT_ENTRIES)}; "
            f"top-level entries: {sorted(map(str, checkpoint))[:10]}"
        )
    votes: dict[str, int] = {}
    targets = set(target_keys)
    for key in state:
        # every split point of the key is a candidate prefix; count the ones that leave a target key
        for match in re.finditer(r"(?:^|\.)", key):
            start = match.end()
            if key[start:] in targets:
                prefix = key[:start]
                votes[prefix] = votes.get(prefix, 0) + 1
    if not votes:
        raise PretrainedEncoderMismatchError(
            f"no checkpoint key ends with an encoder key name (e.g. {target_keys[:2]}); "
            f"checkpoint keys look like {list(state)[:3]}"
        )
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def guess_resnet_name(state: Mapping[str, torch.Tensor]) -> str | None:
    """Recognise which MONAI ResNet (``resnet10`` ... ``resnet200``) a ``ResNetFeatures`` state dict is.

    Uses the number of blocks per stage and the block type (a bottleneck has ``conv3``); returns ``None`` when
    the keys do not look like a MONAI ResNet.
    """
    blocks = [
        len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)
    ]
    if not all(blocks):
        return None
    block = "bottleneck" if any(re.match(r"layer1\.0\.conv3\.", k) for k in state) else "basic"
    for name, (kind, layers, *_rest) in resnet_params.items():
        if kind == block and list(layers) == blocks:
            return name
    return None


def inflate_kernel(
    weight: torch.Tensor, depth: int, mode: str = "mean", depth_axis: int = -1
) -> torch.Tensor:
    """Inflate a 2D convolution kernel ``(O, I, kh, kw)`` to 3D with ``depth`` taps along ``depth_axis``.

    ``"mean"`` (I3D, Carreira & Zisserman 2017): the 2D kernel is repeated along depth and divided by
    ``depth``, so on a volume that is constant along depth the 3D convolution equals the 2D convolution of
    each interior slice (where the kernel does not reach the zero padding). The network sees through-plane
    context from the first step, and the response to a depth-constant input is preserved.
    ``"center"``: the 2D kernel sits on the central tap and the other taps are zero, so the 3D network
    starts as exactly the 2D network applied slice by slice (on any input), and learns the through-plane taps.

    Args:
        weight: 2D kernel of shape ``(out_channels, in_channels, kh, kw)``.
        depth: number of taps along the new axis.
        mode: ``"mean"`` or ``"center"``.
        depth_axis: spatial axis of the 3D kernel that is new (``-1``: the last, ``Z`` of MONAI's
            ``(C, X, Y, Z)`` volumes); the 2D kernel's two axes go, in order, to the other two.

    Returns:
        a kernel of shape ``(O, I, kh, kw)`` with ``depth`` inserted at spatial axis ``depth_axis``.
    """
    if weight.ndim != 4:
        raise ValueError(
            f"inflate_kernel expects a 2D kernel (O, I, kh, kw), got shape {tuple(weight.shape)}"
        )
    axis = 2 + (depth_axis % 3)
    if mode == "mean":
        return (weight.unsqueeze(axis) / depth).repeat_interleave(depth, dim=axis).contiguous()
    if mode == "center":
        shape = list(weight.shape)
        shape.insert(axis, depth)
        out = weight.new_zeros(shape)
        out.select(axis, depth // 2).copy_(weight)
        return out
    raise ValueError(f"unknown inflation mode {mode!r}; use one of {_INFLATE_MODES[1:]}")


def adapt_first_conv(weight: torch.Tensor, in_channels: int, mode: str = "auto") -> torch.Tensor:
    """Adapt a first-convolution kernel ``(O, C_src, ...)`` to ``in_channels`` input channels.

    Both modes keep the response to an input whose channels are all equal (e.g. a grey image fed as RGB, or
    one MRI contrast copied into several channels): the summed kernel over input channels is unchanged.

    - ``"repeat"``: target channel ``j`` takes source channel ``j mod C_src``, scaled by
      ``C_src / in_channels`` (keeps channel-specific filters when ``in_channels`` is a multiple of
      ``C_src``).
    - ``"mean"``: every target channel takes the sum over source channels divided by ``in_channels``.
    - ``"auto"``: ``"repeat"`` when ``in_channels`` is a multiple of ``C_src``, else ``"mean"``.
    """
    src = weight.shape[1]
    if mode == "auto":
        mode = "repeat" if in_channels % src == 0 else "mean"
    if mode == "repeat":
        index = torch.arange(in_channels, device=weight.device) % src
        return weight[:, index] * (src / in_channels)
    if mode == "mean":
        summed = weight.sum(dim=1, keepdim=True) / in_channels
        return summed.expand(-1, in_channels, *weight.shape[2:]).contiguous()
    raise ValueError(f"unknown first-conv mode {mode!r}; use one of {_FIRST_CONV_MODES}")


def _encoder_of(network: torch.nn.Module, encoder_prefix: str | None) -> tuple[torch.nn.Module, str]:
    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        network = network.module
    if encoder_prefix is None:
        encoder_prefix = "encoder." if isinstance(getattr(network, "encoder", None), torch.nn.Module) else ""
    return network, encoder_prefix


def load_pretrained_encoder(
    network: torch.nn.Module,
    checkpoint: str | Path | Mapping[str, Any],
    *,
    inflate: str = "auto",
    first_conv: str = "auto",
    depth_axis: int = -1,
    strict: bool = True,
    encoder_prefix: str | None = None,
) -> EncoderLoadReport:
    """Load a pretrained 2D slice encoder into ``network``'s encoder, in place.

    Example::

        from monai.networks.nets import FlexibleUNet
        from jointssl_monai.transfer import load_pretrained_encoder

        unet = FlexibleUNet(in_channels=1, out_channels=2, backbone="resnet50", spatial_dims=3)
        report = load_pretrained_encoder(unet, "models/ssl/encoder.pt")  # 2D kernels inflated to 3D
        print(report.summary())

    Args:
        network: a ``FlexibleUNet`` (2D or 3D; its encoder is ``network.encoder``), a bare
            ``ResNetFeatures``, or either wrapped in ``DataParallel``/``DistributedDataParallel``.
        checkpoint: the exported encoder (``models/ssl/encoder.pt``), a full pretraining checkpoint (the
            encoder is found by its key names, see :func:`extract_encoder_state`), or a loaded mapping.
            Files are read with ``torch.load(..., weights_only=True)``.
        inflate: how a 2D kernel becomes 3D for a 3D network, see :func:`inflate_kernel`; ``"auto"`` is
            ``"mean"`` (the I3D convention, which keeps the response to depth-constant inputs).
        first_conv: how the stem is adapted when the input channels differ, see :func:`adapt_first_conv`.
        depth_axis: the spatial axis of the 3D kernels that inflation adds (default: the last one, ``Z`` of
            MONAI's ``(C, X, Y, Z)`` volumes, so the 2D kernel acts on ``(X, Y)`` in that order). Pretraining
            slices keep MONAI's in-plane order (:class:`~jointssl_monai.data.SliceSequenced`), so use the
            pretraining ``slice_axis`` here (2 or -1 for axial slices, the default) and a 2D filter meets the
            planes of the fine-tuning volumes exactly as it met the pretraining slices.
        strict: refuse (raise) unless every encoder key loads and every checkpoint key is used, which is what
            happens when the checkpoint is the same backbone as the network. ``False`` loads what fits.
        encoder_prefix: the encoder's prefix inside ``network``; default ``"encoder."`` when the network has
            an ``encoder`` sub-module, else ``""``.

    Returns:
        an :class:`EncoderLoadReport` (also logged at INFO level).

    Raises:
        FileNotFoundError: the checkpoint file does not exist.
        PretrainedEncoderMismatchError: nothing loads, or (``strict``) the checkpoint does not match.
    """
    if inflate not in _INFLATE_MODES:
        raise ValueError(f"inflate must be one of {_INFLATE_MODES}, got {inflate!r}")
    if first_conv not in _FIRST_CONV_MODES:
        raise ValueError(f"first_conv must be one of {_FIRST_CONV_MODES}, got {first_conv!r}")
    inflate_mode = "mean" if inflate == "auto" else inflate
    module, prefix = _encoder_of(network, encoder_prefix)
    target = {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    if not target:
        raise PretrainedEncoderMismatchError(f"network has no parameters under the prefix {prefix!r}")
    raw, source, metadata = _read_checkpoint(checkpoint)
    state, source_prefix = extract_encoder_state(raw, list(target))
    report = EncoderLoadReport(
        source=source,
        source_prefix=source_prefix,
        target_prefix=prefix,
        checkpoint_backbone=guess_resnet_name(state) or metadata.get("backbone"),
        target_backbone=guess_resnet_name(target),
        metadata=metadata,
    )
    stem = next((k for k, v in target.items() if v.ndim >= 4), None)  # first convolution of the encoder
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            report.skipped[key] = "not a key of the network's encoder"
            continue
        want = target[key]
        notes = []
        if value.ndim + 1 == want.ndim and value.ndim == 4:
            depth = want.shape[2 + depth_axis % 3]
            value = inflate_kernel(value, depth, inflate_mode, depth_axis)
            notes.append(f"inflated: {inflate_mode} x{depth}")
        if key == stem and value.ndim == want.ndim and value.shape[1] != want.shape[1]:
            value = adapt_first_conv(value, want.shape[1], first_conv)
            notes.append(
                f"first conv: {state[key].shape[1]} -> {want.shape[1]} input channels ({first_conv})"
            )
        if value.shape != want.shape:
            report.skipped[key] = f"shape {tuple(state[key].shape)} does not fit {tuple(want.shape)}"
            continue
        converted[key] = value.to(dtype=want.dtype)
        if notes:
            report.transformed[prefix + key] = "; ".join(notes)
    report.missing = [prefix + k for k in target if k not in converted]
    report.loaded = [prefix + k for k in converted]
    if not converted:
        raise PretrainedEncoderMismatchError("nothing loaded: " + report.summary() + _backbone_hint(report))
    if strict and not report.complete:
        raise PretrainedEncoderMismatchError(
            "checkpoint does not match the network's encoder (pass strict=False to load what fits):\n"
            + report.summary()
            + _backbone_hint(report)
        )
    _, updated, _ = copy_model_state(module, converted, dst_prefix=prefix, inplace=True)
    report.loaded = [k for k in report.loaded if k in set(updated)]
    logger.info(report.summary())
    return report


def _backbone_hint(report: EncoderLoadReport) -> str:
    ckpt, net = report.checkpoint_backbone, report.target_backbone
    if ckpt and net and ckpt != net:
        return (
            f"\nthe checkpoint is a {ckpt} encoder but the network's backbone is {net}: use backbone={ckpt!r}"
        )
    return ""
