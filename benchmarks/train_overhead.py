"""Training overhead of AIMMerging over sequential LoRA, measured through the engine.

    python -m benchmarks.train_overhead --model smollm2-135m --dtype bfloat16 --out result.json

In ONE process, on the same model, data and number of inner steps, runs a 2-task sequence with
``seq_lora`` and with ``aimmerging`` (``--settings release,fast``: the release's settings and the
``fast`` preset) and compares task 2, where AIMMerging is active (forgetting probes, rehearsal
steps, merges). ``--settings`` may also name other methods (``methods``: every other registered
sequential method, e.g. ewc, agem, lwf), each run at its default options and compared the same
way (× seq_lora per optimiser step). Per run it reads the stage's ``stage.json`` (train / probe / rehearsal seconds,
inner + outer optimiser steps, merges) and records per-step times (``on_step``), merge events
(``on_merge``) and the peak memory of task 2 (CUDA: ``max_memory_allocated`` reset at the end
of task 1; CPU: peak RSS sampled by a thread).

The machine may be shared: runs are interleaved (seq_lora, release, fast; then again for each
``--repeats``), medians are reported, and the ratios aimmerging / seq_lora are given both as the
ratio of medians and as the median of per-repeat ratios. ``--discard-first`` makes the first
repeat a warm-up (e.g. ``--compile``: compilation happens there, not in the measured runs).

``--modes eager,compile`` measures both in one process (eager first; the model is compiled in
place by the engine for the compiled runs, whose variant names end in ``+compile``);
``--compile`` alone is ``--modes compile``. ``--compile-settings`` / ``--compile-repeats`` size the
compiled runs separately and ``--discard-first compile`` discards only their first repeat.

Data: a synthetic 2-task benchmark (``aimm.data.synthetic``) written to a temporary folder, with
~``--prompt-tokens`` token prompts; task 1 is short (``--task1-steps`` inner steps, enough
examples for the memory buffer), task 2 has ``--max-train`` examples, i.e.
``ceil(max_train / batch_size)`` inner steps. ``--data-dir`` uses a real benchmark instead.

The base model is loaded once and shared by all runs (the LoRA adapter is reset to its initial
values for every run, so each run starts from the same weights); ``--no-model-cache`` reloads it.
The JSON is rewritten after every run (``"partial": true`` until the end), so a run killed by a
timeout still leaves its finished measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
import warnings as pywarnings
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (DTYPE_CHOICES, PeakMemory, concrete_dtype, environment, median, ratio,
                                resolve_device, write_json)

SEQ = "seq_lora"


# ------------------------------------------------------------------------------ engine glue
class StageMeter:
    """Engine callback: per-step times, merge events and peak memory of the measured stage."""

    def __init__(self, memory: PeakMemory, stage: int = 1) -> None:
        self.memory = memory
        self.stage = stage
        self.step_times: list[float] = []
        self.merges: list[dict] = []
        self.peak = None
        self.baseline = None

    def on_stage_end(self, stage, rows) -> None:
        if stage.index == self.stage - 1:  # the measured stage starts next
            self.memory.reset()
            self.baseline = self.memory.baseline
            self.peak = self.baseline

    def on_step(self, record: dict) -> None:
        if record.get("stage") != self.stage:
            return
        self.step_times.append(time.perf_counter())
        self.peak = self.memory.read()

    def on_merge(self, event: dict) -> None:
        if event.get("stage") == self.stage:
            self.merges.append({"step": event.get("step"), "outer_steps": event.get("outer_steps"),
                                "kind": event.get("kind")})


_MODEL_CACHE: dict[tuple, tuple[Any, dict]] = {}


def make_engine(cfg, callbacks, cache_model: bool):
    """An :class:`aimm.engine.Engine` whose base model is loaded once per process."""
    from aimm.engine import Engine

    if not cache_model:
        return Engine(cfg, callbacks)

    class CachedModelEngine(Engine):
        def _load_model(self):
            from aimm.models import load_lora_state_dict, lora_state_dict

            c = self.cfg
            key = (c.model, c.dtype, c.seed, c.lora_r, c.lora_alpha, c.lora_dropout,
                   tuple(c.lora_targets or ()))
            if key not in _MODEL_CACHE:
                bundle = super()._load_model()
                _MODEL_CACHE[key] = (bundle, lora_state_dict(bundle.model))
            bundle, initial = _MODEL_CACHE[key]
            load_lora_state_dict(bundle.model, initial)  # every run starts from the same adapter
            torch.manual_seed(c.seed)
            return bundle

    return CachedModelEngine(cfg, callbacks)


# ------------------------------------------------------------------------------ data
def synthetic_data(root: Path, args, tasks: list[str]) -> tuple[Path, int, int]:
    """Task 1 short (+ memory), task 2 ``max_train`` examples; returns (root, n_task1, n_task2)."""
    from aimm.data.synthetic import SYNTHETIC_TASKS, make_synthetic_benchmark

    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise SystemExit(f"--tasks {','.join(unknown)}: synthetic tasks are "
                         f"{', '.join(SYNTHETIC_TASKS)} (or pass --data-dir)")
    # a task is classification-like (has a label set) only with >= 2 examples per label
    def least(task):
        return 2 * len(SYNTHETIC_TASKS[task][0])

    n1 = max(args.task1_steps * args.batch_size, memory_needed(args), least(tasks[0]))
    n2 = max(args.max_train, least(tasks[1]))
    fill = max(1, args.prompt_tokens - 20)  # ~1 token per filler word + ~15-20 template tokens
    words = (fill, fill + 4)
    for k, (task, n) in enumerate(((tasks[0], n1), (tasks[1], n2))):
        make_synthetic_benchmark(root, n_train=n, n_test=max(1, args.max_test), words=words,
                                 seed=k, tasks={task: SYNTHETIC_TASKS[task]})
    return root, n1, n2


def memory_needed(args) -> int:
    """Memory buffer size that fills the largest memory batch any setting draws."""
    return max(args.memory_batch_size, args.batch_size)


def auto_buffer_fraction(n_task1: int, need: int) -> float:
    return min(1.0, math.ceil(need / max(1, n_task1) * 10000) / 10000)


# ------------------------------------------------------------------------------ one run
AIMMERGING_SETTINGS = ("release", "fast")


def other_methods() -> list[str]:
    """``--settings methods``: every registered sequential method but seq_lora and aimmerging
    (read from ``METHODS``: a new method gets its line without an edit here)."""
    from aimm.methods import METHODS

    return [n for n, cls in METHODS.items() if cls.sequential() and n not in (SEQ, "aimmerging")]


def expand_settings(text: str) -> list[str]:
    return [m for s in text.split(",") if s for m in (other_methods() if s == "methods" else [s])]


def variant_name(setting: str, suffix: str = "") -> str:
    return (f"aimmerging_{setting}" if setting in AIMMERGING_SETTINGS else setting) + suffix


def variant_options(setting: str, args) -> tuple[str, dict]:
    if setting == SEQ:
        return SEQ, {}
    if setting not in AIMMERGING_SETTINGS:
        if setting in other_methods():  # another method at its default options
            return setting, {}
        raise SystemExit(f"--settings: unknown setting {setting!r}; choose release, fast, methods "
                         f"or a method of {', '.join(other_methods())}")
    opts: dict[str, Any] = {"initial_interval": args.initial_interval}
    if setting == "fast":
        opts["fast"] = True
    opts.update(args.option)
    return "aimmerging", opts


def run_variant(name: str, setting: str, args, base: dict, work: Path, memory: PeakMemory,
                repeat: int, mode: str = "eager") -> dict:
    from aimm.config import RunConfig

    method, opts = variant_options(setting, args)
    run_dir = work / f"r{repeat}-{name.replace('+', '-')}"
    cfg = RunConfig.from_dict({**base, "method": method, "method_options": opts,
                               "compile": mode == "compile", "run_dir": str(run_dir)})
    meter = StageMeter(memory, stage=1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter()
    with pywarnings.catch_warnings():
        pywarnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # the model cache holds seq_lora's LoRA model; another method may set up another model
        # (full fine-tuning, prompt tuning, an adapter stack, merge hooks): it loads its own
        make_engine(cfg, [meter], cache_model=not args.no_model_cache
                    and setting not in other_methods()).run()
    wall = time.perf_counter() - wall
    infos = [json.loads(p.read_text()) for p in sorted(run_dir.glob("stages/*/stage.json"))]
    info = next(i for i in infos if i["stage"] == 1)
    secs = info["seconds"]
    inner, opt_steps = info["inner_steps"], info["optimizer_steps"]
    train = secs["train"]
    t = meter.step_times
    steps_s = [max(0.0, train - (t[-1] - t[0]))] + [b - a for a, b in zip(t, t[1:])] if t else []
    out = {
        "variant": name, "mode": mode, "method": method, "method_options": opts, "repeat": repeat,
        "train_s": train, "probe_s": secs.get("probe", 0.0), "rehearsal_s": secs.get("rehearsal", 0.0),
        "eval_s": secs.get("eval", 0.0), "run_wall_s": round(wall, 3),
        "inner_steps": inner, "optimizer_steps": opt_steps, "outer_steps": opt_steps - inner,
        "merges": info["merges"], "memory_size": info["memory_size"],
        "s_per_optimizer_step": train / opt_steps if opt_steps else None,
        "s_per_inner_step": train / inner if inner else None,
        "inner_only_s": train - secs.get("probe", 0.0) - secs.get("rehearsal", 0.0),
        "peak_memory_bytes": meter.peak, "memory_baseline_bytes": meter.baseline,
        "peak_memory_delta_bytes": (meter.peak - meter.baseline
                                    if meter.peak is not None and meter.baseline is not None else None),
        "step_s": [round(x, 4) for x in steps_s], "merge_events": meter.merges,
        "truncation": info.get("truncation"),
    }
    if method == "aimmerging":  # what the probes and rehearsal steps actually used
        from dataclasses import asdict

        from aimm.methods.aimmerging import AIMMergingOptions

        o = AIMMergingOptions(**opts).resolved(cfg.batch_size)
        out["resolved_options"] = {k: v for k, v in asdict(o).items() if k in (
            "probe_every", "probe_batch_size", "rehearsal_batch_size", "probe_mode",
            "outer_optimizer", "initial_interval", "outer_ratio")}
        out["resolved_options"]["memory_batch_size"] = cfg.memory_batch_size
    w = args.warmup_steps
    if w and len(steps_s) > w:
        outer_after = sum(m["outer_steps"] or 0 for m in meter.merges if (m["step"] or 0) > w)
        steady_steps = (inner - w) + outer_after
        out["steady_s"] = sum(steps_s[w:])
        out["steady_optimizer_steps"] = steady_steps
        out["steady_s_per_optimizer_step"] = out["steady_s"] / steady_steps if steady_steps else None
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ summary
SUMMARY_KEYS = ("train_s", "probe_s", "rehearsal_s", "inner_only_s", "optimizer_steps",
                "outer_steps", "merges", "memory_size", "s_per_optimizer_step",
                "s_per_inner_step", "peak_memory_bytes", "peak_memory_delta_bytes",
                "steady_s", "steady_s_per_optimizer_step")


def summarize(runs: list[dict], variants: list[str], discard_first: bool,
              reference: str = SEQ) -> tuple[dict, dict]:
    """Medians per variant and ratios to ``reference`` (seq_lora of the same mode)."""
    kept = [r for r in runs if not (discard_first and r["repeat"] == 0)] or runs
    summary: dict[str, dict] = {}
    for v in variants:
        rs = [r for r in kept if r["variant"] == v]
        if rs:
            summary[v] = {k: median([r.get(k) for r in rs]) for k in SUMMARY_KEYS}
            summary[v]["n"] = len(rs)
    ratios: dict[str, dict] = {}
    ref = summary.get(reference)
    for v in variants:
        if v == reference or v not in summary or ref is None:
            continue
        s = summary[v]
        per_repeat = {"s_per_optimizer_step": [], "train_s": []}
        for rep in sorted({r["repeat"] for r in kept}):
            a = next((r for r in kept if r["repeat"] == rep and r["variant"] == v), None)
            b = next((r for r in kept if r["repeat"] == rep and r["variant"] == reference), None)
            if a and b:
                for k in per_repeat:
                    per_repeat[k].append(ratio(a[k], b[k]))
        ratios[v] = {
            # the headline numbers: ratio of the medians over repeats
            "time_per_optimizer_step": ratio(s["s_per_optimizer_step"], ref["s_per_optimizer_step"]),
            "stage2_train_time": ratio(s["train_s"], ref["train_s"]),
            # robust to slow drifts of the machine's load: pairs measured next to each other
            "time_per_optimizer_step_per_repeat": per_repeat["s_per_optimizer_step"],
            "stage2_train_time_per_repeat": per_repeat["train_s"],
            "time_per_optimizer_step_median_of_repeats": median(per_repeat["s_per_optimizer_step"]),
            "stage2_train_time_median_of_repeats": median(per_repeat["train_s"]),
            "peak_memory": ratio(s["peak_memory_bytes"], ref["peak_memory_bytes"]),
        }
        if s.get("steady_s") is not None and ref.get("steady_s"):
            ratios[v]["steady_time_per_optimizer_step"] = ratio(
                s["steady_s_per_optimizer_step"], ref["steady_s_per_optimizer_step"])
            ratios[v]["steady_train_time"] = ratio(s["steady_s"], ref["steady_s"])
    return summary, ratios


def print_table(summary: dict, ratios: dict) -> None:
    print(f"{'variant':<22}{'train_s':>9}{'opt':>5}{'merg':>5}{'probe_s':>9}{'rehe_s':>8}"
          f"{'s/opt':>9}{'xT/opt':>8}{'xTrain':>8}{'peakMB':>9}")
    for v, s in summary.items():
        r = ratios.get(v, {})
        def f(x, spec):  # noqa: E306
            width = int(re.match(r"\d+", spec).group())
            return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(width)
        peak = s["peak_memory_bytes"] / 2**20 if s.get("peak_memory_bytes") else None
        print(f"{v:<22}{f(s['train_s'], '9.2f')}{f(s['optimizer_steps'], '5.0f')}"
              f"{f(s['merges'], '5.0f')}{f(s['probe_s'], '9.2f')}{f(s['rehearsal_s'], '8.2f')}"
              f"{f(s['s_per_optimizer_step'], '9.3f')}{f(r.get('time_per_optimizer_step'), '8.3f')}"
              f"{f(r.get('stage2_train_time'), '8.3f')}{f(peak, '9.0f')}")


# ------------------------------------------------------------------------------ main
def parse_option(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"-o {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-causal")
    ap.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (= --modes compile)")
    ap.add_argument("--modes", default=None, help="eager,compile: both in one process (eager first)")
    ap.add_argument("--compile-settings", default=None, help="settings of the compiled runs")
    ap.add_argument("--compile-repeats", type=int, default=None, help="repeats of the compiled runs")
    ap.add_argument("--fused-optimizer", action="store_true", help="AdamW(fused=True)")
    ap.add_argument("--settings", default="release,fast",
                    help="aimmerging settings (release, fast) and other methods at their defaults "
                         "(a name, or `methods`: every other registered sequential method)")
    ap.add_argument("-o", "--option", action="append", type=parse_option, default=[],
                    metavar="KEY=VALUE", help="extra aimmerging option for every setting")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--discard-first", nargs="?", const="all", default="none",
                    choices=["none", "all", "compile"],
                    help="the first repeat is a warm-up, left out of the medians (all modes, or "
                         "only the compiled runs)")
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="also report 'steady' times without the first N inner steps of task 2")
    ap.add_argument("--max-train", type=int, default=128,
                    help="task-2 examples: ceil(max_train / batch_size) inner steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--memory-batch-size", type=int, default=32)
    ap.add_argument("--max-test", type=int, default=2, help="evaluation is not measured: keep small")
    ap.add_argument("--eval-mode", default="label_scoring", choices=["generate", "label_scoring"],
                    help="evaluation after each task (not measured; label scoring has no decode "
                         "loop, so a compiled model does not recompile for every length)")
    ap.add_argument("--initial-interval", type=int, default=8)
    ap.add_argument("--buffer-fraction", type=float, default=None,
                    help="default: the smallest that fills a memory batch")
    ap.add_argument("--tasks", default=None, help="two tasks (synthetic default: sst-2,agnews)")
    ap.add_argument("--data-dir", default=None, help="a real benchmark instead of synthetic data")
    ap.add_argument("--benchmark", default=None, help="with --data-dir (default standard_cl)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="synthetic prompt length")
    ap.add_argument("--task1-steps", type=int, default=4, help="synthetic task-1 inner steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-model-cache", action="store_true", help="reload the model for every run")
    ap.add_argument("--keep-runs", default=None, help="keep the run dirs under this folder")
    ap.add_argument("--out", default="train_overhead.json")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.dtype = concrete_dtype(args.dtype, args.device)
    args.option = dict(args.option)
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in (args.modes or ("compile" if args.compile else "eager")).split(",") if m]
    if not modes or any(m not in ("eager", "compile") for m in modes):
        raise SystemExit(f"--modes {args.modes!r}: choose from eager, compile")
    modes = sorted(set(modes), key=["eager", "compile"].index)  # compiling is in place: eager first
    plan = []  # (mode, repeats, [(variant name, setting)])
    for mode in modes:
        text = args.compile_settings if mode == "compile" and args.compile_settings else args.settings
        settings = expand_settings(text)
        for s in settings:
            variant_options(s, args)  # fail early on a bad setting
        suffix = "+compile" if mode == "compile" else ""
        names = [(SEQ + suffix, SEQ)] + [(variant_name(s, suffix), s) for s in settings]
        repeats = args.compile_repeats if mode == "compile" and args.compile_repeats else args.repeats
        plan.append((mode, repeats, names))
    variants = [name for _, _, names in plan for name, _ in names]

    tmp = Path(tempfile.mkdtemp(prefix="aimm-train-overhead-"))
    work = Path(args.keep_runs) if args.keep_runs else tmp / "runs"
    work.mkdir(parents=True, exist_ok=True)
    if args.data_dir:
        tasks = (args.tasks or "dbpedia,amazon").split(",")
        data_dir, benchmark = args.data_dir, args.benchmark or "standard_cl"
        n1 = n2 = args.max_train
    else:
        tasks = (args.tasks or "sst-2,agnews").split(",")
        data_root, n1, n2 = synthetic_data(tmp / "data", args, tasks)
        data_dir, benchmark = str(data_root), "long_sequence"
    if len(tasks) != 2:
        raise SystemExit(f"--tasks: give exactly two tasks, got {tasks}")
    fraction = args.buffer_fraction or auto_buffer_fraction(n1, memory_needed(args))
    base = dict(benchmark=benchmark, tasks=tasks, data_dir=data_dir,
                max_train=max(n1, n2),
                max_test=args.max_test, model=args.model, dtype=args.dtype,
                batch_size=args.batch_size, grad_accum=1, epochs=1, lr=args.lr,
                max_input_len=args.max_input_len, memory_batch_size=args.memory_batch_size,
                buffer_fraction=fraction, eval_batch_size=max(1, min(16, args.max_test)),
                eval_mode=args.eval_mode, device=args.device, compile=False,
                fused_optimizer=args.fused_optimizer, progress=False, seed=args.seed)

    memory = PeakMemory(args.device)
    result: dict[str, Any] = {
        "benchmark": "train_overhead", "partial": True,
        "environment": environment(args.device, model=args.model, dtype=args.dtype,
                                   modes=modes, fused_optimizer=args.fused_optimizer),
        "model": args.model, "dtype": args.dtype, "device": args.device,
        "args": {k: v for k, v in vars(args).items()},
        "config": {k: v for k, v in base.items() if k not in ("data_dir",)},
        "data": {"kind": "real" if args.data_dir else "synthetic", "dir": args.data_dir,
                 "tasks": tasks, "task1_train": n1, "task2_train": n2,
                 "prompt_tokens": None if args.data_dir else args.prompt_tokens},
        "peak_memory_kind": memory.kind, "modes": modes, "variants": variants, "runs": [],
        "summary": {}, "ratios": {},
    }
    started = time.perf_counter()
    try:
        for mode, repeats, names in plan:
            discard = args.discard_first == "all" or args.discard_first == mode
            result.setdefault("discarded_first_repeat", {})[mode] = discard and repeats > 1
            for rep in range(repeats):
                for name, setting in names:
                    r = run_variant(name, setting, args, base, work, memory, rep, mode)
                    result["runs"].append(r)
                    print(f"[train_overhead] {mode} repeat {rep} {name}: train {r['train_s']:.2f}s, "
                          f"{r['optimizer_steps']} opt steps ({r['outer_steps']} outer), "
                          f"{r['merges']} merges, probe {r['probe_s']:.2f}s, "
                          f"rehearsal {r['rehearsal_s']:.2f}s", file=sys.stderr, flush=True)
                    summary, ratios = summarize(
                        [x for x in result["runs"] if x["mode"] == mode], [n for n, _ in names],
                        discard, reference=names[0][0])
                    result["summary"].update(summary)
                    result["ratios"].update(ratios)
                    result["elapsed_s"] = round(time.perf_counter() - started, 2)
                    write_json(args.out, result)
    finally:
        memory.close()
        if not args.keep_runs:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        import os

        result["environment"]["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    result["environment"]["optional_modules_imported"] = sorted(
        m for m in ("rouge_score", "nltk", "gguf", "plotly") if m in sys.modules)
    result["partial"] = False
    result["elapsed_s"] = round(time.perf_counter() - started, 2)
    write_json(args.out, result)
    print_table(result["summary"], result["ratios"])
    return result


if __name__ == "__main__":
    main()
