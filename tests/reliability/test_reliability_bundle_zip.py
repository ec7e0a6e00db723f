"""Bundle zips: deterministic packaging, and refusal of unsafe archives before anything is written."""

from __future__ import annotations

import shutil
import stat
import struct
import zipfile
from pathlib import Path

import pytest
import yaml

from jointssl_monai.apps.bundle_release import (
    RATIO_MIN_BYTES,
    BundleArchiveError,
    inspect_zip,
    package_bundle,
    safe_extract_zip,
)

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
NAME = "jointssl_monai"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """The project's bundle plus the run outputs and caches that must never be packaged."""
    root = tmp_path / "src" / NAME
    shutil.copytree(BUNDLE, root)
    junk = [
        "runs/events.out.tfevents.1",
        "logs/train.log",
        "configs/__pycache__/x.cpython-311.pyc",
        "models/ssl/checkpoints/checkpoint_epoch=3.pt",
        "models/.model.pt.abc123.tmp",
        "eval.log",
        "eval/case_seg.nii.gz",
        "runs/pretrain/cache/ab12.pt",
        "models/model.ts",
    ]
    for rel in junk:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"junk")
    return root


def _released(rel: str) -> bool:
    """Files a default package leaves out: the large files (published beside the zip) and ``models/ssl``."""
    large = {
        entry["path"] for entry in yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    }
    return rel in large or rel.startswith("models/ssl/")


def test_package_is_deterministic_sorted_and_excludes_run_outputs(bundle_copy, tmp_path):
    first = package_bundle(bundle_copy, tmp_path / "a" / f"{NAME}.zip", NAME)
    for path in bundle_copy.rglob("*"):  # new timestamps must not change the archive
        path.touch()
    second = package_bundle(bundle_copy, tmp_path / "b" / f"{NAME}.zip", NAME)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert names == sorted(names)
    # no run output, no weights: the large files travel beside the zip, models/ssl only when asked for
    assert set(names) == {f"{NAME}/{rel}" for rel in _tree(BUNDLE) if not _released(rel)}
    assert f"{NAME}/configs/metadata.json" in names
    assert list(tmp_path.joinpath("a").iterdir()) == [first], "no temporary file left next to the zip"
    assert stat.S_IMODE(first.stat().st_mode) == 0o644, "a release must be readable by everyone"
    with_ssl = package_bundle(bundle_copy, tmp_path / "c" / f"{NAME}.zip", NAME, include_ssl=True)
    ssl_names = set(zipfile.ZipFile(with_ssl).namelist()) - set(names)
    assert ssl_names == {f"{NAME}/models/ssl/encoder.json"}  # the card; never the checkpoints
    everything = package_bundle(
        bundle_copy, tmp_path / "d" / f"{NAME}.zip", NAME, include_ssl=True, include_large_files=True
    )
    large_names = set(zipfile.ZipFile(everything).namelist()) - set(names) - ssl_names
    assert large_names == {f"{NAME}/models/model.pt", f"{NAME}/models/ssl/encoder.pt"}


def test_package_refuses_a_large_file_that_is_not_the_listed_one(bundle_copy, tmp_path):
    (bundle_copy / "models" / "model.pt").write_bytes(b"weights from another run")
    with pytest.raises(BundleArchiveError, match=r"large_files\[\d\] \(path 'models/model.pt'\): sha256 is"):
        package_bundle(bundle_copy, tmp_path / "x.zip", NAME)


def test_package_into_the_bundle_itself_and_bad_names(bundle_copy, tmp_path):
    inside = package_bundle(bundle_copy, bundle_copy / f"{NAME}.zip", NAME)
    assert f"{NAME}/{NAME}.zip" not in zipfile.ZipFile(inside).namelist()
    for bad in ["jointssl.v1", "a/b", "", "../x"]:
        with pytest.raises(ValueError, match="bundle name"):
            package_bundle(bundle_copy, tmp_path / "x.zip", bad)
    with pytest.raises(ValueError, match=r"configs/metadata\.json is missing"):
        package_bundle(tmp_path / "src", tmp_path / "x.zip", NAME)
    (bundle_copy / "docs" / "link").symlink_to("/etc")
    with pytest.raises(ValueError, match="link is a symbolic link"):
        package_bundle(bundle_copy, tmp_path / "x.zip", NAME)


def test_packaged_bundle_extracts_to_the_same_files(bundle_copy, tmp_path):
    archive = package_bundle(
        bundle_copy, tmp_path / f"{NAME}.zip", NAME, include_ssl=True, include_large_files=True
    )
    out = safe_extract_zip(archive, tmp_path / "out", expected_top=NAME)
    assert out == tmp_path / "out" / NAME
    assert _tree(out) == _tree(BUNDLE)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [NAME], "no staging folder left"
    with pytest.raises(FileExistsError, match=NAME):
        safe_extract_zip(archive, tmp_path / "out", expected_top=NAME)
    (out / "configs" / "metadata.json").write_text("edited")
    safe_extract_zip(archive, tmp_path / "out", expected_top=NAME, overwrite=True)
    assert (out / "configs" / "metadata.json").read_bytes() == (
        BUNDLE / "configs" / "metadata.json"
    ).read_bytes()


