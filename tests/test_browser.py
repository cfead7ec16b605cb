"""Notebook 03 in a real JupyterLab, driven by headless Chromium (Playwright).

Starts JupyterLab on a free localhost port (token set, no browser, isolated config and
settings), in a temporary folder holding a copy of notebook 03 parameterised for a tiny run made
here, runs all cells from the Run menu and checks that the plotly figures and the explorer's
widget controls render. The screenshot goes to the test's tmp dir and ``runs/browser/``.

Without Playwright or Debian's Chromium the test skips; under CI (``$CI`` set) it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aimm import notebook
from conftest import make_tiny_benchmark

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = "03_trajectory_visualization.ipynb"
SCREENSHOT_COPY = REPO / "runs" / "browser" / "notebook03.png"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must have it)")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_runs(root: Path, bench: Path) -> dict:
    """seq_lora + aimmerging on two tiny tasks: the notebook parameters that name them."""
    values = {"benchmark": "long_sequence", "order": None, "tasks": ["sst-2", "agnews"],
              "methods": ["seq_lora", "aimmerging"], "smoke": True, "data_dir": str(bench),
              "run_root": str(root / "runs"), "run_name": "browser", "fig_formats": [],
              "interactive": False}
    notebook.train_all(notebook.validate_parameters(values))
    values["interactive"] = True  # as a person in JupyterLab has it
    return values


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost serving ``tmp_path/work``: (url, token, work dir)."""
    work = tmp_path / "work"
    work.mkdir()
    config = tmp_path / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    # no "receive news?" prompt, no update check: nothing reaches out of the machine
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    port, token = _free_port(), "aimm-browser-test-token"
    log = (tmp_path / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--ServerApp.port_retries=0", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("JupyterLab did not start:\n"
                                   + (tmp_path / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, token, work
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _run_all(page, attempts: int = 3) -> None:
    """Run → Run All Cells once the kernel is connected and idle (the status bar says so).

    A busy machine can make JupyterLab ask "Select Kernel" (accepted with its default, Python 3)
    or drop the request while the kernel connects; then Run All is tried again.
    """
    started = ".jp-CodeCell .jp-InputPrompt:has-text('[*]'), .jp-CodeCell .jp-InputPrompt:has-text('[1]')"
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    for _ in range(attempts):
        if accept.count():
            accept.first.click()
        page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')", timeout=120_000)
        page.click("li.lm-MenuBar-item:has-text('Run')")
        page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
        deadline = time.time() + 30
        while time.time() < deadline:
            if page.locator(started).count():
                return
            if accept.count():
                accept.first.click()
            page.wait_for_timeout(500)
    raise AssertionError(f"no cell started after {attempts} Run All attempts")


def test_notebook03_renders_figures_and_explorer_in_jupyterlab(tmp_path, lab):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed")
    _need(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install chromium)")
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    url, token, work = lab
    params = _tiny_runs(tmp_path, make_tiny_benchmark(tmp_path / "bench"))
    nb = parameterize_notebook(load_notebook_node(str(REPO / "notebooks" / NOTEBOOK)), params)
    nbformat.write(nb, work / NOTEBOOK)

    shot = tmp_path / "notebook03.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}", timeout=90_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=90_000)
            _run_all(page)
            # JupyterLab skips painting cells out of view (content-visibility): wait for the
            # outputs to be attached, then scroll the explorer into view
            explorer = page.wait_for_selector(".jupyter-widgets .js-plotly-plot", state="attached",
                                              timeout=180_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator"
                                   "[data-status='idle']", timeout=120_000)
            explorer.scroll_into_view_if_needed()
            page.wait_for_selector(".widget-dropdown select", timeout=30_000)
            page.wait_for_selector(".widget-slider", timeout=30_000)
            explorer.wait_for_element_state("visible", timeout=30_000)
            plots = page.locator(".jp-OutputArea .js-plotly-plot")
            widgets = page.locator(".jupyter-widgets")
            dropdowns = page.locator(".widget-dropdown select")
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            n_plots, n_dropdowns, n_widgets = plots.count(), dropdowns.count(), widgets.count()
            error_text = [errors.nth(i).inner_text() for i in range(errors.count())]
            page.mouse.move(700, 700)
            page.mouse.wheel(0, -700)  # the last static figure above the explorer, too
            page.mouse.move(5, 1400)  # no hover toolbar over a figure
            page.wait_for_timeout(2000)  # let plotly finish drawing after the scroll
            page.screenshot(path=str(shot))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))  # what the page showed
            raise
        finally:
            browser.close()
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)
    assert not [e for e in error_text if "Traceback" in e or "Error" in e], error_text
    # signals + interval + history loss for task 2, and the explorer's FigureWidget
    assert n_plots >= 4, f"{n_plots} plotly figures rendered"
    assert n_widgets >= 1, "no Jupyter widget rendered"
    assert n_dropdowns >= 4, f"{n_dropdowns} dropdowns rendered"
    assert shot.stat().st_size > 10_000


def test_tensorboard_screenshot_script_shows_the_logged_cards(tmp_path, tiny_data):
    """scripts/tensorboard_screenshot.py (re-makes docs/img/tensorboard_scalars.png): on a tiny
    tracked run, TensorBoard shows every card it photographs (it fails on a missing tag)."""
    import importlib.util

    from aimm.cli import main

    _need(importlib.util.find_spec("playwright") is not None, "playwright is not installed")
    _need(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install chromium)")

    spec = importlib.util.spec_from_file_location("tb_shot", REPO / "scripts" /
                                                  "tensorboard_screenshot.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir = tmp_path / "run"
    assert main(["run", "--method", "aimmerging", "-o", "initial_interval=2", "--benchmark",
                 "long_sequence", "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data),
                 "--model", "tiny-causal", "--max-train", "16", "--max-test", "4",
                 "--batch-size", "4", "--max-input-len", "64", "--run-dir", str(run_dir),
                 "--no-progress", "--log-with", "tensorboard"]) == 0
    shot = tmp_path / "tb.png"
    script.screenshot(run_dir / "logs", shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
