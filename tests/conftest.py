"""Shared fixtures: the real offline images (see ``jointssl_monai.data.sample_data``).

Locally a missing data package skips the tests that need it. Under ``CI=true`` it is an error, so that a
broken install step can never turn the real-data tests into silent skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jointssl_monai.data.sample_data import SAMPLES, SampleNotFoundError, find_sample

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _sample(name: str) -> Path:
    try:
        return find_sample(name)
    except SampleNotFoundError as err:
        if IN_CI:
            pytest.fail(f"CI=true and a real test image is missing: {err}", pytrace=False)
        pytest.skip(str(err))


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
