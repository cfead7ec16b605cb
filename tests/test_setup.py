"""Set-up files: ``scripts/ensure_browser.sh`` (called by ``make setup``) with stubbed system
commands, and ``environment.yml`` against ``pyproject.toml``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ensure_browser.sh"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _ensure(tmp_path: Path, uid: int, sudo: str | None, browser_after_install: bool = True,
            **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script with stub ``python`` (the browser search), ``id``, ``sudo``, ``apt-get``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    marker = tmp_path / "installed"
    # the search finds a browser once apt-get installed one (and browser_after_install)
    _stub(bin_dir, "python", f'[ -e "{marker}" ] && echo /usr/bin/chromium && exit 0; exit 1')
    _stub(bin_dir, "id", f"echo {uid}")
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> "{log}"; '
          + (f'case "$*" in *install*) touch "{marker}";; esac' if browser_after_install else "true"))
    if sudo is not None:
        _stub(bin_dir, "sudo", f'[ "$1" = -n ] || exit 1; shift; echo "sudo" >> "{log}"; '
              + ('exit 1' if sudo == "denied" else '"$@"'))
    for tool in ("touch",):  # PATH holds the stubs and this only: no real sudo or apt-get
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(["/bin/bash", str(SCRIPT), str(bin_dir / "python")], capture_output=True,
                          text=True, env={"PATH": str(bin_dir), **env}, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_as_root_it_installs_debian_chromium_after_an_update(tmp_path):
    proc, calls = _ensure(tmp_path, uid=0, sudo=None)
    assert proc.returncode == 0
    assert calls == ["apt-get update -qq", "apt-get install -y -qq chromium"]
    assert proc.stdout.strip().splitlines()[-1] == "aimm setup: browser for static figures: /usr/bin/chromium"


def test_with_passwordless_sudo_it_installs_through_sudo(tmp_path):
    proc, calls = _ensure(tmp_path, uid=1000, sudo="ok")
    assert proc.returncode == 0
    assert calls == ["sudo", "sudo", "apt-get update -qq", "sudo", "apt-get install -y -qq chromium"]


def test_without_root_or_sudo_it_prints_one_line_and_continues(tmp_path):
    for case, sudo in (("no-sudo", None), ("sudo-denied", "denied")):
        proc, calls = _ensure(tmp_path / case, uid=1000, sudo=sudo)
        assert proc.returncode == 0
        assert "apt-get update -qq" not in calls
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and "no Chrome/Chromium found" in lines[0], lines
        assert "HTML only" in lines[0] and "apt-get install chromium" in lines[0]


def test_a_failed_install_or_the_opt_out_prints_the_line_and_continues(tmp_path):
    proc, calls = _ensure(tmp_path / "fails", uid=0, sudo=None, browser_after_install=False)
    assert proc.returncode == 0 and "apt-get install -y -qq chromium" in calls
    assert "no Chrome/Chromium found" in proc.stdout.strip().splitlines()[-1]
    proc, calls = _ensure(tmp_path / "skip", uid=0, sudo=None, AIMM_SKIP_BROWSER="1")
    assert proc.returncode == 0 and calls == []
    assert "no Chrome/Chromium found" in proc.stdout


def test_a_browser_already_there_installs_nothing(tmp_path):
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "installed").touch()
    proc, calls = _ensure(tmp_path / "pre", uid=0, sudo=None)
    assert proc.returncode == 0 and calls == []
    assert "browser for static figures: /usr/bin/chromium" in proc.stdout


def test_make_setup_and_ci_call_the_script_and_ci_runs_only_the_readme_commands():
    assert os.access(SCRIPT, os.X_OK)
    setup = (REPO / "Makefile").read_text().split("\nsetup:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/ensure_browser.sh $(PY)" in setup
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert [c for c in ci if not c.startswith(("set ", "cd ", "export CI="))] == ["make setup", "make test"]


# ------------------------------------------------------------------------------ environment.yml
def _requirements(lines) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def test_environment_yml_is_a_conda_env_with_the_pins_of_pyproject():
    import tomllib

    import yaml
    from packaging.specifiers import SpecifierSet

    env = yaml.safe_load((REPO / "environment.yml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(env) == {"name", "channels", "dependencies"} and env["name"] == "aimm"
    assert isinstance(env["channels"], list) and all(isinstance(c, str) for c in env["channels"])
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip_sections) == 1 and "pip" in conda
    python = [d for d in conda if d.startswith("python")]
    assert len(python) == 1 and python[0].startswith("python=")
    assert SpecifierSet(project["requires-python"]).contains(python[0].split("=", 1)[1] + ".0")
    pip = pip_sections[0]
    assert pip.count("-e .") == 1  # the package itself
    wanted = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        wanted += extra
    assert _requirements([p for p in pip if p != "-e ."]) == _requirements(wanted)
    assert len(pip) - 1 == len(wanted)  # no duplicates either
