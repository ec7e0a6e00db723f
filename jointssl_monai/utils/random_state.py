"""The process-wide random state as a checkpointable object (``state_dict``/``load_state_dict``).

Stored as tensors and plain Python values only, so that ``torch.load(..., weights_only=True)`` accepts it.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["RandomState"]


class RandomState:
    """Saves and restores the torch (CPU and CUDA), NumPy and Python random generators.

    Put it in a checkpoint's ``save_dict`` (e.g. ``{"rng": RandomState()}``) so that a resumed run draws the
    same random numbers as an uninterrupted one.
    """

    def state_dict(self) -> dict:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        python_version, python_state, python_gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_meta": [str(kind), int(position), int(has_gauss), float(cached)],
            "python_state": torch.tensor(python_state, dtype=torch.int64),
            "python_meta": [int(python_version), python_gauss],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        kind, position, has_gauss, cached = state["numpy_meta"]
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, int(position), int(has_gauss), float(cached)))
        version, gauss = state["python_meta"]
        random.setstate((int(version), tuple(int(v) for v in state["python_state"].tolist()), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
