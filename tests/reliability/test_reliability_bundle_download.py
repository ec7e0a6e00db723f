"""A packaged bundle served over HTTP on the loopback interface, downloaded by MONAI and by ``fetch_bundle``,
and the verification of its ``large_files.yml``."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import yaml
from monai.apps.utils import HashCheckError

from jointssl_monai.apps.bundle_release import (
    BundleArchiveError,
    fetch_bundle,
    package_bundle,
    verify_large_files,
)
from jointssl_monai.apps.sample_datalists import binary_mask_file

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
NAME = "jointssl_monai"
WEIGHTS = b"\x00\x01pretend these are encoder weights\xff" * 1000


class _QuietHandler(SimpleHTTPRequestHandler):
    timeout = 10  # a stalled client cannot hold a server thread for longer

    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve ``tmp_path/served`` on 127.0.0.1 at a free port; yields (folder, base URL); always shut down."""
    for var in ("NO_PROXY", "no_proxy"):  # urllib honours proxy variables; loopback must not use them
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # MONAI's urlretrieve has no timeout of its own
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        socket.setdefaulttimeout(old_timeout)
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _publish(tmp_path: Path, served: Path, base_url: str) -> tuple[Path, Path]:
    """Package the project's bundle with one large file (served beside the zip, listed with its sha256)."""
    source = tmp_path / "src" / NAME
    shutil.copytree(BUNDLE, source, ignore=shutil.ignore_patterns("models", "eval"))
    (served / "encoder.pt").write_bytes(WEIGHTS)
    entry = {
        "path": "models/ssl/encoder.pt",
        "url": f"{base_url}/encoder.pt",
        "hash_val": hashlib.sha256(WEIGHTS).hexdigest(),
        "hash_type": "sha256",
    }
    (source / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    return source, package_bundle(source, served / f"{NAME}.zip", NAME)


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_monai_downloads_our_package_over_http(tmp_path, http_server):
    served, base_url = http_server
    source, archive = _publish(tmp_path, served, base_url)
    bundle_dir = tmp_path / "bundles"
    monai.bundle.download(
        name=NAME, url=f"{base_url}/{archive.name}", bundle_dir=str(bundle_dir), progress=False
    )
    downloaded = bundle_dir / NAME
    assert (bundle_dir / f"{NAME}.zip").read_bytes() == archive.read_bytes()
    assert _tree(downloaded) == _tree(source)
    assert verify_large_files(downloaded, require_files=False) == []  # paths and hashes are well-formed
    with pytest.raises(BundleArchiveError, match=r"large_files\[0\] \(path 'models/ssl/encoder.pt'\): file"):
        verify_large_files(downloaded)  # not fetched yet
    monai.bundle.download_large_files(bundle_path=str(downloaded))  # MONAI fetches it over HTTP too
    assert verify_large_files(downloaded) == [(downloaded / "models/ssl/encoder.pt").resolve()]


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_fetch_bundle_checks_hash_top_folder_and_paths(tmp_path, http_server):
    served, base_url = http_server
    source, archive = _publish(tmp_path, served, base_url)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{base_url}/{archive.name}"
    fetched = fetch_bundle(url, tmp_path / "ok", NAME, hash_val=digest)
    assert fetched == tmp_path / "ok" / NAME
    assert _tree(fetched) == _tree(source)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [NAME, f"{NAME}.zip"]

    with pytest.raises(HashCheckError):  # a tampered or corrupted download is refused by its hash
        fetch_bundle(url, tmp_path / "tampered", NAME, hash_val="0" * 64)
    assert sorted((tmp_path / "tampered").iterdir()) == []

    with pytest.raises(BundleArchiveError, match="expected top folder 'other_name'"):
        fetch_bundle(url, tmp_path / "renamed", "other_name")
    assert sorted((tmp_path / "renamed").iterdir()) == []

    with zipfile.ZipFile(served / "evil.zip", "w") as evil:
        evil.writestr(f"{NAME}/configs/metadata.json", "{}")
        evil.writestr(f"{NAME}/../escaped.txt", "x")
    with pytest.raises(BundleArchiveError, match="climbs out"):
        fetch_bundle(f"{base_url}/evil.zip", tmp_path / "evil", NAME)
    assert sorted((tmp_path / "evil").iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` as a user types it; the result, whatever its exit status."""
    command = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=900, check=False)


@pytest.mark.slow  # about 40 s: a real inference with the released model on 2 CPU cores
def test_the_release_downloads_like_a_zoo_bundle_and_infers(tmp_path, http_server, itk_t1, itk_t1_skullstrip):
    """The release as published: a zip without weights, the weights beside it at the URLs and with the
    hashes of the committed ``large_files.yml``; MONAI's own commands fetch both, then inference runs from
    the downloaded copy."""
    served, base_url = http_server
    source = tmp_path / "src" / NAME
    shutil.copytree(BUNDLE, source, ignore=shutil.ignore_patterns("eval"))
    listing = yaml.safe_load((source / "large_files.yml").read_text())["large_files"]
    assert sorted(entry["path"] for entry in listing) == ["models/model.pt", "models/ssl/encoder.pt"]
    for entry in listing:  # published at this server instead of the release's host
        shutil.copyfile(source / entry["path"], served / Path(entry["path"]).name)
        entry["url"] = f"{base_url}/{Path(entry['path']).name}"
    (source / "large_files.yml").write_text(yaml.safe_dump({"large_files": listing}))
    archive = package_bundle(source, served / f"{NAME}.zip", NAME)
    assert not [name for name in zipfile.ZipFile(archive).namelist() if name.endswith(".pt")]

    bundles = tmp_path / "bundles"
    for args in (
        ("download", "--name", NAME, "--url", f"{base_url}/{archive.name}", "--bundle_dir", str(bundles)),
        ("download_large_files", "--bundle_path", str(bundles / NAME)),
    ):
        result = _monai_bundle(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    downloaded = bundles / NAME
    # the committed hashes are those of the committed weights, and the download matches them
    assert sorted(verify_large_files(downloaded)) == sorted(
        (downloaded / entry["path"]).resolve() for entry in listing
    )
    config = str(downloaded / "configs" / "inference.json")
    result = _monai_bundle("run", "--config_file", config, "--bundle_root", str(downloaded), cwd=downloaded)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = nib.load(str(downloaded / "eval" / "KmeansTest_T1UCharRaw_seg.nii.gz"))
    assert labels.shape == nib.load(str(itk_t1)).shape
    mask = (
        np.asarray(nib.load(str(binary_mask_file(itk_t1_skullstrip, tmp_path / "mask.nii.gz"))).dataobj) > 0
    )
    predicted = np.asarray(labels.dataobj) > 0
    dice = 2 * np.logical_and(mask, predicted).sum() / (mask.sum() + predicted.sum())
    reported = json.loads((downloaded / "configs" / "metadata.json").read_text())["eval_metrics"]["mean_dice"]
    assert abs(dice - reported) < 0.02, (dice, reported)  # the card's number is what the download gives

    weights = bytearray((served / "model.pt").read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    (served / "model.pt").write_bytes(bytes(weights))
    tampered = tmp_path / "tampered"
    _monai_bundle("download", "--name", NAME, "--url", f"{base_url}/{archive.name}", "--bundle_dir",
                  str(tampered), cwd=tmp_path)  # fmt: skip
    result = _monai_bundle("download_large_files", "--bundle_path", str(tampered / NAME), cwd=tmp_path)
    assert result.returncode != 0 and "hash check of downloaded file failed" in result.stderr
    assert not (tampered / NAME / "models" / "model.pt").exists()


def _bundle_with_large_files(tmp_path: Path, entries: list) -> Path:
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(WEIGHTS)
    (tmp_path / "secret.pt").write_bytes(WEIGHTS)
    (root / "models" / "escape.pt").symlink_to(tmp_path / "secret.pt")
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    return root


@pytest.mark.parametrize("hash_type", ["md5", "sha1", "sha256", "sha512", None])
def test_large_files_with_matching_hashes_are_verified(tmp_path, hash_type):
    entry = {
        "path": "models/model.pt",
        "url": "unused",
        "hash_val": hashlib.new(hash_type or "sha256", WEIGHTS),
    }
    entry["hash_val"] = entry["hash_val"].hexdigest()
    if hash_type is not None:
        entry["hash_type"] = hash_type
    root = _bundle_with_large_files(tmp_path, [entry])
    assert verify_large_files(root) == [(root / "models" / "model.pt").resolve()]


def test_every_bad_large_file_entry_is_named_in_one_error(tmp_path):
    good = hashlib.sha256(WEIGHTS).hexdigest()
    entries = [
        {"path": "models/model.pt", "hash_val": good, "hash_type": "sha256"},
        {"path": "models/model.pt", "hash_val": "f" * 64, "hash_type": "sha256"},
        {"path": "../outside.pt", "hash_val": good},
        {"path": "/etc/passwd", "hash_val": good},
        {"path": "models/escape.pt", "hash_val": good},
        {"path": "models/model.pt", "hash_val": ""},
        {"path": "models/model.pt", "hash_val": good, "hash_type": "crc32"},
        {"path": "models/absent.pt", "hash_val": good},
        {"url": "no path"},
    ]
    root = _bundle_with_large_files(tmp_path, entries)
    with pytest.raises(BundleArchiveError) as err:
        verify_large_files(root)
    message = str(err.value)
    assert "large_files.yml: 8 bad entries" in message
    assert "large_files[0]" not in message
    expected = {
        1: "(path 'models/model.pt'): sha256 is " + good,
        2: "(path '../outside.pt'): points outside the bundle",
        3: "(path '/etc/passwd'): points outside the bundle",
        4: "(path 'models/escape.pt'): points outside the bundle",  # a symlink out of the bundle
        5: "has no hash_val",
        6: "unsupported hash_type 'crc32'",
        7: "(path 'models/absent.pt'): file",
        8: "needs a 'path' string",
    }
    for index, text in expected.items():
        assert f"large_files[{index}]" in message and text in message, (index, message)
    (root / "large_files.yml").write_text("large_files: {not: a list}")
    with pytest.raises(BundleArchiveError, match="has no 'large_files' list"):
        verify_large_files(root)
    (root / "large_files.yml").unlink()
    assert verify_large_files(root) == []
