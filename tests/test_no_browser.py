"""The smoke reproduction on a machine where no browser can be found (a fresh machine).

The child process gets no ``BROWSER_PATH`` and a ``PATH`` holding only this Python's folder. Where
a browser IS installed, every file that kaleido/choreographer or :func:`aimm.plots.find_browser`
would find is hidden by bind-mounting ``/dev/null`` over it in a private mount namespace
(``unshare --mount``), so the search really comes back empty.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_benchmark
from test_notebooks import assert_html_figures

REPO = Path(__file__).resolve().parents[1]
HIDE = 'IFS=:; for f in $AIMM_HIDE; do "$AIMM_MOUNT" --bind /dev/null "$f" || exit 97; done; exec "$@"'


def installed_browsers() -> list[str]:
    """Every browser file the searches of aimm, choreographer and kaleido could return."""
    from choreographer.browsers._chrome_constants import chromium_based_browsers
    from choreographer.cli._cli_utils import get_chrome_download_path

    from aimm.plots import output

    names = list(output.BROWSER_NAMES)
    paths = list(output.BROWSER_CANDIDATES)
    for info in chromium_based_browsers.values():
        names += info.exe_names
        paths += info.typical_paths
    default_path = os.defpath + os.pathsep + os.environ.get("PATH", "")
    paths += [shutil.which(n, path=default_path) for n in names]
    paths.append(str(get_chrome_download_path(mkdir=False) or ""))
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isfile(p)})


def no_browser_command(argv: list[str], hidden: list[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` run with the files ``hidden`` (bind mounts): (command, extra environment)."""
    if not hidden:
        return argv, {}
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    # absolute paths: the child runs with PATH cut down to the venv
    unshare, mount, sh = (shutil.which(tool) for tool in ("unshare", "mount", "sh"))
    if None in (unshare, mount, sh) or subprocess.run(
            [unshare, "--mount", *userns, "true"], capture_output=True).returncode != 0:
        pytest.skip(f"a browser is installed ({', '.join(hidden)}) and this machine cannot hide "
                    "it (no mount namespaces for `unshare --mount`)")
    return ([unshare, "--mount", *userns, sh, "-c", HIDE, "sh", *argv],
            {"AIMM_HIDE": ":".join(hidden), "AIMM_MOUNT": mount})


def test_hiding_makes_a_file_unfindable(tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    check = [sys.executable, "-c", f"import os,sys; sys.exit(0 if os.path.isfile({str(fake)!r}) else 3)"]
    cmd, extra = no_browser_command(check, [str(fake)])
    assert subprocess.run(check).returncode == 0
    assert subprocess.run(cmd, env={**os.environ, **extra}).returncode == 3
    assert fake.is_file()  # hidden in the child's mount namespace only


@pytest.mark.slow
def test_smoke_reproduce_without_a_browser_exports_html_and_warns_once(tmp_path):
    bench = make_tiny_benchmark(tmp_path / "bench")
    cmd, extra = no_browser_command([sys.executable, "-m", "aimm.cli", "reproduce", "--preset", "smoke",
                              "--run-root", str(tmp_path / "runs"), "--fig-dir",
                              str(tmp_path / "Fig"), "--data-dir", str(bench)],
                                    installed_browsers())
    env = {k: v for k, v in os.environ.items() if k != "BROWSER_PATH"}
    env.update(extra, PATH=str(Path(sys.executable).parent), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "no Chrome/Chromium found" in line]
    assert len(warnings) == 1, warnings
    assert "HTML only" in warnings[0] and "PNG were skipped" in warnings[0]  # smoke: html + png
    assert "apt-get install chromium" in warnings[0]
    assert_html_figures(tmp_path / "Fig")
    assert not list((tmp_path / "Fig").glob("*.png"))
    assert "reproduction written to" in proc.stdout
