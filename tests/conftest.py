"""Shared fixtures: a tiny benchmark in the release layout and tiny-model run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aimm.data.synthetic import SYNTHETIC_TASKS as TINY_TASKS  # noqa: F401
from aimm.data.synthetic import make_synthetic_benchmark

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = (REPO.parent / "shared" / "benchmarks" / "aimm").resolve()


def make_tiny_benchmark(root: Path, n_train: int = 24, n_test: int = 6, seed: int = 0) -> Path:
    """Write a 3-task classification benchmark (sst-2, agnews, rte) in the release layout."""
    return make_synthetic_benchmark(root, n_train=n_train, n_test=n_test, seed=seed)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_benchmark(tmp_path_factory.mktemp("bench"))


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A RunConfig factory for fast tiny-model runs on the tiny benchmark."""
    from aimm.config import RunConfig

    def make(**changes):
        values = dict(benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
                      model="tiny-causal", max_train=16, max_test=4, batch_size=4, epochs=1,
                      lr=1e-3, max_input_len=64, eval_batch_size=8, memory_batch_size=4,
                      buffer_fraction=0.25, run_dir=str(tmp_path / "run"), progress=False)
        values.update(changes)
        return RunConfig.from_dict(values)

    return make


def launch_two_processes(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` (a script or ``-m module`` and its arguments) as 2 gloo
    processes on the CPU (``--multi_gpu`` is accelerate's multi-process launcher)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def launch_failure(stderr: str) -> str:
    """What a failed ``accelerate launch`` says: the ranks' own tracebacks (torchrun's summary
    after them fills a plain tail of stderr and hides them)."""
    ranked = [line for line in stderr.splitlines() if line.startswith("[rank")]
    return "\n".join(ranked[-60:]) or stderr[-4000:]


def in_ci() -> bool:
    """``$CI`` set to anything but empty / 0 / false / no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def browser_or_skip() -> str:
    """kaleido's Chrome/Chromium; without one the test skips, except in CI where it fails."""
    from aimm.plots import BrowserNotFoundError, find_browser

    try:
        return find_browser()
    except BrowserNotFoundError as exc:
        if in_ci():
            pytest.fail(f"needs a browser for static figure export, CI must have one "
                        f"(`make setup` installs it): {exc}")
        pytest.skip(f"needs a browser for static figure export (PNG/PDF/SVG): {exc}")


def real_data_or_skip() -> Path:
    """The release benchmark; in CI its absence is a failure, elsewhere a skip."""
    path = Path(os.environ.get("AIMM_DATA") or REAL_DATA)
    if not (path / "data_longsequence").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"benchmark data missing at {path} (CI must have it)")
        pytest.skip(f"benchmark data not found at {path}")
    return path


def nan_loss_at(stage_index: int, step: int):
    """An engine ``loss_hook`` that makes inner step ``step`` of stage ``stage_index`` NaN."""
    def hook(ctx, loss):
        if ctx.stage.index == stage_index and ctx.step == step - 1:
            return loss * float("nan")
        return loss
    return hook
