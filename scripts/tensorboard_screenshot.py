"""Re-make docs/img/tensorboard_scalars.png: a tiny AIMMerging run's `--log-with tensorboard`
logs in TensorBoard's time-series page, photographed with headless Chromium (Playwright).

    .venv/bin/python scripts/tensorboard_screenshot.py [--out docs/img/tensorboard_scalars.png]

The run: tiny-causal (random weights, real tokenizer) on Standard CL order 1, 128 training
examples per task at batch 4 (32 steps per task), S0 2, so the controller merges 8 times per
task; it takes under a minute on 2 CPU cores. The model is random, so its loss stays near
ln(vocabulary) and S stays at 2 (every merge forced): the picture shows what is logged, not a
result (the demo's SmolLM2 runs are where S adapts). Needs the release data where `aimm run`
finds it, TensorBoard and Playwright (dev extra) and a Chrome/Chromium (`make setup`).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the cards shown: Λ per merge, the controller's per-step signals and the loss
CARDS = ("merge/lambda", "signal/forgetting", "signal/interval", "signal/threshold", "train/loss")
TAGS = "^(" + "|".join(CARDS) + ")$"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "aimm.cli", "run", "--model", "tiny-causal",
           "--benchmark", "standard_cl", "--order", "1", "--method", "aimmerging",
           "-o", "initial_interval=2", "--max-train", "128", "--max-test", "8", "--batch-size", "4",
           "--eval-mode", "label_scoring", "--seed", "42", "--no-progress",
           "--log-with", "tensorboard", "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, cwd=REPO)


def screenshot(logdir: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from aimm.plots.output import find_browser

    port = _free_port()
    board = subprocess.Popen([str(Path(sys.executable).with_name("tensorboard")), "--logdir",
                              str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"TensorBoard did not answer at {url}")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=find_browser(),
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url + "#timeseries", wait_until="networkidle")
            tag_filter = page.locator("input[placeholder='Filter tags (regex)']").first
            tag_filter.wait_for(timeout=60_000)
            page.get_by_role("button", name="Settings").first.click()  # close the settings pane
            tag_filter.fill(TAGS)
            tag_filter.press("Escape")  # close the tag suggestions over the cards
            page.mouse.click(700, 1080)
            for card in CARDS:  # a tag the run did not log fails here, not in a blank picture
                page.locator(f"text={card}").first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)  # the line charts draw after their cards appear
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        board.terminate()
        board.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "tensorboard_scalars.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aimm-tb-") as tmp:
        run_dir = Path(tmp) / "aimmerging-tiny"
        tiny_run(run_dir)
        screenshot(run_dir / "logs", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
