"""``aimm data download`` against a fixture archive served from 127.0.0.1 (no network)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aimm.data import download as dl
from aimm.data.manifest import RELEASE_COMMIT, SPECIAL_FILES, build_manifest, load_manifest

REPO = Path(__file__).resolve().parents[1]
TOP = f"AimMerging-{RELEASE_COMMIT}"
POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4700190\n"
DBPEDIA_TEST = "data_longsequence/test/dbpedia_T5.json"
YAHOO_TEST = "data_longsequence/test/yahoo_T5.json"


def _records(task: str, n: int, rng: random.Random, text_len: int = 40) -> bytes:
    rows = [{"id": f"{task}_{i}", "input": "".join(rng.choices("abcdefghij ", k=text_len)),
             "output": rng.choice(["yes", "no"])} for i in range(n)]
    return json.dumps(rows, indent=4).encode()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Reference data dir, its manifest, and the archive bytes (.tar.gz like GitHub's, and .zip)."""
    root = tmp_path_factory.mktemp("release")
    ref = root / "ref"
    rng = random.Random(0)
    files = {f"data_longsequence/{split}/{task}_T5.json": _records(task, 8, rng)
             for split in ("train", "dev", "test") for task in ("sst-2", "agnews", "dbpedia")}
    files["data_longsequence/train/yahoo_T5.json"] = _records("yahoo", 8, rng)
    files["data_longsequence/dev/yahoo_T5.json"] = _records("yahoo", 8, rng)
    files["data_superni/train/task002_T5.json"] = _records("task002", 3000, rng)  # ~300 kB: a mid-way cut
    files["data_superni/test/task002_T5.json"] = _records("task002", 8, rng)
    for rel, data in files.items():
        (ref / rel).parent.mkdir(parents=True, exist_ok=True)
        (ref / rel).write_bytes(data)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(build_manifest(ref, SPECIAL_FILES)), encoding="utf-8")
    # The archive holds what the release holds: LFS pointers for dbpedia/yahoo test, extra files.
    members = {**files, DBPEDIA_TEST: POINTER, YAHOO_TEST: POINTER, "Readme.md": b"# AIMMerging\n",
               "data_superni/.DS_Store": b"\0\1", "data_longsequence/data_preprocessing.py": b"pass\n"}
    return {"ref": ref, "manifest": manifest, "files": files, "members": members,
            "tar": make_tar(members), "zip": make_zip(members)}


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for rel, data in members.items():
            info = tarfile.TarInfo(f"{TOP}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in members.items():
            zf.writestr(f"{TOP}/{rel}", data)
    return buf.getvalue()


class Server:
    """A one-file HTTP server on 127.0.0.1 with Range support; can die mid-way once."""

    def __init__(self) -> None:
        self.payload = b""
        self.die_after: int | None = None
        self.ignore_range = False
        self.requests: list[str | None] = []  # the Range header of each request
        self.paths: list[str] = []  # the request target of each request
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                server.requests.append(rng)
                server.paths.append(self.path)
                data, start = server.payload, 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.die_after is not None:
                    cut, server.die_after = server.die_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{RELEASE_COMMIT}.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(release, tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIMM_CACHE", str(tmp_path / "cache"))
    srv = Server()
    srv.payload = release["tar"]
    yield srv
    srv.close()


def run(dest, server, release, **kw) -> int:
    return dl.main_download(dest, server.url, manifest_path=release["manifest"], progress=False,
                            retry_wait=0, **kw)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def assert_placed(dest: Path, release) -> None:
    """Every file of the reference except the LFS-backed dbpedia test is placed, byte for byte."""
    placed = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert placed == set(release["files"]) - {DBPEDIA_TEST}
    for rel in placed:
        assert (dest / rel).read_bytes() == release["files"][rel], rel


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_good_download_places_verified_files_and_says_what_is_missing(kind, release, server, tmp_path, capsys):
    server.payload = release[kind]
    dest = tmp_path / "data" / "aimm"
    assert run(dest, server, release) == 0
    assert_placed(dest, release)
    out = capsys.readouterr().out
    n_release = len(release["files"]) - 1
    assert f"{dest}: {n_release} files verified against {release['manifest']}" in out
    dbpedia = next(line for line in out.splitlines() if DBPEDIA_TEST in line)
    assert "Git LFS pointer" in dbpedia and f"aimm data convert dbpedia {dest}" in dbpedia
    assert "CL_Benchmark/TC/dbpedia/test.json" in dbpedia
    yahoo = next(line for line in out.splitlines() if YAHOO_TEST in line)
    assert "falls back to" in yahoo and "dev/yahoo_T5.json" in yahoo
    assert leftovers(dest.parent) == [] and not list((tmp_path / "cache").rglob("*.part"))
    assert server.requests == [None]
    # A second run only verifies the existing folder: no request, still complete.
    assert run(dest, server, release) == 0
    assert server.requests == [None]


def test_hash_mismatch_names_the_file_and_leaves_nothing(release, server, tmp_path, capsys):
    bad = "data_longsequence/train/sst-2_T5.json"
    server.payload = make_tar({**release["members"], bad: release["files"][bad].replace(b"yes", b"yep", 1)})
    dest = tmp_path / "data" / "aimm"
    assert run(dest, server, release) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("aimm data download: error: ")
    assert f"{bad}: sha256" in err and "differs from the manifest" in err
    assert not dest.exists() and not dest.parent.exists()  # the parents it made are gone too
    assert not list((tmp_path / "cache").rglob("*.part"))  # the bad archive is not resumed later


def test_lfs_pointer_in_a_release_file_is_an_error(release, server, tmp_path, capsys):
    rel = "data_superni/test/task002_T5.json"
    server.payload = make_tar({**release["members"], rel: POINTER})
    assert run(tmp_path / "aimm", server, release) == 2
    err = capsys.readouterr().err
    assert f"{rel}: the archive holds a Git LFS pointer" in err
    assert not (tmp_path / "aimm").exists()


def test_interrupted_download_resumes_with_range(release, server, tmp_path, capsys):
    dest = tmp_path / "aimm"
    cut = len(release["tar"]) // 3
    server.die_after = cut
    with pytest.raises(dl.DownloadError, match="interrupted after .* re-run to resume"):
        dl.download(dest, server.url, manifest_path=release["manifest"], progress=False, retries=1)
    parts = list((tmp_path / "cache").rglob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == cut
    assert not dest.exists() and leftovers(tmp_path) == []
    # Re-running resumes from the partial archive.
    assert run(dest, server, release) == 0
    assert server.requests == [None, f"bytes={cut}-"]
    assert_placed(dest, release)
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_retry_within_one_run_resumes(release, server, tmp_path):
    server.die_after = 1000
    result = dl.download(tmp_path / "aimm", server.url, manifest_path=release["manifest"],
                         progress=False, retry_wait=0)
    assert server.requests == [None, "bytes=1000-"]
    assert result.verified == len(release["files"]) - 1


def _preplace_part(url: str, data: bytes) -> Path:
    part = dl._part_path(url)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    return part


def test_complete_part_file_is_not_fetched_again(release, server, tmp_path):
    """Killed after the fetch, before the extraction: the server answers 416 bytes */N."""
    _preplace_part(server.url, release["tar"])
    assert run(tmp_path / "aimm", server, release) == 0
    assert server.requests == [f"bytes={len(release['tar'])}-"]
    assert_placed(tmp_path / "aimm", release)


def test_server_ignoring_range_restarts_the_file(release, server, tmp_path):
    _preplace_part(server.url, release["tar"][:5000])
    server.ignore_range = True  # answers 200 with the whole archive
    assert run(tmp_path / "aimm", server, release) == 0
    assert server.requests == ["bytes=5000-"]
    assert_placed(tmp_path / "aimm", release)


def test_proxy_from_the_environment_is_used(release, server, tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.httpd.server_address[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    url = "http://data.example.invalid/release.tar.gz"  # resolvable only through the proxy
    code = dl.main_download(tmp_path / "aimm", url, manifest_path=release["manifest"],
                            progress=False, retry_wait=0)
    assert code == 0 and server.paths == [url]  # a proxy request carries the absolute URL
    assert_placed(tmp_path / "aimm", release)


def test_truncated_archive_is_rejected_and_forgotten(release, server, tmp_path, capsys):
    server.payload = release["tar"][: len(release["tar"]) // 2]
    dest = tmp_path / "aimm"
    assert run(dest, server, release) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "truncated or corrupt archive" in err
    assert not dest.exists() and leftovers(tmp_path) == []
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_destination_not_writable(release, server, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    dest = blocker / "aimm"  # its parent is a regular file: fails even for root
    assert run(dest, server, release) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "disk problem: cannot create" in err and str(blocker) in err
    assert server.requests == []  # checked before anything is fetched
    assert blocker.read_text() == "x"


def test_network_error_is_one_line(release, server, tmp_path, capsys):
    server.close()
    code = dl.main_download(tmp_path / "aimm", server.url, manifest_path=release["manifest"],
                            progress=False, retry_wait=0)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "network error" in err and server.url in err
    assert not (tmp_path / "aimm").exists()
    server.close = lambda: None  # already closed


def test_shipped_manifest_lists_the_release():
    manifest = load_manifest()
    assert len(manifest.entries) == 90
    assert {rel for rel, e in manifest.entries.items() if not e.required} == {DBPEDIA_TEST, YAHOO_TEST}
    assert manifest.entries[DBPEDIA_TEST].status == "rebuilt" and manifest.entries[DBPEDIA_TEST].sha256
    assert manifest.entries[YAHOO_TEST].status == "absent" and not manifest.entries[YAHOO_TEST].sha256
    assert manifest.url.endswith(f"/archive/{RELEASE_COMMIT}.tar.gz")


def test_main_job_downloads_when_nothing_is_found(release, server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AIMM_DATA", raising=False)
    monkeypatch.delenv("AIMM_OFFLINE", raising=False)
    monkeypatch.setattr("aimm.data.paths._REPO_ROOT", tmp_path / "clone")  # no ../shared next to it
    monkeypatch.chdir(tmp_path)
    found = dl.ensure_data(url=server.url, manifest_path=release["manifest"], progress=False)
    assert found == Path("data/aimm")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[aimm] no benchmark data found: downloading") and "data/aimm" in out[0]
    assert_placed(tmp_path / "data" / "aimm", release)
    # Found now: no second download.
    assert dl.ensure_data(url=server.url, manifest_path=release["manifest"]) == Path("data/aimm")
    assert server.requests == [None]
    with pytest.raises(FileNotFoundError, match="given explicitly"):
        dl.ensure_data(tmp_path / "nowhere")


def test_main_job_offline_without_data_names_the_command(tmp_path):
    """A fresh clone (no ../shared next to it), no data anywhere, AIMM_OFFLINE=1: one line, exit 2."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "aimm", clone / "aimm", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("AIMM_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(clone), AIMM_OFFLINE="1", AIMM_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "aimm.cli", "reproduce", "--preset", "demo"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err, err
    assert "no benchmark data found" in err and "AIMM_OFFLINE=1" in err
    assert err.endswith("run: aimm data download --dest data/aimm")
    assert list(work.iterdir()) == []  # nothing written: no runs/, no Fig/, no data/
