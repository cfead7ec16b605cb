"""``aimm data download``: fetch the release data, verify it, place it atomically.

The archive of the pinned AimMerging commit (:data:`aimm.data.manifest.RELEASE_URL`, or
``url``) is fetched with :mod:`urllib` (which honours ``http_proxy``, ``https_proxy`` and
``no_proxy`` from the environment) into ``<cache>/downloads/<name>.part`` (``$AIMM_CACHE``,
default ``~/.cache/aimm``); an interrupted fetch resumes there with an HTTP ``Range`` request.
Only the manifest's files under ``data_longsequence/`` and ``data_superni/`` are extracted,
into a temporary folder next to the destination, each checked against its sha256; the folder
is then renamed onto the destination. Any failure removes the temporary folder, so the
destination is either complete or untouched.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import IO

from .manifest import Entry, Manifest, file_sha256, load_manifest
from .paths import DATA_ENV, FILE_SUFFIX, resolve_data_dir

#: Where the main job downloads to when it finds no data (relative to the working directory).
DEFAULT_DEST = Path("data") / "aimm"
#: Set to 1 to forbid the main job's automatic download.
OFFLINE_ENV = "AIMM_OFFLINE"
LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"
_CHUNK = 1 << 16
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)
_NETWORK = (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError)


class DownloadError(OSError):
    """The download failed: network, disk, or content (a hash mismatch, a corrupt archive).

    ``str()`` is one line naming the file or URL and what to do.
    """


@dataclass
class DownloadResult:
    """What :func:`download` placed: the destination, verified files, and missing-file notes."""

    dest: Path
    manifest: Path
    verified: int = 0
    missing: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """Where partial archives are kept: ``$AIMM_CACHE/downloads`` (default ``~/.cache/aimm``)."""
    return Path(os.environ.get("AIMM_CACHE") or Path.home() / ".cache" / "aimm") / "downloads"


def _fill_hint(entry: Entry, dest: Path) -> str:
    """How to fill a missing rebuilt/absent file."""
    if entry.fallback:
        return f"nothing to do: evaluation falls back to {dest / entry.fallback} (recorded as a run warning)"
    task = Path(entry.path).name.removesuffix(FILE_SUFFIX)
    split = Path(entry.path).parent.name
    raw = entry.raw or f"CL_Benchmark/<group>/{task}"
    return (f"copy O-LoRA's {raw}/{split}.json and labels.json into a folder named {task}/, "
            f"then run: aimm data convert {task} {dest}")


def _missing_line(entry: Entry, dest: Path, why: str) -> str:
    return f"missing {entry.path} ({why}); {_fill_hint(entry, dest)}"


# ----------------------------------------------------------------------------- fetching

def fetch(url: str, part: Path, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` into ``part``, resuming from its current size with a ``Range`` request.

    A server that ignores the range (status 200) restarts the file; 416 with a matching
    ``Content-Range: bytes */N`` means the file is already complete.

    Raises:
        DownloadError: network failure (the partial file is kept for the next attempt).
        OSError: the partial file cannot be written.
    """
    from tqdm.auto import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "aimm-data-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        # A fresh opener per call: its ProxyHandler reads http(s)_proxy / no_proxy now.
        response = urllib.request.build_opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        total = (err.headers.get("Content-Range") or "").rpartition("/")[2]
        if err.code == 416 and total == str(offset):
            return part
        if err.code == 416:
            part.unlink()
        raise DownloadError(f"network error: {url}: HTTP {err.code} {err.reason}") from None
    except _NETWORK as err:
        raise DownloadError(f"network error: {url}: {getattr(err, 'reason', err)}") from None
    with response:
        if response.status == 206:
            start = (response.headers.get("Content-Range") or "").removeprefix("bytes ").partition("-")[0]
            if start != str(offset):
                part.unlink()
                raise DownloadError(f"network error: {url}: answered range {start}- for {offset}-; "
                                    "re-run to download afresh")
        else:
            offset = 0  # a full response: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc="download", disable=not progress, leave=False) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
                if total is not None and out.tell() < total:  # http.client ends short reads silently
                    raise ConnectionResetError(f"connection closed at byte {out.tell()} of {total}")
            except _NETWORK as err:  # a disk error while writing propagates as OSError
                out.flush()
                raise DownloadError(
                    f"network error: {url}: interrupted after {out.tell()} bytes ({err}); "
                    f"re-run to resume from {part}") from None
    return part


