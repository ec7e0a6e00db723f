"""No ``jointssl`` command prints a traceback for any file of the bad-input corpus: ``jointssl datalist
--strict True`` refuses each file the header scan can see with one line and exit status 2, and ``jointssl
verify`` names every file that passes the scan but does not decode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hostile_corpus import BAD_KINDS
from test_data_bad_corpus import REFUSED
from test_data_bad_inputs import CASES, _nifti

from jointssl_monai.apps.cli import main

SAMPLES = ("itk_t1", "itk_pd_slice_png")


def _corpus(root: Path, samples: dict[str, Path]) -> dict[str, Path]:
    """Every bad input of the three corpora, each in its own folder: case -> what to scan."""
    made: dict[str, Path] = {}
    root.mkdir(parents=True)
    good_volume = _nifti(root / "good.nii.gz", np.random.default_rng(0).random((24, 20, 12)))
    for case, (make, _dims, _pattern) in REFUSED.items():
        folder = root / f"refused_{case}"
        folder.mkdir()
        made[f"refused_{case}"] = folder if isinstance(out := make(folder), list) else out
    for case, (make, _pattern) in CASES.items():
        folder = root / f"input_{case}"
        folder.mkdir()
        made[f"input_{case}"] = make(folder, good_volume)
    for kind, make in BAD_KINDS.items():
        folder = root / f"hostile_{kind}"
        folder.mkdir()
        made[f"hostile_{kind}"] = Path(make(folder, samples)["image"])
    return made


def test_no_command_prints_a_traceback_for_any_bad_input(tmp_path, sample_path, capsys):
    corpus = _corpus(tmp_path / "corpus", {name: sample_path(name) for name in SAMPLES})
    assert len(corpus) == len(REFUSED) + len(CASES) + len(BAD_KINDS)
    passed_the_scan: list[dict] = []
    for case, path in corpus.items():
        output = tmp_path / "lists" / f"{case}.json"
        try:
            main(["datalist", str(path), "--output", str(output), "--strict", "True"])
        except SystemExit as exit_info:
            err = capsys.readouterr().err
            assert exit_info.code == 2, (case, err)
            assert err.startswith("jointssl: error: ") and err.count("\n") == 1, (case, err)
            continue
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err, case
        entries = json.loads(output.read_text())["training"]
        passed_the_scan += [{**e, "image": str((output.parent / e["image"]).resolve())} for e in entries]

    # what the header scan cannot see: its data (truncated, NaN, constant, short) are broken
    assert len(passed_the_scan) >= 8
    datalist = tmp_path / "passed.json"
    datalist.write_text(json.dumps({"training": passed_the_scan}))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(datalist)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("jointssl: error: ") and "Traceback" not in err
    report = json.loads((tmp_path / "passed.report.json").read_text())
    assert report["good"] == 0 and len(report["bad"]) == len(passed_the_scan)
