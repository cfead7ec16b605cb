"""The sha256 manifest of the release data that ``aimm data download`` verifies against.

``aimm/data/manifest.json`` lists every ``*_T5.json`` file of the AimMerging release
(``data_longsequence/`` and ``data_superni/``) by its path under the data directory, with its
sha256 and size. Each entry has a ``status``:

- ``release``: in the release archive; the download must produce exactly these bytes.
- ``rebuilt``: the release stores it in Git LFS, which archives and plain clones often lack
  (they hold a pointer); the hash is that of our rebuild (dbpedia test, from O-LoRA's raw CL_Benchmark). A matching copy
  is kept, anything else is reported missing with how ``aimm data convert`` fills it.
- ``absent``: the release has no usable copy (yahoo test); evaluation falls back to dev.

Regenerate it from a reference data directory with
``python -m aimm.data.manifest ../shared/benchmarks/aimm``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import FILE_SUFFIX

#: The authors' repository and the commit whose data the manifest describes.
RELEASE_REPO = "WoodScene/AimMerging"
RELEASE_COMMIT = "5bf254169a2ead4dff12978ab07b2357f0966ab7"
#: The GitHub archive of that commit: one top folder ``AimMerging-<commit>/``.
RELEASE_URL = f"https://github.com/{RELEASE_REPO}/archive/{RELEASE_COMMIT}.tar.gz"
#: The archive's folders that hold the data.
DATA_FOLDERS: tuple[str, ...] = ("data_longsequence", "data_superni")
MANIFEST_PATH = Path(__file__).with_name("manifest.json")
STATUSES: tuple[str, ...] = ("release", "rebuilt", "absent")

#: Files the release archive lacks or that were rebuilt: path -> entry fields.
SPECIAL_FILES: dict[str, dict[str, str]] = {
    "data_longsequence/test/dbpedia_T5.json": {
        "status": "rebuilt",
        "note": "the release stores it in Git LFS, which archives and plain clones often lack; "
                "rebuilt from O-LoRA's CL_Benchmark test file (500 per label, seed 42)",
        "raw": "CL_Benchmark/TC/dbpedia",
    },
    "data_longsequence/test/yahoo_T5.json": {
        "status": "absent",
        "note": "no usable yahoo test split (Git LFS in the release); evaluation falls back to dev",
        "fallback": "data_longsequence/dev/yahoo_T5.json",
    },
}


@dataclass(frozen=True)
class Entry:
    """One manifest file: ``path`` under the data directory, its expected bytes and status."""

    path: str
    status: str = "release"
    sha256: str | None = None
    size: int | None = None
    note: str = ""
    raw: str | None = None
    fallback: str | None = None

    @property
    def required(self) -> bool:
        """True when the download must produce exactly this file."""
        return self.status == "release"


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: where the data comes from and its entries."""

    url: str
    commit: str
    folders: tuple[str, ...]
    entries: dict[str, Entry]
    source: Path

    @property
    def required_bytes(self) -> int:
        """Total size of the files the download places (for the disk-space check)."""
        return sum(e.size or 0 for e in self.entries.values() if e.sha256)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(root: str | os.PathLike[str], special: dict[str, dict[str, str]] | None = None,
                   *, url: str = RELEASE_URL, commit: str = RELEASE_COMMIT,
                   folders: tuple[str, ...] = DATA_FOLDERS) -> dict[str, Any]:
    """The manifest (a JSON-ready dict) of every ``*_T5.json`` under ``root``'s data folders.

    ``special`` (default :data:`SPECIAL_FILES`) marks files the release lacks or that were
    rebuilt; a special file present under ``root`` gets its hash, one absent gets none.

    Raises:
        FileNotFoundError: ``root`` holds none of ``folders``.
    """
    base = Path(root)
    special = SPECIAL_FILES if special is None else special
    if not any((base / folder).is_dir() for folder in folders):
        raise FileNotFoundError(f"{base}: holds none of {', '.join(f + '/' for f in folders)}")
    files: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for path in sorted((base / folder).rglob(f"*{FILE_SUFFIX}")):
            rel = path.relative_to(base).as_posix()
            files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size, "status": "release"}
    for rel, fields in special.items():
        files[rel] = {**files.get(rel, {}), **fields}
    return {"repo": RELEASE_REPO, "commit": commit, "url": url, "folders": list(folders),
            "files": dict(sorted(files.items()))}


def parse_manifest(data: Any, source: Path) -> Manifest:
    """Validate a decoded manifest.

    Raises:
        ValueError: ``<source>: <problem>``.
    """
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError(f"{source}: not a manifest (expected an object with a 'files' object)")
    entries: dict[str, Entry] = {}
    for rel, fields in data["files"].items():
        if not isinstance(fields, dict) or fields.get("status", "release") not in STATUSES:
            raise ValueError(f"{source}: {rel}: bad entry (status must be one of {', '.join(STATUSES)})")
        if fields.get("status", "release") == "release" and not fields.get("sha256"):
            raise ValueError(f"{source}: {rel}: a release file needs a sha256")
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or len(parts) < 2:
            raise ValueError(f"{source}: {rel}: paths must be relative, inside a data folder")
        entries[rel] = Entry(path=rel, **{k: v for k, v in fields.items()
                                          if k in Entry.__dataclass_fields__ and k != "path"})
    folders = tuple(data.get("folders") or DATA_FOLDERS)
    return Manifest(url=str(data.get("url") or RELEASE_URL), commit=str(data.get("commit") or ""),
                    folders=folders, entries=entries, source=source)


def load_manifest(path: str | os.PathLike[str] | None = None) -> Manifest:
    """The manifest at ``path`` (default: the one shipped in the package).

    Raises:
        ValueError: unreadable or malformed, naming the file.
    """
    source = Path(path) if path is not None else MANIFEST_PATH
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: cannot read the manifest ({err})") from None
    return parse_manifest(data, source)


def main(argv: list[str] | None = None) -> int:
    """``python -m aimm.data.manifest DIR [--out FILE]``: (re)build the shipped manifest."""
    parser = argparse.ArgumentParser(prog="python -m aimm.data.manifest", description=main.__doc__)
    parser.add_argument("root", help="reference data directory (holding data_longsequence/ ...)")
    parser.add_argument("--out", default=str(MANIFEST_PATH))
    args = parser.parse_args(argv)
    manifest = build_manifest(args.root)
    Path(args.out).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(manifest['files'])} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