def fetch_with_retries(url: str, part: Path, *, retries: int = 3, wait: float = 2.0,
                       progress: bool = True, timeout: float = 60.0) -> Path:
    """:func:`fetch`, resumed up to ``retries`` times after a network failure."""
    for attempt in range(1, retries + 1):
        try:
            return fetch(url, part, progress=progress, timeout=timeout)
        except DownloadError:
            if attempt == retries:
                raise
            time.sleep(wait * attempt)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- extraction

def _strip_top(name: str) -> str:
    """An archive member's path below its top folder (``AimMerging-<commit>/``)."""
    return name.removeprefix("./").partition("/")[2]


def archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """``(path below the top folder, opener)`` for each regular file of a .tar(.gz) or .zip."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield _strip_top(info.filename), lambda info=info: zf.open(info)
        return
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if member.isfile():
                yield _strip_top(member.name), lambda member=member: tf.extractfile(member)


def _copy_hashed(source: IO[bytes], target: Path) -> tuple[str, int, bool]:
    """Copy a stream to ``target``; returns (sha256, size, is a Git LFS pointer)."""
    digest, size, head = hashlib.sha256(), 0, b""
    with source, open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            if size < len(LFS_HEADER):
                head += chunk[: len(LFS_HEADER)]
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, size < 1024 and head.startswith(LFS_HEADER)


def extract_verified(archive: Path, manifest: Manifest, tmp: Path, dest: Path) -> DownloadResult:
    """Extract the manifest's files from ``archive`` into ``tmp`` and check each hash.

    Release files must match; rebuilt/absent ones are kept only when they match, otherwise
    removed and reported (with how to fill them) in :attr:`DownloadResult.missing`.

    Raises:
        DownloadError: a hash mismatch or a Git LFS pointer in a release file (naming the
            first such file), release files the archive lacks, or a truncated/corrupt archive.
    """
    found: dict[str, tuple[str, int, bool]] = {}
    try:
        for rel, opener in archive_members(archive):
            if rel in manifest.entries and rel not in found:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                found[rel] = _copy_hashed(opener(), target)
    except _CORRUPT as err:
        raise DownloadError(f"{archive}: truncated or corrupt archive ({err}); re-run to download it again") from None
    result = DownloadResult(dest=dest, manifest=manifest.source)
    problems: list[str] = []
    for rel, entry in manifest.entries.items():
        sha, _, pointer = found.get(rel, (None, 0, False))
        if sha is not None and sha == entry.sha256:
            result.verified += 1
            continue
        if sha is not None:
            (tmp / rel).unlink()
        if entry.required:
            if sha is None:
                problems.append(f"{rel}: not in the archive")
            elif pointer:
                problems.append(f"{rel}: the archive holds a Git LFS pointer, not the data "
                                "(use a mirror that serves LFS content)")
            else:
                problems.append(f"{rel}: sha256 {sha} differs from the manifest's {entry.sha256}")
        else:
            why = ("the archive holds a Git LFS pointer" if pointer else
                   "the archive's copy differs from the verified one" if sha else "not in the archive")
            result.missing.append(_missing_line(entry, dest, why))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DownloadError(f"{problems[0]}{more}; source {archive}, manifest {manifest.source}")
    return result


def verify_tree(root: Path, manifest: Manifest) -> DownloadResult:
    """Check an existing data directory: every release file must match its hash.

    Rebuilt/absent files may hold anything (e.g. filled by ``aimm data convert``).

    Raises:
        DownloadError: naming the first release file that is missing or differs.
    """
    result = DownloadResult(dest=root, manifest=manifest.source)
    for rel, entry in manifest.entries.items():
        path = root / rel
        if entry.required:
            if not path.is_file():
                raise DownloadError(f"{root}: exists but lacks {rel}; remove it or pass another --dest")
            if file_sha256(path) != entry.sha256:
                raise DownloadError(f"{path}: sha256 differs from the manifest; remove {root} or pass another --dest")
            result.verified += 1
        elif not path.is_file():
            result.missing.append(_missing_line(entry, root, "not present"))
        elif file_sha256(path) == entry.sha256:
            result.verified += 1
    return result


# ----------------------------------------------------------------------------- placing

def _make_parents(path: Path) -> list[Path]:
    """Create ``path`` and missing parents; returns those created (deepest last)."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _part_path(url: str) -> Path:
    name = url.rstrip("/").rsplit("/", 1)[-1] or "archive"
    return cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}.part"


