"""The ``jointssl`` console script is installed beside the interpreter and answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jointssl_monai

JOINTSSL = Path(sys.executable).with_name("jointssl")


def test_console_script_reports_version():
    assert JOINTSSL.exists(), "the console script is not installed (pip install -e .)"
    result = subprocess.run([JOINTSSL, "version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == jointssl_monai.__version__


def test_samples_command_lists_installed_images(colin27_t1):
    result = subprocess.run([JOINTSSL, "samples"], capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("colin27_t1:"))
    assert line.split(":", 1)[1].strip() == str(colin27_t1)
