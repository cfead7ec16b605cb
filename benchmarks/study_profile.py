"""Where a study's time goes: one stage of every method, split by category, plus top operators.

    python -m benchmarks.study_profile --model smollm2-135m --out result.json

For each method (default: the CPU study's ``seq_lora, replay, aimmerging, recurrent_kif``) it runs
a 2-task sequence through the engine's public entry (``aimm.engine.run``) and splits the wall
time of every stage into the categories of :mod:`benchmarks._sections`:

    forward    the model's forward passes of the inner steps, with the loss
    backward   their backward passes
    optimizer  clipping, AdamW step, scheduler step, zero_grad (inner steps)
    probe      forgetting-signal probes (memory batch, no-grad forward)
    rehearsal  outer (rehearsal) optimiser steps, all included
    merge      snapshots, fusion, importance EMAs, the merge controller
    eval       evaluation after the stage (``evaluate_task``)
    data       reading task files, memory buffer, tokenisation, collation, to-device
    writes     run-store I/O: atomic writes (fsync), adapter saves, sha256 of stage files
    model_load loading the base model and attaching LoRA (first stage only)
    other      the rest of the stage's wall time (engine bookkeeping, host reads, ...)

A stage's wall time runs from the end of the previous stage (its ``on_stage_end`` callback) to
this one's, the last stage to the return of ``run``: the stages partition the run. The measured
stage is the last (task 2, where the memory, probes and merges are active); every stage is in the
JSON. ``engine_timers`` are the engine's own ``stage.json`` seconds (train / probe / rehearsal /
eval), for a cross-check. Token counts (inputs of the embedding layer, padding included) give
``train_tokens_per_s`` (inner-step tokens / (forward + backward + optimizer)) and
``eval_tokens_per_s`` (evaluation tokens / eval), and their ratio.

``--ops separate`` (default) runs every method a second time under ``torch.profiler`` (CPU) for
its top ``--top`` operators by self CPU time over the measured stage, so the profiler's overhead
does not distort the split; ``--ops same`` profiles the timed run itself (cheaper, the split then
includes the profiler's overhead), ``--ops off`` skips it.

Data: synthetic (``aimm.data.synthetic``, prompts of ~``--prompt-tokens`` tokens; task 1 short,
task 2 ``--max-train`` examples) or a real benchmark with ``--data-dir`` (both tasks then have
``--max-train`` examples). The memory buffer fraction defaults to the smallest that fills one
memory batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import warnings as pywarnings
from pathlib import Path
from typing import Any

import torch

from aimm.reproduce import PRESETS
from benchmarks._common import (DTYPE_CHOICES, concrete_dtype, environment, fail, ratio, resolve_device,
                                write_json)
from benchmarks._sections import CATEGORIES, Sections, profiling_hooks
from benchmarks.train_overhead import auto_buffer_fraction, memory_needed, parse_option, synthetic_data

PROG = "study_profile"
STUDY_METHODS = tuple(PRESETS["study"]["methods"])  # the CPU study's methods


# ------------------------------------------------------------------------------ pure helpers
def stage_split(totals: dict, wall: float) -> dict:
    """Seconds per category (``other`` = the rest of ``wall``) and their shares of ``wall``."""
    seconds = {c: float(totals["seconds"].get(c, 0.0)) for c in CATEGORIES}
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    tokens = totals.get("tokens", {})
    train_s = seconds["forward"] + seconds["backward"] + seconds["optimizer"]
    train_tps = ratio(tokens.get("forward", 0), train_s) if tokens.get("forward") else None
    eval_tps = ratio(tokens.get("eval", 0), seconds["eval"]) if tokens.get("eval") else None
    return {
        "wall_s": wall,
        "seconds": seconds,
        "share": {c: ratio(s, wall) for c, s in seconds.items()},
        "calls": dict(totals["calls"]),
        "tokens": dict(tokens),
        "train_tokens_per_s": train_tps,
        "eval_tokens_per_s": eval_tps,
        "eval_over_train_tokens_per_s": ratio(eval_tps, train_tps),
    }


def top_operators(events, top: int) -> dict:
    """The ``top`` operators by self CPU time from ``profiler.key_averages()``."""
    rows = [{"name": e.key, "count": int(e.count), "self_cpu_s": e.self_cpu_time_total / 1e6,
             "cpu_total_s": e.cpu_time_total / 1e6} for e in events]
    total = sum(r["self_cpu_s"] for r in rows)
    rows.sort(key=lambda r: r["self_cpu_s"], reverse=True)
    for r in rows:
        r["self_share"] = ratio(r["self_cpu_s"], total)
    return {"total_self_cpu_s": total, "top": rows[:top]}


# ------------------------------------------------------------------------------ engine glue
class StageClock:
    """Engine callback: moves the section bucket to the next stage at every stage end; starts
    and stops an optional ``torch.profiler`` around the measured stage."""

    def __init__(self, sections: Sections, measured: int, profiler=None) -> None:
        self.sections = sections
        self.measured = measured
        self.profiler = profiler
        self.ends: list[float] = []
        if profiler is not None and measured == 0:
            profiler.start()

    def on_stage_end(self, stage, rows) -> None:
        self.ends.append(time.perf_counter())
        self.sections.bucket = len(self.ends)
        if self.profiler is not None and len(self.ends) == self.measured:
            self.profiler.start()


def run_method(method: str, base: dict, opts: dict, work: Path, label: str,
               measured: int, with_profiler: bool, top: int, hooks: bool = True) -> dict:
    from aimm.engine import run

    sections = Sections()
    profiler = None
    if with_profiler:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
    clock = StageClock(sections, measured, profiler)
    run_dir = work / f"{method}-{label}"
    cfg = {**base, "method": method, "method_options": opts, "run_dir": str(run_dir)}
    start = time.perf_counter()
    installed = profiling_hooks(sections) if hooks else contextlib.nullcontext()
    with pywarnings.catch_warnings(), installed:
        pywarnings.simplefilter("ignore")
        run(cfg, callbacks=[clock])
    end = time.perf_counter()
    if profiler is not None:
        profiler.stop()
    bounds = [start] + clock.ends[:-1] + [end]  # the last stage runs to the return of run()
    stages = []
    for path in sorted(run_dir.glob("stages/*/stage.json")):
        info = json.loads(path.read_text())
        k = info["stage"]
        split = stage_split(sections.bucket_totals(k), bounds[k + 1] - bounds[k])
        stages.append({"stage": k, "name": info["name"], "inner_steps": info["inner_steps"],
                       "optimizer_steps": info["optimizer_steps"], "merges": info["merges"],
                       "memory_size": info["memory_size"], "engine_timers": info["seconds"],
                       **split})
    shutil.rmtree(run_dir, ignore_errors=True)
    out: dict[str, Any] = {"method": method, "method_options": opts, "run_wall_s": end - start,
                           "stages": stages, "hooks_missing": sections.missing}
    if profiler is not None:
        out["ops"] = top_operators(profiler.key_averages(), top)
    return out


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(STUDY_METHODS))
    ap.add_argument("-o", "--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a method option, e.g. aimmerging:fast=true")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--memory-batch-size", type=int, default=8)
    ap.add_argument("--buffer-fraction", type=float, default=None,
                    help="default: the smallest that fills a memory batch")
    ap.add_argument("--max-train", type=int, default=192, help="task-2 examples (48 steps of 4)")
    ap.add_argument("--task1-steps", type=int, default=2, help="synthetic task-1 inner steps")
    ap.add_argument("--max-test", type=int, default=100, help="test examples per task (evaluated)")
    ap.add_argument("--eval-mode", default="label_scoring", choices=["generate", "label_scoring"])
    ap.add_argument("--eval-batch-size", type=int, default=20)
    ap.add_argument("--max-warmup-fraction", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tasks", default=None, help="two tasks (synthetic default: sst-2,agnews)")
    ap.add_argument("--data-dir", default=None, help="a real benchmark instead of synthetic data")
    ap.add_argument("--benchmark", default="standard_cl", help="with --data-dir")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="synthetic prompt length")
    ap.add_argument("--ops", default="separate", choices=["separate", "same", "off"])
    ap.add_argument("--top", type=int, default=15, help="operators in the table")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="study_profile.json")
    return ap


def method_options(methods: list[str], options: list[str]) -> dict[str, dict]:
    """``METHOD:KEY=VALUE`` flags -> {method: {key: value}} (unknown method: exit 2)."""
    out: dict[str, dict] = {m: {} for m in methods}
    for text in options:
        method, sep, rest = text.partition(":")
        if not sep or method not in out:
            fail(PROG, f"-o {text!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(methods)}")
        try:
            key, value = parse_option(rest)
        except argparse.ArgumentTypeError as exc:
            fail(PROG, str(exc))
        out[method][key] = value
    return out


def check_args(args) -> list[str]:
    from aimm.methods import METHODS

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        fail(PROG, f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    for name, low in (("batch_size", 1), ("memory_batch_size", 1), ("max_train", 1),
                      ("task1_steps", 1), ("max_test", 1), ("eval_batch_size", 1), ("top", 1)):
        if getattr(args, name) < low:
            fail(PROG, f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        fail(PROG, f"--data-dir {args.data_dir}: no such folder")
    return methods


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.dtype = concrete_dtype(args.dtype, args.device)
    methods = check_args(args)
    options = method_options(methods, args.option)
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="aimm-study-profile-"))
    try:
        return _main(args, methods, options, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(args, methods: list[str], options: dict, tmp: Path) -> dict:
    from aimm.errors import ConfigError

    if args.data_dir:
        tasks = (args.tasks or "dbpedia,amazon").split(",")
        data_dir, benchmark, n1 = args.data_dir, args.benchmark, args.max_train
        max_train = args.max_train
    else:
        from aimm.data.synthetic import SYNTHETIC_TASKS

        tasks = (args.tasks or "sst-2,agnews").split(",")
        if len(tasks) != 2 or any(t not in SYNTHETIC_TASKS for t in tasks):
            fail(PROG, f"--tasks {args.tasks!r}: give two of the synthetic tasks "
                       f"{', '.join(SYNTHETIC_TASKS)} (or pass --data-dir)")
        root, n1, n2 = synthetic_data(tmp / "data", args, tasks)
        data_dir, benchmark, max_train = str(root), "long_sequence", max(n1, n2)
    if len(tasks) != 2:
        fail(PROG, f"--tasks {args.tasks!r}: give exactly two tasks")
    base = dict(benchmark=benchmark, tasks=tasks, data_dir=data_dir, max_train=max_train,
                max_test=args.max_test, model=args.model, dtype=args.dtype,
                batch_size=args.batch_size, grad_accum=1, epochs=1.0, lr=args.lr,
                max_warmup_fraction=args.max_warmup_fraction, max_input_len=args.max_input_len,
                memory_batch_size=args.memory_batch_size,
                buffer_fraction=args.buffer_fraction or auto_buffer_fraction(n1, memory_needed(args)),
                eval_mode=args.eval_mode, eval_batch_size=args.eval_batch_size,
                device=args.device, progress=False, seed=args.seed)
    result: dict[str, Any] = {
        "benchmark": PROG, "partial": True,
        "environment": environment(args.device, model=args.model, dtype=args.dtype),
        "model": args.model, "dtype": args.dtype, "device": args.device, "args": vars(args),
        "config": {k: v for k, v in base.items() if k != "data_dir"},
        "data": {"kind": "real" if args.data_dir else "synthetic", "dir": args.data_dir,
                 "tasks": tasks},
        "categories": list(CATEGORIES) + ["other"], "measured_stage": 1, "methods": {},
    }
    started = time.perf_counter()
    for method in methods:
        try:
            r = run_method(method, base, options[method], tmp / "runs", "timed", 1,
                           args.ops == "same", args.top)
            if args.ops == "separate":
                r["ops"] = run_method(method, base, options[method], tmp / "runs", "ops", 1,
                                      True, args.top, hooks=False)["ops"]
        except ConfigError as exc:
            fail(PROG, str(exc).splitlines()[0])
        r["ops_pass"] = args.ops
        result["methods"][method] = r
        stage = r["stages"][-1]
        print(f"[{PROG}] {method}: stage {stage['name']} {stage['wall_s']:.2f}s "
              f"({stage['inner_steps']} inner steps, {stage['merges']} merges)",
              file=sys.stderr, flush=True)
        result["elapsed_s"] = round(time.perf_counter() - started, 2)
        write_json(args.out, result)
    result["partial"] = False
    write_json(args.out, result)
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    cats = result["categories"]
    short = {"model_load": "load", "optimizer": "optim", "rehearsal": "rehears", "backward": "backwd"}
    print("measured stage: seconds (share of its wall time)")
    print(f"{'method':<15}{'wall_s':>8}" + "".join(f"{short.get(c, c):>9}" for c in cats)
          + f"{'eval/train tok/s':>18}")
    for method, r in result["methods"].items():
        st = r["stages"][-1]
        cells = "".join(f"{st['seconds'][c]:>9.2f}" for c in cats)
        e = st["eval_over_train_tokens_per_s"]
        print(f"{method:<15}{st['wall_s']:>8.2f}{cells}{(f'{e:.2f}x' if e else '-'):>18}")
        print(f"{'':<23}" + "".join(f"{(st['share'][c] or 0):>9.0%}" for c in cats))
    for method, r in result["methods"].items():
        if "ops" not in r:
            continue
        print(f"\n{method}: top operators by self CPU time (measured stage, "
              f"{r['ops']['total_self_cpu_s']:.2f}s in all)")
        for op in r["ops"]["top"]:
            print(f"  {op['name'][:48]:<48}{op['self_cpu_s']:>9.3f}s{op['self_share']:>7.1%}"
                  f"{op['count']:>8}")


if __name__ == "__main__":
    main()
