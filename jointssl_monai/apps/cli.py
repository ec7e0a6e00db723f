"""The ``jointssl`` command (python-fire).

Run ``jointssl --help`` for the list of sub-commands and ``jointssl COMMAND --help`` for one of them.

A command that fails on the user's input (a bad image, datalist, config value, a missing or unwritable path,
also inside the bundle run that ``pretrain`` and ``demo`` start) prints one line, ``jointssl: error: ...``,
and exits with status 2; an unexpected error prints ``jointssl: internal error: ...`` and exits with 1.
``--debug`` (anywhere on the line) or ``JOINTSSL_DEBUG=1`` shows the tracebacks instead.
"""

from __future__ import annotations

import os
import sys

import fire

from jointssl_monai import __version__
from jointssl_monai.utils.errors import DEBUG_ENV, env_flag, error_summary


class JointSSLCommands:
    """jointssl: joint 2D/3D self-supervised pretraining for MONAI (Nguyen et al., AAAI 2023)."""

    def version(self) -> str:
        """Print the installed version."""
        return __version__

    def samples(self) -> dict[str, str]:
        """List the real sample images installed on this machine (used by the demo and the tests)."""
        from jointssl_monai.apps.sample_data import SAMPLES, available_samples

        found = available_samples()
        return {name: str(found.get(name, f"missing ({SAMPLES[name].source})")) for name in SAMPLES}

    def datalist(
        self,
        *dirs: str,
        output: str = "datalist.json",
        modality_map: dict | None = None,
        default_modality: str = "OT",
        strict: bool = False,
        verify: bool = False,
        workers: int = 2,
        absolute_paths: bool = False,
        skip_label_maps: bool = False,
    ) -> None:
        """Scan folders (NIfTI, DICOM series, MHA/NRRD, PNG) and write a MONAI datalist; print a summary.

        Lists what it can read; what it skips is named with the reason in the summary and in
        ``<datalist>.report.json``. ``--strict True`` stops at the first bad file. ``--verify True`` also
        decodes every voxel (``--workers`` processes) and leaves out what does not decode.
        ``--skip_label_maps True`` decodes every image and leaves out label maps, atlases and masks."""
        from jointssl_monai.apps.datalist_command import build_datalist_command

        build_datalist_command(
            *dirs, output=output, modality_map=modality_map, default_modality=default_modality, strict=strict,
            verify=verify, workers=workers, absolute_paths=absolute_paths, skip_label_maps=skip_label_maps,
        )  # fmt: skip

    def verify(
        self, datalist: str, workers: int = 2, memory_limit_gb: float = 8.0, output: str | None = None
    ) -> None:
        """Decode every voxel of every entry of a datalist before any training (``workers`` processes, each
        capped at ``memory_limit_gb`` beyond its start-up size); report the entries that do not decode in
        ``<datalist>.report.json`` (or ``--output``) and exit with status 2 if there are any."""
        from jointssl_monai.apps.datalist_command import verify_command

        verify_command(datalist, workers=workers, memory_limit_gb=memory_limit_gb, output=output)

    def demo(
        self, output_dir: str = "runs/demo", max_epochs: int | None = None, bundle_dir: str | None = None
    ):
        """Pretrain on a small real data set that ships with installed packages; print where the results are.

        Runs ``python -m monai.bundle run training`` on ``bundle/configs/pretrain.json`` with a small model
        (a few minutes on 2 CPU cores).
        """
        from jointssl_monai.apps.bundle_commands import run_demo

        return run_demo(output_dir=output_dir, bundle_dir=bundle_dir, max_epochs=max_epochs)

    def pretrain(
        self, *config_files: str, tracking: str | None = None, bundle_dir: str | None = None, **overrides
    ):
        """Run bundle pretraining: ``jointssl pretrain [extra.json ...] --datalist d.json --max_epochs 10``.

        The configs are ``bundle/configs/pretrain.json`` followed by any extra config files (for example
        ``stage_a_2d.json``); keyword options override config ids. ``--tracking mlflow`` records to MLflow.
        """
        from jointssl_monai.apps.bundle_commands import find_bundle_dir, pretrain_command, run_bundle_process

        base = find_bundle_dir(bundle_dir) / "configs" / "pretrain.json"
        for extra in config_files:
            if not os.path.isfile(extra):
                raise FileNotFoundError(f"config file {extra} does not exist")
        run_bundle_process(pretrain_command([base, *config_files], overrides, tracking=tracking))

    def export(
        self, checkpoint: str, output: str = "encoder_flexibleunet.pt", spatial_dims: int = 2,
        in_channels: int = 1, backbone: str | None = None, inflate: str = "auto",
    ) -> str:  # fmt: skip
        """Write the slice encoder of a pretraining checkpoint as a ``FlexibleUNet`` encoder state dict.

        ``spatial_dims=3`` inflates the 2D kernels to 3D; ``in_channels`` adapts the first convolution. The
        file loads into ``FlexibleUNet(in_channels, out_channels, backbone, spatial_dims).encoder`` as is; a
        JSON report of what was loaded is written beside it.
        """
        from jointssl_monai.apps.bundle_commands import export_encoder

        report = export_encoder(checkpoint, output, spatial_dims, in_channels, backbone, inflate)
        return report.summary()

    def package(
        self,
        bundle_dir: str = "bundle",
        output: str | None = None,
        name: str = "jointssl_brain_extraction",
        include_ssl: bool = False,
        include_large_files: bool = False,
    ) -> dict:
        """Zip the bundle like a model-zoo release (``<name>/configs/...``, deterministic) with its sha256.

        Run outputs are left out; ``--include_ssl True`` also ships ``models/ssl`` (encoder, card,
        aggregator; never its checkpoints). The files of ``large_files.yml`` are left out too (publish them
        beside the zip at the URLs listed there) unless ``--include_large_files True``.
        """
        import hashlib

        from jointssl_monai.apps.bundle_release import package_bundle

        path = package_bundle(
            bundle_dir, output or f"{name}.zip", name, include_ssl=include_ssl,
            include_large_files=include_large_files,
        )  # fmt: skip
        return {"zip": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def report(
        self, run_dir: str, output: str = "report", datalist: str | None = None,
        checkpoint: str | None = None, max_items: int = 48, network: dict | None = None, device: str = "auto",
        slice_policy: str = "center", value_json: str | None = None,
    ) -> str:  # fmt: skip
        """Write a static HTML page with PNG figures of what a pretraining run learned; print its path.

        ``RUN_DIR`` is the run's bundle root (``jointssl demo`` writes ``runs/demo``). Figures: loss curves
        per component, code entropy and clusters in use over time, cluster occupancy, a PCA (and t-SNE, with
        scikit-learn) map of slice and volume embeddings, nearest-neighbour slices, attention over slices
        and, for a fine-tuning output in the same folder, predicted masks with Dice per case. ``datalist``
        defaults to ``RUN_DIR/datalist.json``; ``network`` overrides what the checkpoint cannot tell (e.g.
        ``'{"conv1_t_stride": 1}'``); ``slice_policy`` is the run's (``random_stride`` is shown as ``stride``,
        ``random`` as ``center``). ``value_json``: the value benchmark's results (default
        ``RUN_DIR/bench_results/ssl_value.json`` when present) as a figure and a table of paired gains. Needs
        matplotlib: ``pip install "jointssl-monai[report]"``.
        """
        from jointssl_monai.apps.report import make_report
        from jointssl_monai.apps.report_figures import require_matplotlib

        require_matplotlib()  # the install line, as a user error, before any work
        page = make_report(
            run_dir, output, datalist, checkpoint, max_items, network, device,
            slice_policy=slice_policy, value_json=value_json,
        )  # fmt: skip
        return str(page)

    def fetch_bundle(self, url: str, bundle_dir: str, name: str, hash_val: str | None = None) -> str:
        """Download a bundle zip (http(s):// or file://), check its hash and entries, extract it safely."""
        from jointssl_monai.apps.bundle_release import fetch_bundle

        return str(fetch_bundle(url, bundle_dir, name, hash_val=hash_val))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``jointssl`` console script (``argv``: the arguments, default ``sys.argv[1:]``)."""
    from jointssl_monai.apps.bundle_commands import BundleRunError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or env_flag(DEBUG_ENV)
    argv = [arg for arg in argv if arg != "--debug"]
    outer = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # bundle runs started by this command show their tracebacks too
    try:
        fire.Fire(JointSSLCommands, command=argv, name="jointssl")
    except BundleRunError as err:  # the run's own summary: already printed in full with --debug
        if not debug:
            print(f"jointssl: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        if debug:
            raise
        code, message = error_summary(err)
        print(f"jointssl: {message}", file=sys.stderr)
        sys.exit(code)
    finally:
        if outer is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = outer


if __name__ == "__main__":
    main()
