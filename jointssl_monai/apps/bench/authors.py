"""The authors' 3D pretraining step, for timing beside ours: their ``utils/models.py`` imported unchanged
from a checkout of their repository (github duyhominhnguyen/Self-supervised-Image-Volume-Intra-Inter-
Contrastive), the step of their ``ssl_swav_3D.py`` written out around it.

Their script needs apex, a process group and CUDA; none of that is timed work. The step here keeps what is:
prototype normalisation, ``ResNet_Trans`` on both views of a batch of volumes (3-channel slices, as their
ResNet's first convolution takes), Sinkhorn codes (ours, :func:`~jointssl_monai.losses.sinkhorn_knopp`, with
their 3 iterations and epsilon 0.05), the swapped cross-entropy at temperature 0.1, backward, gradient
clipping at 2.0 and an SGD step (their LARC wrapper only rescales the learning rate). Their model imports
``einops`` and ``deformable_attention`` (0.0.18, the version of their environment file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from jointssl_monai.losses import sinkhorn_knopp

__all__ = ["AuthorsStep", "load_authors_models"]


def load_authors_models(authors_dir: str | Path) -> ModuleType:
    """Import ``<authors_dir>/utils/models.py`` as a module, unchanged."""
    path = Path(authors_dir) / "utils" / "models.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: --authors_dir must be a checkout of the authors' repository"
        )
    spec = importlib.util.spec_from_file_location("authors_models", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class AuthorsStep:
    """One training step of the authors' ``ResNet_Trans`` (their stage C) at a :data:`STEP_CONFIGS` shape.

    Args:
        authors_dir: a checkout of the authors' repository.
        config: ``volumes``, ``slices``, ``size`` and ``prototypes`` of the shape to run (their model fixes
            ResNet-50, d_model 640, feed-forward 720 and 4 layers: the paper configuration).
        device: where to run.
        seed: initialisation and batch seed.
    """

    def __init__(
        self,
        authors_dir: str | Path,
        config: dict[str, Any],
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        models = load_authors_models(authors_dir)
        self.device = torch.device(device)
        torch.manual_seed(seed)
        encoder = models.EncoderModel(
            n_frames=config["slices"], d_model=640, ffn_hidden=720, drop_prob=0.1, n_layers=4
        )
        prototypes = models.MultiPrototypes(output_dim=640, nmb_prototypes=[config["prototypes"]])
        self.model = models.ResNet_Trans(models.ResNet(normalize=False), encoder, prototypes).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6)
        generator = torch.Generator().manual_seed(seed)
        shape = (config["volumes"], config["slices"], 3, config["size"], config["size"])
        volume = torch.rand(shape, generator=generator)
        self.inputs = torch.cat([volume, volume.flip(-1)]).to(self.device)  # two views, as their loader
        self.volumes = config["volumes"]
        self.losses: list[float] = []
        # the fields of a :class:`~jointssl_monai.apps.bench.step.StepCase` that a report reads
        self.name, self.amp = "authors' ResNet_Trans fp32", "none"
        self.plain = self.channels_last = False

    def run(self) -> float:
        bs = self.volumes
        with torch.no_grad():
            weight = self.model.prototypes.prototypes0.weight
            weight.copy_(F.normalize(weight, dim=1))
        _, output = self.model(self.inputs)
        output = output[0]
        loss = output.new_zeros(())
        for crop in (0, 1):
            with torch.no_grad():
                codes = output[bs * crop : bs * (crop + 1)].detach().float()
                q = sinkhorn_knopp(codes, epsilon=0.05, iterations=3)
            other = output[bs * (1 - crop) : bs * (2 - crop)]  # the swapped view's scores
            loss = loss - torch.mean(torch.sum(q * F.log_softmax(other / 0.1, dim=1), dim=1))
        loss = loss / 2
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return self.losses[-1]