def download(dest: str | os.PathLike[str] = DEFAULT_DEST, url: str | None = None, *,
             manifest_path: str | os.PathLike[str] | None = None, progress: bool = True,
             retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0) -> DownloadResult:
    """Fetch, verify and place the release data at ``dest`` (see the module docstring).

    An existing non-empty ``dest`` is only verified (:func:`verify_tree`), never overwritten.

    Raises:
        DownloadError: network error, hash mismatch, corrupt archive, or a disk problem
            (destination not creatable, not enough space), as one line.
    """
    manifest = load_manifest(manifest_path)
    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()):
        return verify_tree(dest, manifest)
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest}: exists and is not a folder; pass another --dest")
    url = url or manifest.url
    try:
        created = _make_parents(dest.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as err:
        raise DownloadError(f"disk problem: cannot create {dest}: {err}") from None
    try:
        free = shutil.disk_usage(tmp).free
        if free < manifest.required_bytes:
            raise DownloadError(f"disk problem: {dest.parent} has {free >> 20} MiB free, "
                                f"the data needs {manifest.required_bytes >> 20} MiB")
        part = _part_path(url)
        try:
            fetch_with_retries(url, part, retries=retries, wait=retry_wait,
                               progress=progress, timeout=timeout)
        except OSError as err:
            if isinstance(err, DownloadError):
                raise
            raise DownloadError(f"disk problem: cannot write the archive: {err}") from None
        try:
            result = extract_verified(part, manifest, tmp, dest)
        except DownloadError:
            part.unlink(missing_ok=True)  # bad content: the next run fetches it afresh
            raise
        except OSError as err:
            raise DownloadError(f"disk problem: cannot extract into {tmp}: {err}") from None
        if dest.is_dir():
            dest.rmdir()  # an empty folder: replaced by the rename
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                break
        raise
    part.unlink(missing_ok=True)
    return result


def report_lines(result: DownloadResult) -> list[str]:
    """The summary printed after a successful download or check."""
    return [f"{result.dest}: {result.verified} files verified against {result.manifest}", *result.missing]


def main_download(dest: str | os.PathLike[str] = DEFAULT_DEST, url: str | None = None, *,
                  manifest_path: str | os.PathLike[str] | None = None, progress: bool = True,
                  retry_wait: float = 2.0) -> int:
    """``aimm data download``: 0 when the data is complete, 2 with one line on stderr otherwise."""
    try:
        result = download(dest, url, manifest_path=manifest_path, progress=progress,
                          retry_wait=retry_wait)
    except (DownloadError, ValueError) as err:
        print(f"aimm data download: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(result)))
    return 0


# ----------------------------------------------------------------------------- the main job

def offline() -> bool:
    """True when ``$AIMM_OFFLINE`` forbids the automatic download."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def ensure_data(data_dir: str | os.PathLike[str] | None = None,
                target: str | os.PathLike[str] = DEFAULT_DEST, **download_options) -> Path:
    """The data directory of the main job: found (:func:`resolve_data_dir`) or downloaded.

    With nothing given and nothing found, the data is downloaded into ``target`` (announced in
    one line) unless ``$AIMM_OFFLINE`` is set; an explicit ``data_dir`` or ``$AIMM_DATA`` that
    does not exist is an error, never a download. ``download_options`` go to :func:`download`.

    Raises:
        FileNotFoundError: offline with no data, naming the exact command to run.
        DownloadError: the download failed.
    """
    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        if data_dir is not None or os.environ.get(DATA_ENV):
            raise
    target = Path(target)
    if offline():
        raise FileNotFoundError(
            f"no benchmark data found (--data-dir, ${DATA_ENV}, ./data/aimm, ../shared/benchmarks/aimm) "
            f"and {OFFLINE_ENV}=1 forbids the download; run: aimm data download --dest {target}")
    print(f"[aimm] no benchmark data found: downloading the AimMerging release data into {target} "
          f"(aimm data download; set {OFFLINE_ENV}=1 to stop instead)", flush=True)
    result = download(target, **download_options)
    for line in result.missing:
        print(f"[aimm] {line}", flush=True)
    return target


__all__ = ["DEFAULT_DEST", "DownloadError", "DownloadResult", "download", "ensure_data",
           "extract_verified", "fetch", "main_download", "offline", "verify_tree"]