def _zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], deflate: bool = True) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


GOOD = (f"{NAME}/configs/metadata.json", b"{}")
BAD_ZIPS = {
    "dotdot": ([GOOD, (f"{NAME}/../../escaped.txt", b"x")], "climbs out of the folder"),
    "dotdot_inside": ([GOOD, (f"{NAME}/configs/../../x.json", b"x")], "climbs out of the folder"),
    "absolute": ([GOOD, ("/abs.txt", b"x")], "absolute path"),
    "drive_letter": ([GOOD, ("C:/abs.txt", b"x")], "absolute path"),
    "backslash": ([GOOD, (f"{NAME}\\..\\x.txt", b"x")], "backslash"),
    "symlink": ([GOOD, (_symlink(f"{NAME}/configs/link"), b"../../../etc/passwd")], "symbolic link"),
    "wrong_top": ([("other_bundle/configs/metadata.json", b"{}")], "expected top folder 'jointssl_monai'"),
    "no_top": ([GOOD, ("README.md", b"x")], "outside any top folder"),
    "duplicate": ([GOOD, GOOD], "more than once"),
    "bomb": ([GOOD, (f"{NAME}/models/zeros.bin", bytes(8 * RATIO_MIN_BYTES))], "zip bomb"),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", sorted(BAD_ZIPS))
def test_unsafe_zip_is_refused_before_anything_is_written(tmp_path, case):
    entries, message = BAD_ZIPS[case]
    archive = _zip(tmp_path / f"{case}.zip", entries)
    dest = tmp_path / "dest"
    with pytest.raises(BundleArchiveError, match=message) as err:
        safe_extract_zip(archive, dest, expected_top=NAME)
    assert f"{case}.zip" in str(err.value)
    assert not dest.exists(), f"{case}: something was written before the refusal"
    assert not (tmp_path / "escaped.txt").exists()


def test_total_size_limit_counts_every_entry(tmp_path):
    archive = _zip(tmp_path / "big.zip", [GOOD, (f"{NAME}/a.bin", b"a" * 600), (f"{NAME}/b.bin", b"b" * 600)])
    with pytest.raises(BundleArchiveError, match=r"'jointssl_monai/b\.bin'.*limit 1000"):
        inspect_zip(archive, max_total_bytes=1000)
    with pytest.raises(BundleArchiveError, match="3 entries, more than the limit 2"):
        inspect_zip(archive, max_entries=2)
    assert inspect_zip(archive, NAME, max_total_bytes=1202)[0] == NAME


def _understate_size(archive: Path, member: str, claimed: int) -> None:
    """Overwrite the uncompressed size of ``member`` in its local and central headers (zip APPNOTE 4.3)."""
    data = bytearray(archive.read_bytes())
    name = member.encode()
    # (signature, offset of the uncompressed size, offset of the name length, offset of the name)
    for signature, size_at, name_len_at, name_at in (
        (b"PK\x03\x04", 22, 26, 30),
        (b"PK\x01\x02", 24, 28, 46),
    ):
        start = data.find(signature)
        while start >= 0:
            length = struct.unpack_from("<H", data, start + name_len_at)[0]
            if data[start + name_at : start + name_at + length] == name:
                struct.pack_into("<I", data, start + size_at, claimed)
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))


def test_header_that_understates_the_size_is_caught_while_streaming(tmp_path):
    """The headers claim 100 bytes for a 2 MiB entry: every check made from the headers passes, so only the
    extraction can notice; it stops at the declared size and leaves nothing behind."""
    member = f"{NAME}/models/weights.bin"
    archive = _zip(tmp_path / "liar.zip", [GOOD, (member, bytes(range(256)) * (8 * 1024))])
    _understate_size(archive, member, 100)
    assert inspect_zip(archive, NAME)[1][1].file_size == 100
    dest = tmp_path / "dest"
    with pytest.raises(BundleArchiveError, match=r"liar\.zip is damaged"):
        safe_extract_zip(archive, dest, expected_top=NAME)
    assert list(dest.iterdir()) == [], "the partial extraction was removed"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a zip at all"])
def test_not_a_zip_is_refused_with_its_name(tmp_path, content):
    path = tmp_path / "broken.zip"
    path.write_bytes(content)
    with pytest.raises(BundleArchiveError, match=r"broken\.zip is not a readable zip"):
        safe_extract_zip(path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
