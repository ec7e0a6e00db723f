"""The ``jointssl`` command (python-fire).

Run ``jointssl --help`` for the list of sub-commands and ``jointssl COMMAND --help`` for one of them.
"""

from __future__ import annotations

import fire

from jointssl_monai import __version__


class JointSSLCommands:
    """jointssl: joint 2D/3D self-supervised pretraining for MONAI (Nguyen et al., AAAI 2023)."""

    def version(self) -> str:
        """Print the installed version."""
        return __version__

    def samples(self) -> dict[str, str]:
        """List the real sample images installed on this machine (used by the demo and the tests)."""
        from jointssl_monai.data.sample_data import SAMPLES, available_samples

        found = available_samples()
        return {name: str(found.get(name, f"missing ({SAMPLES[name].source})")) for name in SAMPLES}

    def datalist(
        self,
        *dirs: str,
        output: str = "datalist.json",
        modality_map: dict | None = None,
        default_modality: str = "OT",
        skip_bad_inputs: bool = False,
        absolute_paths: bool = False,
    ) -> None:
        """Scan folders (NIfTI, DICOM series, MHA/NRRD, PNG) and write a MONAI datalist; print a summary."""
        from jointssl_monai.data.datalist import build_datalist_command

        build_datalist_command(
            *dirs, output=output, modality_map=modality_map, default_modality=default_modality,
            skip_bad_inputs=skip_bad_inputs, absolute_paths=absolute_paths,
        )  # fmt: skip


def main() -> None:
    """Entry point of the ``jointssl`` console script."""
    fire.Fire(JointSSLCommands, name="jointssl")


if __name__ == "__main__":
    main()
