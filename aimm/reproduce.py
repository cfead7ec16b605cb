"""``aimm reproduce``: the notebooks 01 -> 04 end to end with papermill, from a preset.

Each notebook is executed by papermill (kernel: this Python, working directory: the repository
root) into ``<run_root>/<preset>/notebooks/`` with the preset's parameters; the runs go to
``<run_root>/<preset>/<method>-s<seed>/``, the tables (``data_stats``, ``metrics``) and
``runs.json`` to ``<run_root>/<preset>/`` and the figures to ``fig_dir``. Re-running the same
preset resumes: the engine continues each run after its last completed task (finished runs are
only read), and the notebooks are cheap to execute again. Without a Chrome/Chromium for kaleido
the figures are exported as HTML only, with one warning (:func:`aimm.plots.usable_formats`).

A preset with a results folder (:data:`RESULTS`; ``study``: ``results/study-cpu``) ends by copying
its evidence there (:mod:`aimm.evidence`: tables, ``study_*`` figures, ``command.txt`` with the
command, the package versions and the wall time). A smoke run writes none unless ``results_dir``
is given.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aimm.data.download import ensure_data
from aimm.errors import ConfigError
from aimm.methods import METHODS
from aimm.util import did_you_mean

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ("01_data_prep.ipynb", "02_sequential_training.ipynb",
             "03_trajectory_visualization.ipynb", "04_metrics.ipynb")

ALL_METHODS = list(METHODS)  # every registered method
#: The release's sizes (spec §6): up to 1000 training examples per task, every test example,
#: 10 epochs, micro batch 8 x 4 accumulation, 1024 input tokens. GPU-sized runs.
RELEASE_SIZES: dict[str, Any] = {
    "max_train": 1000, "max_test": None, "epochs": 10,
    "extra": {"batch_size": 8, "grad_accum": 4, "max_input_len": 1024, "eval_batch_size": 64},
}

#: Notebook parameters of each preset (see :class:`aimm.notebook.NotebookParams`). ``demo`` is
#: the README's main job, sized to finish within 30-37 minutes on 2 CPU cores with AMX (bf16) and
#: 49 on 2 AVX2 cores (fp32: ``dtype`` auto). The CPU presets
#: (``demo``, ``study``, ``smoke``) cap the warmup at 10% of a task's steps
#: (``max_warmup_fraction`` 0.1): with 32-48 steps per task the release's 50 warmup steps would
#: never reach the peak lr. The release-sized presets keep the release's exact 50 warmup steps.
CPU_WARMUP = {"max_warmup_fraction": 0.1}
#: The main job (``make demo``): seq_lora and AIMMerging, sized so that AIMMerging's controller
#: acts. 128 training examples at batch 4 = 32 inner steps per task; label scoring (classification
#: tasks: the likelihood of each label, faster than generating) on 40 test examples per task.
#: One change to AIMMerging's release options: initial_interval (S0) 2 instead of 8. With S0 8
#: a 32-step task gets two forced merges (steps 16 and 32) and never leaves the cold start
#: (the first 4 merges keep S0), so the interval cannot move. S0 2 scales the first interval
#: to the task (release: ~310 steps per task / S0 8, ~39 intervals; here 32 / 2 = 16): merges
#: come at least every 2 * S0 = 4 steps, so every task after the first has 5 merges or more
#: even when all are forced, the cold start ends, and S adapts from the 5th merge on.
DEMO: dict[str, Any] = {
    "benchmark": "standard_cl", "order": 1, "tasks": None,
    "methods": ["seq_lora", "aimmerging"], "model": "smollm2-135m",
    "max_train": 128, "max_test": 40, "epochs": 1, "seeds": [42],
    "method_options": {"aimmerging": {"initial_interval": 2}},
    "extra": {"batch_size": 4, "max_input_len": 256, "memory_batch_size": 8,
              "eval_mode": "label_scoring", "eval_batch_size": 20, "dtype": "auto",
              **CPU_WARMUP},
}
PRESETS: dict[str, dict[str, Any]] = {
    "demo": DEMO,
    # The CPU study (issue #14): 4 methods x 3 seeds on Standard CL order 1, label scoring on 100
    # test examples per task; 96 training examples at batch 2 = 48 inner steps per task. The
    # release controller (S0 8, cold start 3) with AIMMerging's `fast` signals (probe every 2nd
    # step on half a batch, rehearsal at the inner batch size): the release probe costs ~3x a
    # seq_lora step (benchmarks/results/cpu-2core). Sized for the 120-minute budget of 2 idle
    # cores: batch 2 rather than 4 halves the inner steps' cost; memory batch 2 = the inner batch,
    # the release's ratio (memory batches of 32 = its effective inner batch 8 x 4; a memory batch
    # of 4 doubled Recurrent-KIF's rehearsal, 143 s of its 281 s stage in
    # benchmarks/results/cpu-2core/study_profile.json); seq_lora / replay do not record the
    # forgetting signal (record_forgetting_signal false).
    # One change to the release controller, as in the demo: initial_interval (S0) 4 instead of
    # 8. With S0 8 a 48-step task gets 3 merges (forced at 16, 32, 48), the cold start (the first
    # 4 merges keep S0) never ends and S cannot move (measured: benchmarks/results/cpu-2core/
    # study_profile.json, 3 merges); with S0 4 merges come at least every 8 steps, so a task gets
    # >= 5 merges and S adapts from the 5th (tested). Rehearsal cost does not grow: a merge
    # rehearses S steps, so the rehearsal steps per task stay ~ the inner steps.
    "study": {
        "benchmark": "standard_cl", "order": 1, "orders": [1], "tasks": None,
        "methods": ["seq_lora", "replay", "aimmerging", "recurrent_kif"], "model": "smollm2-135m",
        "max_train": 96, "max_test": 100, "epochs": 1, "seeds": [1, 2, 3],
        "method_options": {"aimmerging": {"fast": True, "initial_interval": 4}},
        "fig_formats": ["html", "png"],
        "extra": {"batch_size": 2, "max_input_len": 256, "memory_batch_size": 2,
                  "record_forgetting_signal": False, "eval_mode": "label_scoring", "eval_batch_size": 20,
                  "dtype": "auto", **CPU_WARMUP},
    },
    "smoke": {  # tiny random model on three tasks (tests; pass data_dir for a tiny benchmark)
        "benchmark": "long_sequence", "order": None, "tasks": ["sst-2", "agnews", "rte"],
        "methods": ["seq_lora", "aimmerging"], "smoke": True, "seeds": [42],
        "fig_formats": ["html", "png"], "extra": dict(CPU_WARMUP),
    },
    # Issue #16's method catalogue: every registered method once (seed 42) at the demo's sizes
    # and evaluation, so that the methods' scores and wall times compare on one footing
    # (summary.csv: train/eval seconds per method). Long on 2 CPU cores (~20 demo-sized runs);
    # re-running resumes, so it may be spread over several sittings.
    "catalogue": {
        **DEMO, "methods": ALL_METHODS, "fig_formats": ["html", "png"],
        # no forgetting-signal probe for the non-merging methods (the demo records it for
        # seq_lora): each method's wall time is then its own cost
        "extra": {**DEMO["extra"], "record_forgetting_signal": False},
        # and every run trains its own first stage (none is copied from seq_lora's)
        "share_first_stage": False,
    },
    "standard_cl": {"benchmark": "standard_cl", "order": 1, "methods": ALL_METHODS,
                    "model": "smollm2-135m", "seeds": [42], **RELEASE_SIZES},
    "long_sequence": {"benchmark": "long_sequence", "order": 4, "methods": ALL_METHODS,
                      "model": "smollm2-135m", "seeds": [42], **RELEASE_SIZES},
    "superni": {"benchmark": "superni", "order": 1, "methods": ALL_METHODS,
                "model": "smollm2-135m", "seeds": [42], **RELEASE_SIZES},
}


#: Presets whose evidence is committed: preset -> results folder (relative to the working dir).
RESULTS: dict[str, str] = {"study": "results/study-cpu", "catalogue": "results/catalogue-cpu"}


def preset_parameters(preset: str, run_root: str | Path = "runs", fig_dir: str | Path = "Fig",
                      data_dir: str | Path | None = None, model: str | None = None,
                      smoke: bool = False, **overrides: Any) -> dict[str, Any]:
    """The notebook parameters of a preset (absolute paths), validated."""
    from aimm.notebook.params import validate_parameters

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'" + did_you_mean(preset, PRESETS)
                          + f"; choose one of {', '.join(PRESETS)}")
    params: dict[str, Any] = json.loads(json.dumps(PRESETS[preset]))  # a deep copy
    params.update(run_root=str(Path(run_root).resolve()), run_name=preset,
                  fig_dir=str(Path(fig_dir).resolve()), interactive=False, output_dir=None)
    if data_dir is not None:
        params["data_dir"] = str(Path(data_dir).resolve())
    if model is not None:
        local = Path(model).expanduser()
        params["model"] = str(local.resolve()) if local.exists() else model
    if smoke:
        params["smoke"] = True
    if params.get("smoke"):  # the tiny model and sizes replace the preset's: recorded as run
        from aimm.notebook.params import SMOKE_MODEL, SMOKE_SIZES

        if model is not None and model != SMOKE_MODEL:
            how = "--smoke" if smoke else f"the preset {preset}"
            raise ConfigError(f"--model {model}: a smoke run ({how}) trains the tiny random model "
                              f"{SMOKE_MODEL} at tiny sizes; leave out --model, or "
                              + ("--smoke" if smoke else "choose another preset")
                              + f" to train {model}")
        params.update(model=SMOKE_MODEL, **SMOKE_SIZES)
    params.update(overrides)
    validate_parameters(params)
    return params


def _kernel_name(workdir: Path) -> str:
    """A kernel that runs this Python: ``python3`` when it does, else a spec written for it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        argv0 = spec.argv[0] if spec.argv else ""
        if argv0 in ("python", "python3") or Path(argv0).resolve() == Path(sys.executable).resolve():
            return "python3"  # jupyter_client replaces a bare "python" with sys.executable
    except NoSuchKernel:
        pass
    kdir = workdir / "kernels" / "aimm-reproduce"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "aimm (reproduce)", "language": "python"}), encoding="utf-8")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(workdir)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    return "aimm-reproduce"


