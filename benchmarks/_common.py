"""Helpers shared by the speed benchmarks: environment record, peak-memory sampling, JSON out."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


#: ``--dtype`` choices; ``auto`` is what aimm's ``dtype: auto`` picks here (aimm.hardware).
DTYPE_CHOICES = ["float32", "bfloat16", "auto"]


def concrete_dtype(name: str, device: str) -> str:
    """``--dtype`` as the benchmark runs it: ``auto`` resolved for ``device`` (the JSON records
    the dtype that ran)."""
    from aimm.hardware import auto_dtype

    return auto_dtype(device) if name == "auto" else name


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device: str, **extra: Any) -> dict[str, Any]:
    """What a speed number depends on: versions, device, threads, load (the machine is shared)."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cuda_available": torch.cuda.is_available(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    for pkg in ("transformers", "peft", "accelerate"):
        try:
            from importlib import metadata

            env[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001 - informative only
            env[pkg] = None
    env.update(extra)
    return env


class PeakMemory:
    """Peak memory of a window: CUDA ``max_memory_allocated`` or the process's peak RSS.

    On CPU a daemon thread samples the resident set size (``psutil``) every ``interval`` s;
    ``reset()`` starts a window, ``peak()`` is the largest value since. RSS is process-wide and
    the allocator keeps freed pages, so later windows of one process read high baselines: the
    ``baseline`` (RSS at ``reset()``) is reported next to the peak.
    """

    def __init__(self, device: str, interval: float = 0.02) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device == "cuda" else "rss"
        self.interval = interval
        self._peak = 0
        self.baseline = 0
        self._stop = threading.Event()
        self._thread = None
        self._proc = None
        if self.kind == "rss":
            try:
                import psutil

                self._proc = psutil.Process()
            except ImportError:  # pragma: no cover - psutil comes with accelerate
                self.kind = "unavailable"
                return
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                value = self._rss()
            except Exception:  # noqa: BLE001 - never kill the benchmark for a sample
                value = 0
            if value > self._peak:
                self._peak = value
            self._stop.wait(self.interval)

    def reset(self) -> None:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = int(torch.cuda.memory_allocated())
            self._peak = self.baseline
        elif self.kind == "rss":
            self.baseline = self._rss()
            self._peak = self.baseline

    def read(self) -> int:
        """Update and return the peak of the current window."""
        if self.kind == "cuda_max_memory_allocated":
            self._peak = max(self._peak, int(torch.cuda.max_memory_allocated()))
        elif self.kind == "rss":
            self._peak = max(self._peak, self._rss())
        return self._peak

    def close(self) -> None:
        self._stop.set()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def fail(prog: str, message: str) -> None:
    """Bad user input: one line on stderr naming the parameter, exit code 2."""
    import sys

    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_json(path: str | Path, result: dict) -> None:
    """Write atomically (a sub-benchmark killed by ``timeout`` leaves the last complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
