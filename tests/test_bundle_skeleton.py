"""The bundle's metadata and logging configuration are what MONAI accepts."""

from __future__ import annotations

import json
import logging.config
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import jointssl_monai

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"


def test_metadata_matches_schema():
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    assert metadata["schema"].endswith(SCHEMA.name)


def test_metadata_verifies_with_monai_cli():
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata",
         "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--filepath", str(SCHEMA)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_pins_packages_and_names_zoo_io():
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    pins = metadata["required_packages_version"]
    assert pins["jointssl-monai"] == jointssl_monai.__version__
    for name, version in pins.items():
        assert version.replace(".", "").isdigit(), (
            f"{name} must be pinned to an exact release, got {version!r}"
        )
    io = metadata["network_data_format"]
    # MONAI Label reads the first input and output and requires these names; index 0 is background.
    assert next(iter(io["inputs"])) == "image"
    pred = next(iter(io["outputs"].items()))
    assert pred[0] == "pred" and pred[1]["channel_def"]["0"] == "background"


def test_logging_conf_uses_only_standard_library(tmp_path):
    conf = BUNDLE / "configs" / "logging.conf"
    logging.config.fileConfig(conf, disable_existing_loggers=False)
    assert isinstance(logging.getLogger().handlers[0], logging.StreamHandler)


@pytest.mark.parametrize("name", ["LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt"])
def test_bundle_files_present(name):
    assert (BUNDLE / name).stat().st_size > 0