def command_line(preset: str, **flags: Any) -> str:
    """``aimm reproduce --preset P`` with the flags given (None / False left out)."""
    parts = ["aimm", "reproduce", "--preset", preset]
    for key, value in flags.items():
        if value is True:
            parts.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            parts += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def reproduce(preset: str = "demo", run_root: str | Path = "runs", fig_dir: str | Path = "Fig",
              data_dir: str | Path | None = None, model: str | None = None, smoke: bool = False,
              notebooks: tuple[str, ...] = NOTEBOOKS, progress: bool = True,
              log_output: bool = True, results_dir: str | Path | None = None,
              command: str | None = None, **overrides: Any) -> Path:
    """Execute notebooks 01-04 with the preset's parameters; returns ``<run_root>/<preset>``.

    ``results_dir``: where the evidence goes (default: the preset's :data:`RESULTS` folder, none
    for a smoke run); ``command``: the command line recorded in its ``command.txt`` (default:
    the equivalent ``aimm reproduce`` line).

    Without ``data_dir`` the data is looked up in the documented places and, when none is
    found, downloaded into ``./data/aimm`` (:func:`aimm.data.download.ensure_data`; with
    ``AIMM_OFFLINE=1`` a FileNotFoundError names the command to run instead).
    ``overrides``: further notebook parameters (e.g. ``methods=[...]``). Raises
    :class:`aimm.config.ConfigError` for a bad preset or parameter (before anything runs) and
    ``papermill.PapermillExecutionError`` naming the failing cell when a notebook fails; the
    executed notebook (with the traceback) stays in ``<run_root>/<preset>/notebooks/``.
    """
    import papermill as pm

    from aimm.plots.output import usable_formats

    started = time.time()
    params = preset_parameters(preset, run_root=run_root, fig_dir=fig_dir, data_dir=data_dir,
                               model=model, smoke=smoke, **overrides)
    params["data_dir"] = str(ensure_data(params.get("data_dir")).resolve())  # found or downloaded
    from aimm.notebook.params import NotebookParams

    wanted = list(params.get("fig_formats") or NotebookParams().fig_formats)
    params["fig_formats"] = usable_formats(wanted)  # warns once when static formats are skipped
    out = Path(params["run_root"]) / params["run_name"]
    nb_out = out / "notebooks"
    nb_out.mkdir(parents=True, exist_ok=True)
    Path(params["fig_dir"]).mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"preset": preset, "parameters": params, "notebooks": {},
                               "skipped_formats": [f for f in wanted if f not in params["fig_formats"]]}
    with tempfile.TemporaryDirectory(prefix="aimm-kernel-") as tmp:
        kernel = _kernel_name(Path(tmp))
        for name in notebooks:
            start = time.perf_counter()
            if log_output:
                print(f"[aimm reproduce] {name} -> {nb_out / name}", flush=True)
            pm.execute_notebook(
                str(NOTEBOOK_DIR / name), str(nb_out / name), parameters=params,
                kernel_name=kernel, cwd=str(REPO), progress_bar=progress,
                log_output=False, stdout_file=sys.stdout if log_output else None,
                stderr_file=None)
            summary["notebooks"][name] = {"path": str(nb_out / name),
                                          "seconds": round(time.perf_counter() - start, 1)}
    figures = sorted(str(p) for p in Path(params["fig_dir"]).glob("*") if p.is_file())
    summary["figures"] = figures
    summary["wall_seconds"] = round(time.time() - started, 1)
    from aimm.runs import atomic_write_json

    atomic_write_json(out / "reproduce.json", summary)
    if results_dir is None and not smoke:
        results_dir = RESULTS.get(preset)
    if results_dir is not None:
        from aimm.evidence import write_results

        command = command or command_line(preset, run_root=run_root, fig_dir=fig_dir,
                                          data_dir=data_dir, model=model, smoke=smoke,
                                          results_dir=results_dir)
        written = write_results(results_dir, params["output_dir"] or out, params["fig_dir"],
                                command, time.time() - started, started, summary["notebooks"],
                                params)
        if log_output:
            print(f"[aimm reproduce] {len(written)} files of evidence in {results_dir}", flush=True)
    return out


__all__ = ["NOTEBOOKS", "PRESETS", "RESULTS", "command_line", "preset_parameters", "reproduce"]
