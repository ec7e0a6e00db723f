"""``jointssl verify`` and ``jointssl datalist --verify`` decode every voxel before training: the files a
header scan lists as good although their data are broken are named, with the reason, before any step."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hostile_corpus import BAD_KINDS, good_entries

from jointssl_monai.apps.cli import main
from jointssl_monai.data import BadInputError, pretrain_datalist, verify_entries

SAMPLES = ("itk_t1", "nibabel_anatomical", "itk_pd_slice_png", "itk_t1_slice_png")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_path) -> tuple[Path, list[dict], dict[str, dict]]:
    folder = tmp_path_factory.mktemp("hostile")
    samples = {name: sample_path(name) for name in SAMPLES}
    good = good_entries(folder, samples)
    bad = {kind: make(folder, samples) for kind, make in BAD_KINDS.items()}
    return folder, good, bad


def test_the_header_scan_lists_them_and_verify_names_each_one(corpus, tmp_path, capsys):
    folder, good, bad = corpus
    datalist = tmp_path / "datalist.json"
    main(["datalist", str(folder), "--output", str(datalist)])
    listed = {Path(folder, e["image"]).resolve() for e in json.loads(datalist.read_text())["training"]}
    # what a header scan cannot see: every bad file is listed as good
    assert {Path(e["image"]).resolve() for e in [*good, *bad.values()]} <= listed
    capsys.readouterr()

    with pytest.raises(SystemExit) as info:
        main(["verify", str(datalist)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jointssl: error: ") and "Traceback" not in err
    report = json.loads((tmp_path / "datalist.report.json").read_text())
    named = {Path(item["image"]).name: item["reason"] for item in report["bad"]}
    assert set(named) == {Path(e["image"]).name for e in bad.values()}, named
    assert report["good"] == len(listed) - len(bad)
    for name in named:
        assert name in err


def test_datalist_verify_leaves_out_what_does_not_decode(corpus, tmp_path):
    folder, good, bad = corpus
    datalist = tmp_path / "verified.json"
    main(["datalist", str(folder), "--output", str(datalist), "--verify", "True"])
    kept = {Path(e["image"]).name for e in json.loads(datalist.read_text())["training"]}
    assert kept == {Path(e["image"]).name for e in good}
    report = json.loads((tmp_path / "verified.report.json").read_text())
    skipped = {Path(item["image"]).name for item in report["skipped"] if "does not decode" in item["reason"]}
    assert skipped == {Path(e["image"]).name for e in bad.values()}
    with pytest.raises(SystemExit) as info:  # --strict refuses instead
        main(
            [
                "datalist",
                str(folder),
                "--output",
                str(tmp_path / "s.json"),
                "--verify",
                "True",
                "--strict",
                "True",
            ]
        )
    assert info.value.code == 2


def test_the_pretraining_preflight_refuses_or_skips(corpus):
    _, good, bad = corpus
    entries = [*good, bad["truncated_gzip"], bad["broken_png"]]
    with pytest.raises(BadInputError, match=r"2 entries do not decode") as info:
        pretrain_datalist(entries, verify=True)
    assert "truncated_gzip.nii.gz" in str(info.value) and "broken.png" in str(info.value)
    kept = pretrain_datalist(entries, verify=True, skip_bad_inputs=True)
    assert [e["image"] for e in kept] == [e["image"] for e in good]


def test_a_file_too_large_for_the_memory_cap_is_named(corpus):
    _, good, _ = corpus
    # 2 MB for 1,015,808 voxels, 4 MB in float32
    report = verify_entries(good[:1], num_workers=1, memory_limit_gb=0.002)
    # numpy raises MemoryError, or a native library (OpenBLAS) aborts the process: either way it is named
    [(_, _, reason)] = report.bad
    assert "memory_limit_gb" in reason, reason
    assert verify_entries(good[:1], num_workers=1).bad == []  # the default cap (8 GB) lets it through


def die_on_pngs(entry: dict, max_voxels: int) -> str | None:
    """A check whose process dies on PNG files, as a crashing decoder would."""
    if str(entry["image"]).endswith(".png"):
        os._exit(3)
    return None


def test_a_worker_that_dies_costs_only_its_entry(corpus):
    _, good, _ = corpus
    report = verify_entries(good, num_workers=2, check_entry=die_on_pngs)
    assert [Path(name).suffix for _, name, _ in report.bad] == [".png", ".png"]
    assert all("died" in reason for _, _, reason in report.bad)
    assert [e["image"] for e in report.good] == [e["image"] for e in good if not e["image"].endswith(".png")]
