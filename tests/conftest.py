"""Shared fixtures: the real offline images (see ``jointssl_monai.apps.sample_data``), and
:func:`require_module` for optional test dependencies.

Locally a missing data package or optional dependency skips the tests that need it. Under ``CI=true`` it is
an error, so that a broken install step can never turn the real-data tests (or those of the ``test``/``dev``
extras: mlflow, deformable-attention) into silent skips.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from jointssl_monai.apps.sample_data import SAMPLES, SampleNotFoundError, find_sample

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str, reason: str) -> NoReturn:
    """Skip (locally) or fail (under ``CI=true``) because ``what`` is missing; also at module level."""
    if IN_CI:
        pytest.fail(f"CI=true and {what} is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, distribution: str | None = None, version: str | None = None) -> ModuleType:
    """Import ``name`` like ``pytest.importorskip``, but fail instead of skipping under ``CI=true``.

    Args:
        name: the module to import.
        distribution: the PyPI distribution that provides it (for the version check and the message).
        version: the exact version of ``distribution`` the tests need; another one skips (fails in CI).
    """
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        missing(f"an optional test dependency ({distribution or name})", f"could not import {name!r}: {err}")
    if version is not None:
        installed = importlib.metadata.version(distribution or name)
        if installed != version:
            missing(
                f"{distribution or name}=={version}",
                f"the tests need {distribution or name} {version}, {installed} is installed",
            )
    return module


def _sample(name: str) -> Path:
    try:
        return find_sample(name)
    except SampleNotFoundError as err:
        missing("a real test image", str(err))


@pytest.fixture(scope="session")
def sample_path():
    """Return a function that maps a sample name to its installed path (skip or fail when missing)."""
    return _sample


def _make_fixture(name: str):
    @pytest.fixture(scope="session", name=name)
    def _fixture() -> Path:
        return _sample(name)

    _fixture.__doc__ = f"Path of the real sample image {name!r}: {SAMPLES[name].description}."
    return _fixture


# One fixture per sample, named like the sample (e.g. ``colin27_t1``, ``pydicom_ct_series``).
for _name in SAMPLES:
    globals()[_name] = _make_fixture(_name)
