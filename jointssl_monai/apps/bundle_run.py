"""``python -m jointssl_monai.apps.bundle_run ARGS`` is ``python -m monai.bundle ARGS`` with the project's
error summary installed before MONAI parses anything (a missing extra config, a bad datalist: one line, see
:mod:`jointssl_monai.utils.errors`). ``jointssl pretrain`` and ``jointssl demo`` start their runs with it."""

from __future__ import annotations

import runpy
import sys

from jointssl_monai.utils.errors import install_error_summary


def main() -> None:
    install_error_summary()
    sys.argv[0] = "monai.bundle"
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
