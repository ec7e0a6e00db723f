"""Bundle archives: safe extraction, verification of ``large_files.yml``, deterministic packaging.

A MONAI bundle travels as a zip holding one top folder named after the bundle (``<name>/configs/...``);
``python -m monai.bundle download --name <name> --url <zip>`` saves ``<bundle_dir>/<name>.zip`` and extracts
it into ``<bundle_dir>``. MONAI 1.6.1 refuses absolute and ``..`` member names while it extracts, but only
when it reaches them (earlier members are already written), and it checks neither the top folder nor the
sizes. The functions here check every member from the zip's central directory before anything is written,
enforce the same limits again while streaming, and extract into a hidden staging folder that is renamed into
place only when complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import yaml

__all__ = [
    "DEFAULT_EXCLUDE",
    "SSL_OUTPUTS",
    "BundleArchiveError",
    "fetch_bundle",
    "inspect_zip",
    "package_bundle",
    "safe_extract_zip",
    "verify_large_files",
]

DEFAULT_MAX_TOTAL_BYTES = 2 * 1024**3
DEFAULT_MAX_RATIO = 100.0
DEFAULT_MAX_ENTRIES = 10_000
#: Entries smaller than this are exempt from the ratio limit: a whitespace-heavy config compresses well and
#: cannot be a bomb on its own (the total size limit still applies).
RATIO_MIN_BYTES = 1024**2
_CHUNK = 1024**2

#: Paths left out of a packaged bundle: run outputs, caches, interrupted writes, SSL training checkpoints.
#: A pattern with a ``/`` matches the relative path of a file or of one of its folders; one without matches
#: any single name in the path.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "__pycache__",
    "*.pyc",
    ".git",
    ".ipynb_checkpoints",
    ".pytest_cache",
    ".DS_Store",
    "runs",
    "logs",
    "mlruns",
    "eval",
    "cache",
    "*.log",
    "*.tmp",
    "*.ts",
    "models/ssl/checkpoints",
)
#: Left out unless ``include_ssl``: the self-supervised outputs of a pretraining run in the bundle folder.
SSL_OUTPUTS = "models/ssl"

_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_HASHES = ("md5", "sha1", "sha256", "sha512")
#: The fixed timestamp of every packaged entry (the earliest a zip can store), for byte-identical archives.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class BundleArchiveError(ValueError):
    """A bundle archive or its ``large_files`` list is unsafe or inconsistent; the message names the entry."""


def _member_parts(zip_path: Path, info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The path components of a member, refusing names that could land outside the extraction folder."""
    name = info.filename
    where = f"{zip_path}: entry {name!r}"
    if "\\" in name or "\x00" in name:
        raise BundleArchiveError(f"{where} has a backslash or NUL in its name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BundleArchiveError(f"{where} is an absolute path")
    parts = tuple(name.rstrip("/").split("/"))
    if ".." in parts:
        raise BundleArchiveError(f"{where} climbs out of the folder with '..'")
    if any(part in ("", ".") for part in parts):
        raise BundleArchiveError(f"{where} has an empty or '.' path component")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise BundleArchiveError(f"{where} is a symbolic link")
    if info.flag_bits & 0x1:
        raise BundleArchiveError(f"{where} is encrypted")
    return parts


def inspect_zip(
    zip_path: str | os.PathLike,
    expected_top: str | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> tuple[str, list[zipfile.ZipInfo]]:
    """Check a bundle zip from its central directory, without extracting anything.

    Args:
        zip_path: the archive.
        expected_top: the one folder every entry must be inside (the bundle name); ``None`` accepts any single
            top folder.
        max_total_bytes: limit on the sum of the uncompressed sizes.
        max_ratio: limit on uncompressed/compressed size of each entry of at least ``RATIO_MIN_BYTES``.
        max_entries: limit on the number of entries.

    Returns:
        The top folder name and the entries.

    Raises:
        BundleArchiveError: not a zip, or an entry breaks a rule; the message names the archive and the entry.
    """
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleArchiveError(f"{zip_path} is not a readable zip archive: {err}") from err
    if not infos:
        raise BundleArchiveError(f"{zip_path} is empty")
    if len(infos) > max_entries:
        raise BundleArchiveError(f"{zip_path} has {len(infos)} entries, more than the limit {max_entries}")
    tops, seen, total = set(), set(), 0
    for info in infos:
        parts = _member_parts(zip_path, info)
        where = f"{zip_path}: entry {info.filename!r}"
        if len(parts) == 1 and not info.is_dir():
            raise BundleArchiveError(f"{where} is a file outside any top folder")
        if expected_top is not None and parts[0] != expected_top:
            raise BundleArchiveError(f"{where} is not inside the expected top folder {expected_top!r}/")
        tops.add(parts[0])
        if parts in seen:
            raise BundleArchiveError(f"{where} appears more than once")
        seen.add(parts)
        total += info.file_size
        if total > max_total_bytes:
            raise BundleArchiveError(
                f"{where}: uncompressed size reaches {total} bytes, more than the limit {max_total_bytes}"
            )
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise BundleArchiveError(
                f"{where} expands {info.file_size} bytes from {info.compress_size} "
                f"(ratio {info.file_size / max(info.compress_size, 1):.0f}, limit {max_ratio:g}): a zip bomb?"
            )
    if len(tops) != 1:
        raise BundleArchiveError(f"{zip_path} has several top folders {sorted(tops)}; a bundle zip has one")
    return tops.pop(), infos


def safe_extract_zip(
    zip_path: str | os.PathLike,
    dest_dir: str | os.PathLike,
    expected_top: str | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    overwrite: bool = False,
) -> Path:
    """Extract a bundle zip into ``dest_dir/<top>`` after checking all of it; nothing is written if unsafe.

    The checks of :func:`inspect_zip` run before ``dest_dir`` is touched. The members are then streamed into a
    hidden staging folder inside ``dest_dir`` with the sizes counted again (an entry may not produce more
    bytes than its header declares, nor the whole archive more than ``max_total_bytes``); the staging folder
    is renamed to ``dest_dir/<top>`` only when every member is written, and removed on any error. File modes
    stored in the archive are ignored (files are written with the default mode).

    Args:
        zip_path: the archive.
        dest_dir: the folder that receives ``<top>/``.
        expected_top: the required top folder (the bundle name), or ``None`` for any single top folder.
        max_total_bytes: limit on the total uncompressed size.
        max_ratio: limit on the compression ratio of each entry of at least ``RATIO_MIN_BYTES``.
        max_entries: limit on the number of entries.
        overwrite: replace an existing ``dest_dir/<top>``; otherwise an existing one is an error.

    Returns:
        The extracted bundle folder ``dest_dir/<top>``.

    Raises:
        BundleArchiveError: the archive is unsafe or damaged.
        FileExistsError: ``dest_dir/<top>`` exists and ``overwrite`` is false.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    top, infos = inspect_zip(zip_path, expected_top, max_total_bytes, max_ratio, max_entries)
    target = dest_dir / top
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; remove it or extract with overwrite=True")
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".partial", dir=dest_dir))
    try:
        written_total = 0
        with zipfile.ZipFile(zip_path) as archive:
            for info in infos:
                out = staging.joinpath(*info.filename.rstrip("/").split("/"))
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with archive.open(info) as source, open(out, "wb") as sink:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        written_total += len(chunk)
                        if written > info.file_size:
                            raise BundleArchiveError(
                                f"{zip_path}: entry {info.filename!r} produces more than the "
                                f"{info.file_size} bytes its header declares"
                            )
                        if written_total > max_total_bytes:
                            raise BundleArchiveError(
                                f"{zip_path}: entry {info.filename!r} takes the archive past the limit of "
                                f"{max_total_bytes} bytes"
                            )
                        sink.write(chunk)
        if target.exists():
            old = staging.with_name(staging.name + ".old")
            os.replace(target, old)
            os.replace(staging / top, target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(staging / top, target)
    except zipfile.BadZipFile as err:  # CRC mismatch, truncated data, a lying header
        raise BundleArchiveError(f"{zip_path} is damaged: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _digest(path: Path, hash_type: str) -> str:
    digest = hashlib.new(hash_type, usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _find_large_files_list(bundle_dir: Path) -> Path | None:
    for suffix in (".yml", ".yaml", ".json"):
        candidate = bundle_dir / f"large_files{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _read_large_files_list(list_file: Path) -> list:
    """The ``large_files`` entries of a ``.yml``/``.yaml``/``.json`` list, unchecked."""
    try:
        text = list_file.read_text()
        content = json.loads(text) if list_file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise BundleArchiveError(f"cannot read the large files list {list_file}: {err}") from err
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise BundleArchiveError(f"{list_file} has no 'large_files' list")
    return entries


def verify_large_files(
    bundle_dir: str | os.PathLike,
    large_files: str | os.PathLike | None = None,
    require_files: bool = True,
) -> list[Path]:
    """Check each ``large_files`` entry: its path stays inside the bundle, it has a hash, the file matches it.

    The list has MONAI's format (``large_files: [{path, url, hash_val, hash_type}]``, read by
    ``python -m monai.bundle download_large_files``). Every entry is checked and all problems are reported in
    one error. Unlike MONAI, an entry without ``hash_val`` is an error: an unverifiable weight file is not
    accepted.

    Args:
        bundle_dir: the bundle root.
        large_files: the list file; default: ``large_files.yml``/``.yaml``/``.json`` in ``bundle_dir``
            (no list file means no large files).
        require_files: a missing file is an error; with ``False`` only paths and hash fields are checked
            (before ``download_large_files``).

    Returns:
        The verified files.

    Raises:
        BundleArchiveError: naming each bad entry (index and path) and its problem.
    """
    bundle_dir = Path(bundle_dir)
    list_file = _find_large_files_list(bundle_dir) if large_files is None else Path(large_files)
    if list_file is None:
        return []
    entries = _read_large_files_list(list_file)
    root = bundle_dir.resolve()
    problems, verified = [], []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            problems.append(f"large_files[{index}] = {entry!r}: needs a 'path' string")
            continue
        rel = entry["path"]
        where = f"large_files[{index}] (path {rel!r})"
        pure = PurePosixPath(rel.replace("\\", "/"))
        target = (bundle_dir / pure).resolve()
        if pure.is_absolute() or ".." in pure.parts or not target.is_relative_to(root):
            problems.append(f"{where}: points outside the bundle {bundle_dir}")
            continue
        hash_type = str(entry.get("hash_type") or "sha256").lower()  # download_url's default
        hash_val = entry.get("hash_val")
        if hash_type not in _HASHES:
            problems.append(f"{where}: unsupported hash_type {hash_type!r} (one of {', '.join(_HASHES)})")
            continue
        if not isinstance(hash_val, str) or not hash_val:
            problems.append(f"{where}: has no hash_val, the file cannot be verified")
            continue
        if not target.is_file():
            if require_files:
                problems.append(f"{where}: file {target} is missing")
            continue
        actual = _digest(target, hash_type)
        if actual != hash_val.lower():
            problems.append(f"{where}: {hash_type} is {actual}, expected {hash_val}")
            continue
        verified.append(target)
    if problems:
        raise BundleArchiveError(f"{list_file}: {len(problems)} bad entries:\n  " + "\n  ".join(problems))
    return verified


def _excluded(rel: PurePosixPath, patterns: Sequence[str]) -> bool:
    prefixes = [PurePosixPath(*rel.parts[: i + 1]).as_posix() for i in range(len(rel.parts))]
    for pattern in patterns:
        if "/" in pattern:
            if any(fnmatch.fnmatchcase(prefix, pattern.strip("/")) for prefix in prefixes):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in rel.parts):
            return True
    return False


def _large_file_paths(bundle_dir: Path) -> set[str]:
    """The bundle-relative paths the ``large_files`` list names (checked by :func:`verify_large_files`)."""
    list_file = _find_large_files_list(bundle_dir)
    if list_file is None:
        return set()
    verify_large_files(bundle_dir, require_files=False)  # well-formed, inside the bundle, with hashes
    entries = _read_large_files_list(list_file)
    return {PurePosixPath(entry["path"].replace("\\", "/")).as_posix() for entry in entries}


def package_bundle(
    bundle_dir: str | os.PathLike,
    output_zip: str | os.PathLike,
    name: str,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    include_ssl: bool = False,
    include_large_files: bool = False,
) -> Path:
    """Write a deterministic model-zoo style zip (``<name>/configs/...``) of a bundle folder.

    Entries are sorted, stamped with a fixed time and mode, and compressed with a fixed level, so packaging
    the same files twice gives the same bytes (and the same hash to publish). The zip is written to a
    temporary file and renamed into place, readable by everyone (mode 0644, as a published file should be).
    Run outputs (TensorBoard logs, evaluation outputs, caches, TorchScript exports, checkpoints) are left out,
    and so are the files the bundle's ``large_files`` list names: a release publishes them beside the zip, and
    ``python -m monai.bundle download_large_files`` fetches and checks them (as model-zoo releases do).

    Args:
        bundle_dir: the bundle root (must hold ``configs/metadata.json``).
        output_zip: the archive to write; if it lies inside ``bundle_dir`` it is not packaged into itself.
        name: the bundle name, the archive's top folder: letters, digits, ``_`` and ``-`` (MONAI derives the
            folder it checks from the zip name up to its first dot).
        exclude: patterns of paths to leave out, see :data:`DEFAULT_EXCLUDE`.
        include_ssl: also package ``models/ssl`` (the pretrained encoder, its card and the aggregator; never
            its checkpoints), for a release that ships the self-supervised weights.
        include_large_files: also package the files of the ``large_files`` list (a zip that works offline).

    Returns:
        ``output_zip`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a bad name, no ``configs/metadata.json``, or a symbolic link in the bundle.
    """
    bundle_dir, output_zip = Path(bundle_dir), Path(output_zip)
    if not _BUNDLE_NAME.match(name):
        raise ValueError(f"bundle name {name!r} must be letters, digits, '_' or '-' (no dots or slashes)")
    if not (bundle_dir / "configs" / "metadata.json").is_file():
        raise ValueError(f"{bundle_dir} is not a bundle: configs/metadata.json is missing")
    output_real = output_zip.resolve()
    exclude = tuple(exclude) if include_ssl else (*exclude, SSL_OUTPUTS)
    large = set() if include_large_files else _large_file_paths(bundle_dir)
    files: list[tuple[str, Path]] = []
    for folder, dirnames, filenames in os.walk(bundle_dir):
        folder_path = Path(folder)
        for entry in sorted(dirnames) + sorted(filenames):
            path = folder_path / entry
            rel = PurePosixPath(path.relative_to(bundle_dir).as_posix())
            if _excluded(rel, exclude) or rel.as_posix() in large or path.resolve() == output_real:
                if entry in dirnames:
                    dirnames.remove(entry)
                continue
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link: replace it by the file or exclude it")
            if entry in filenames:
                files.append((rel.as_posix(), path))
    output_zip.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output_zip.name}.", suffix=".tmp", dir=output_zip.parent)
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w") as archive:
            for rel, path in sorted(files):
                info = zipfile.ZipInfo(f"{name}/{rel}", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # unix, so the mode bits below mean the same on every platform
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, path.read_bytes(), compresslevel=9)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private (0600)
        os.replace(tmp_name, output_zip)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return output_zip


def fetch_bundle(
    url: str,
    bundle_dir: str | os.PathLike,
    name: str,
    hash_val: str | None = None,
    hash_type: str = "sha256",
    overwrite: bool = False,
    **limits: float,
) -> Path:
    """Download a bundle zip (``http(s)://``, ``file://``), check it, extract it safely to ``bundle_dir``.

    The download uses MONAI's ``download_url`` (which checks ``hash_val`` when given); extraction uses
    :func:`safe_extract_zip` with ``expected_top=name`` instead of MONAI's extraction, and the paths and hash
    fields of the bundle's ``large_files`` list are checked (the large files themselves are fetched later by
    ``python -m monai.bundle download_large_files`` and verified with :func:`verify_large_files`). The zip is
    kept as ``bundle_dir/<name>.zip``, as MONAI's ``download`` does.

    Args:
        url: where the zip is.
        bundle_dir: the folder that receives ``<name>/`` and ``<name>.zip``.
        name: the bundle name, the zip's required top folder.
        hash_val: the expected hash of the zip, or ``None`` not to check it.
        hash_type: ``md5``, ``sha1``, ``sha256`` or ``sha512``.
        overwrite: replace an existing ``bundle_dir/<name>``.
        limits: ``max_total_bytes``, ``max_ratio``, ``max_entries`` for :func:`safe_extract_zip`.

    Returns:
        The extracted bundle folder.
    """
    from monai.apps.utils import download_url  # MONAI's downloader: progress, hash check, proxies

    if not _BUNDLE_NAME.match(name):
        raise ValueError(f"bundle name {name!r} must be letters, digits, '_' or '-' (no dots or slashes)")
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.download.", dir=bundle_dir) as tmp:
        downloaded = Path(tmp) / f"{name}.zip"
        download_url(url=url, filepath=downloaded, hash_val=hash_val, hash_type=hash_type, progress=False)
        if not downloaded.is_file():  # download_url swallows some permission errors
            raise OSError(f"downloading {url} to {downloaded} produced no file")
        extracted = safe_extract_zip(downloaded, bundle_dir, expected_top=name, overwrite=overwrite, **limits)
        os.replace(downloaded, bundle_dir / f"{name}.zip")
    verify_large_files(extracted, require_files=False)
    return extracted
