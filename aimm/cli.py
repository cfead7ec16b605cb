"""Command line: ``aimm run | study | report | export | methods | data convert | data check | data download | reproduce``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from aimm.config import ConfigError, RunConfig


def _parse_value(text: str):
    """``key=value`` option values: JSON if it parses (numbers, true, lists), else a string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train a method through a task sequence and evaluate it")
    _config_flags(p, single_run=True)


def _config_flags(p, single_run: bool) -> None:
    """The RunConfig flags of ``aimm run``; ``aimm study`` shares all but method, order, seed and
    run dir, which its grid sets per cell."""
    p.add_argument("--config", help="YAML file of RunConfig fields (flags override it)")
    p.add_argument("--benchmark", help="standard_cl | long_sequence | superni")
    if single_run:
        p.add_argument("--order", type=int, help="task order number of the benchmark (not with "
                                                 "--tasks or a --config that has tasks)")
    p.add_argument("--tasks", help="custom order: comma-separated task names")
    if single_run:
        p.add_argument("--method", help="a method of aimm.methods.METHODS, e.g. seq_lora or aimmerging "
                                        "(a wrong name lists them all)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable), e.g. -o outer_optimizer=separate")
    p.add_argument("--model", help="smollm2-135m | tiny-causal | tiny-seq2seq | a local HF folder")
    p.add_argument("--data-dir", help="benchmark folder (default $AIMM_DATA or ../shared/benchmarks/aimm)")
    p.add_argument("--max-train", type=int, help="training examples per task")
    p.add_argument("--max-test", type=int, help="test examples per task")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-input-len", type=int)
    p.add_argument("--eval-mode", help="generate | label_scoring")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--buffer-mode", help="official | capped")
    p.add_argument("--record-forgetting-signal", "--probe-history", action="store_true", default=None,
                   help="record the forgetting signal for any method (old name: --probe-history)")
    p.add_argument("--checkpoint-every", type=int, help="within-task checkpoint every N steps")
    p.add_argument("--nan-policy", help="stop | skip")
    if single_run:
        p.add_argument("--seed", type=int)
        p.add_argument("--run-dir", help="run directory (re-running an existing one resumes it; "
                                          "not a study folder)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--dtype", help="base-model weights: float32 (default) | bfloat16 | auto (bfloat16 "
                   "where the CPU has AMX / AVX512-BF16 or the GPU bf16, else float32); LoRA stays float32")
    p.add_argument("--attention-dtype", help="model (default) | float32: the attention kernel on float32 "
                   "copies of a bf16 model's query/key/value (on CPU faster and more precise; "
                   "changes a bf16 run's numbers)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--log-with", action="append", default=[], metavar="TRACKER",
                   help="tensorboard | mlflow | wandb (repeatable): log into <run dir>/logs/")
    p.add_argument("--restart-from-stage", type=int, metavar="K",
                   help="drop stages K.. of the existing run in --run-dir, then resume (the way "
                        "out when a completed stage's files are damaged); K > 1 needs a run there, "
                        "K = 1 starts over")
    p.add_argument("--first-stage-from", metavar="RUN_DIR",
                   help="a new run copies this finished run's first stage instead of training it, "
                        "when that stage is the same training (its method is this method's "
                        "first_stage_as, e.g. seq_lora for replay or aimmerging, with the same "
                        "settings); ignored when --run-dir already holds a run")


FLAG_FIELDS = ("benchmark", "order", "method", "model", "data_dir", "max_train", "max_test",
               "epochs", "lr", "batch_size", "grad_accum", "max_input_len", "eval_mode",
               "eval_batch_size", "buffer_mode", "record_forgetting_signal", "checkpoint_every",
               "nan_policy", "seed", "run_dir", "device", "dtype", "attention_dtype")


def config_from_args(args) -> RunConfig:
    """The config, its fields and its method's options checked (``ConfigError`` names them)."""
    from aimm.methods import build_method

    values, source = config_values(args)
    cfg = RunConfig.from_dict(values, source=source)
    build_method(cfg, source=source)
    return cfg


def config_values(args) -> tuple[dict, str]:
    """RunConfig fields from ``--config`` and the flags (flags win), not yet validated; and the
    name of their source for error messages."""
    values = {f: getattr(args, f, None) for f in FLAG_FIELDS if getattr(args, f, None) is not None}
    if args.tasks is not None:
        values["tasks"] = [t.strip() for t in args.tasks.split(",")]
        if not all(values["tasks"]):
            raise ConfigError(f"--tasks {args.tasks!r}: an empty task name; give comma-separated "
                              "names, e.g. --tasks sst-2,agnews")
    if args.no_progress:
        values["progress"] = False
    options = {}
    for item in args.option:
        if "=" not in item:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value)
    if getattr(args, "run_dir", None) is not None and not args.run_dir.strip():
        raise ConfigError(f"--run-dir {args.run_dir!r}: an empty path; give a folder, or leave "
                          "it out for runs/<run id>")
    if args.config:
        base = RunConfig.from_yaml(args.config)
        merged = base.to_dict()
        _refuse_order_with_tasks(args, base.tasks, args.config)
        merged.update(values)
        if options:
            merged["method_options"] = {**merged.get("method_options", {}), **options}
        return merged, args.config + (" + command line" if values or options else "")
    _refuse_order_with_tasks(args, None, None)
    if options:
        values["method_options"] = options
    return values, "command line"


def _refuse_order_with_tasks(args, config_tasks, config: str | None) -> None:
    """``--order`` (``aimm study``: ``--orders``) names a benchmark order, tasks a custom one: both
    at once is refused, whichever source gives the tasks (``--tasks`` or the YAML's ``tasks``).
    (A YAML's own ``order`` beside its ``tasks`` is kept: every stored config has both.)"""
    flag, value = (("--order", getattr(args, "order", None)) if hasattr(args, "order")
                   else ("--orders", getattr(args, "orders", None)))
    if value is None:
        return
    if args.tasks is not None:
        where = "--tasks"
    elif config_tasks is not None:
        where = f"the tasks of {config}"
    else:
        return
    raise ConfigError(f"{flag} {value} and {where}: give one (an order number of the benchmark, "
                      "or a custom task list); leave out " + (flag if where != "--tasks" else
                                                              f"{flag} or --tasks"))


def cmd_run(args) -> int:
    from aimm.training.engine import Engine
    from aimm.runs import report_text
    from aimm.tracking import Tracking, check_trackers

    cfg = config_from_args(args)
    if args.restart_from_stage is not None and not (cfg.run_dir or cfg.run_id):
        raise ConfigError("--restart-from-stage: name the run with --run-dir")
    _refuse_study_folder(cfg.run_dir)
    check_trackers(args.log_with)  # before anything runs
    engine = Engine(cfg, restart_from_stage=args.restart_from_stage,
                    first_stage_from=getattr(args, "first_stage_from", None))
    tracking = Tracking(args.log_with, engine.run_dir, engine.cfg.to_dict()) if args.log_with else None
    engine.callbacks.extend([tracking] if tracking else [])
    try:
        run_dir = engine.run()
    finally:
        if tracking:
            tracking.finish()
    print(f"run dir: {run_dir}")
    print(report_text(run_dir))
    return 0


def _refuse_study_folder(run_dir: str | None) -> None:
    """A study folder (``aimm study --out``: ``study.json``, ``runs.csv``, ``cells/``) is no run
    dir: a run written there would mix the two layouts."""
    from aimm.study.grid import RUNS_CSV
    from aimm.study.report import STUDY_JSON

    if run_dir is None:
        return
    folder = Path(run_dir)
    marks = [m for m in (STUDY_JSON, RUNS_CSV) if (folder / m).is_file()]
    marks += ["cells/"] if (folder / "cells").is_dir() else []
    if marks and not (folder / "config.json").is_file():
        raise ConfigError(f"--run-dir {run_dir}: a study folder (holds {', '.join(marks)}), not a "
                          "run dir; give a new folder, or re-run its `aimm study` command to "
                          "resume the study")


def cmd_study(args) -> int:
    from aimm.study import exit_code, parse_ints, parse_list, plan_cells, run_study, summary_markdown

    if args.orders and args.tasks:
        raise ConfigError("--orders and --tasks: give one (order numbers of --benchmark, or one "
                          "custom task list)")
    methods = parse_list(args.methods, "--methods")
    seeds = parse_ints(args.seeds, "--seeds")
    orders = parse_ints(args.orders, "--orders") if args.orders else None
    if args.reference and args.reference not in methods:
        raise ConfigError(f"--reference {args.reference}: not in --methods ({', '.join(methods)}); "
                          "add it there or choose one of them")
    values, source = config_values(args)
    cells = plan_cells(values, methods, seeds, orders, args.out, source=source)  # before any write
    settings = {"methods": methods, "seeds": seeds, "orders": orders, "arguments": vars(args)}
    outcomes, agg = run_study(cells, args.out, args.reference or "seq_lora", settings,
                              report=lambda line: print(line, flush=True),
                              share_first_stage=not args.no_share_first_stage)
    print()
    print(summary_markdown(agg))
    failed = [o for o in outcomes if not o.ok]
    print(f"study: {len(outcomes) - len(failed)} of {len(outcomes)} cells done; tables in {args.out}"
          + (f"; re-run the same command to retry {len(failed)}" if failed else ""))
    return exit_code(outcomes)


def cmd_report(args) -> int:
    from aimm.runs import report_text

    if args.aggregate and (args.run_dir or args.verify):
        raise ConfigError(f"--aggregate {args.aggregate} and "
                          + (f"the run dir {args.run_dir}" if args.run_dir else "--verify")
                          + ": give one (--aggregate STUDY_DIR prints a study's tables; a run dir, "
                          "with or without --verify, reports that run)")
    if args.aggregate:
        from aimm.study import summary_markdown, write_aggregate

        print(summary_markdown(write_aggregate(args.aggregate)), end="")
        return 0
    if not args.run_dir:
        raise ConfigError("aimm report: give a run directory, or --aggregate STUDY_DIR")
    if args.verify:
        return verify_report(args.run_dir)
    print(report_text(args.run_dir))
    return 0


def verify_report(run_dir: str | Path) -> int:
    """``aimm report --verify``: every stage adapter and every file state.json lists, against
    the sha256 recorded when it was written. 0: all match; 2: one line per problem."""
    from aimm.integrity import restart_hint, verify_run
    from aimm.runs import RunStore

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (config.json missing)")
    state = RunStore(run_dir).read_state()
    problems = verify_run(run_dir, state)
    for _, line in problems:
        print(line, file=sys.stderr)
    stages = sorted({k for k, _ in problems if k})
    if stages:
        print(f"{run_dir}: damaged stage(s) {', '.join(map(str, stages))}: {restart_hint(stages[0])}",
              file=sys.stderr)
    elif problems:
        print(f"{run_dir}: the result files do not match state.json (an interrupted stage end?): "
              "re-run the same `aimm run` command to rewrite them", file=sys.stderr)
    if problems:
        return 2
    n = len(state.get("sha256", {}))
    note = "" if n else " (no sums recorded: a run from before sha256 records; adapters checked)"
    print(f"OK: {len(state['completed'])} completed stage(s), {n} files match their sha256{note}")
    return 0


def cmd_data(args) -> int:
    from aimm.data.check import main_check, main_convert
    from aimm.data.download import main_download

    if args.data_cmd == "download":
        return main_download(args.dest, args.url)
    if args.data_cmd == "check":
        return main_check(args.dir)
    if args.name:  # a local dataset (aimm.data.custom) -> the release layout
        from aimm.data.custom import parse_task_spec, write_release_layout

        spec = {"name": args.name, "path": args.src, "input": args.input, "output": args.output,
                **({"prompt": args.prompt} if args.prompt else {}),
                **({"splits": {"test": args.test_split}} if args.test_split else {})}
        paths = write_release_layout(parse_task_spec(spec, "data convert"), args.dst,
                                     overwrite=args.overwrite)
        print("\n".join(map(str, paths)))
        return 0
    return main_convert(args.src, args.dst, overwrite=args.overwrite)


def cmd_export(args) -> int:
    from aimm.export import export_stage, stage_adapter_is_model

    written = export_stage(args.run_dir, args.out, stage=args.stage)
    for label, path in written.items():
        print(f"{label}: {path}")
    if "PEFT adapter" not in written:
        print("PEFT adapter: none (" + ("the stage adapter is not the evaluated model of this method"
              if not stage_adapter_is_model(args.run_dir) else "this method trains no adapter") + ")")
    if "merged model" not in written:
        print("merged model: none (a soft prompt is an input, not a weight update: load the "
              "adapter with peft.PeftModel.from_pretrained)")
    return 0


def cmd_methods(args) -> int:
    from aimm.methods import METHODS

    for name, cls in METHODS.items():
        print(f"{name}\t{cls.description}")
    return 0


def cmd_reproduce(args) -> int:
    from aimm.reproduce import reproduce

    out = reproduce(args.preset, run_root=args.run_root, fig_dir=args.fig_dir,
                    data_dir=args.data_dir, model=args.model, smoke=args.smoke,
                    results_dir=args.results_dir,
                    command=shlex.join(["aimm", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"]
                    else None)
    print(f"reproduction written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    st = sub.add_parser("study", help="a grid of runs (methods x seeds x orders) and its summary")
    st.add_argument("--methods", required=True, help="comma-separated, e.g. seq_lora,replay,aimmerging")
    st.add_argument("--seeds", required=True, help="comma-separated integers, e.g. 1,2,3")
    st.add_argument("--orders", help="comma-separated order numbers of --benchmark (or --tasks "
                                     "a,b,c; not both, nor with a --config that has tasks)")
    st.add_argument("--reference", help="method the others are compared with (default seq_lora)")
    st.add_argument("--out", required=True, help="study folder (re-running resumes it)")
    st.add_argument("--no-share-first-stage", action="store_true",
                    help="every cell trains its first stage (default: a method whose first stage "
                         "is seq_lora's copies it from the finished seq_lora cell of its seed and "
                         "order, the same training; see aimm.training.shared_stage)")
    _config_flags(st, single_run=False)
    rep = sub.add_parser("report", help="scores matrix and metrics of a run, or a study's tables")
    rep.add_argument("run_dir", nargs="?")
    rep.add_argument("--aggregate", metavar="STUDY_DIR",
                     help="recompute a study folder's summary.csv / summary.md / paired.csv and "
                          "print them (not with a run dir or --verify)")
    rep.add_argument("--verify", action="store_true",
                     help="check every stage adapter and the files listed in state.json against "
                          "the sha256 recorded when they were written")
    data = sub.add_parser("data", help="benchmark data tools")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    conv = dsub.add_parser("convert", help="raw CL_Benchmark / Instances data -> release layout")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--name", help="SRC is a local dataset (JSONL/CSV/Parquet/save_to_disk): "
                      "the task name to write it under")
    conv.add_argument("--input", default="input", help="with --name: the input column")
    conv.add_argument("--output", default="output", help="with --name: the output column")
    conv.add_argument("--prompt", help="with --name: a template holding {input}")
    conv.add_argument("--test-split", help="with --name: the split to use as test")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace existing target files whose content differs")
    chk = dsub.add_parser("check", help="validate a benchmark folder")
    chk.add_argument("dir")
    dl = dsub.add_parser("download", help="fetch the release data: verified (sha256), resumable")
    dl.add_argument("--dest", default="data/aimm", help="target folder (default data/aimm)")
    dl.add_argument("--url", help="archive URL (default: the GitHub archive of the pinned commit)")
    ex = sub.add_parser("export", help="a stage as a PEFT adapter (OUT/adapter) and a merged "
                        "full model (OUT/merged)")
    ex.add_argument("run_dir")
    ex.add_argument("out")
    ex.add_argument("--stage", type=int, help="stage number k (1-based; default: the last completed)")
    sub.add_parser("methods", help="list every method: its name, a tab, its one-line description")
    rp = sub.add_parser("reproduce", help="run the notebooks 01-04 with papermill")
    rp.add_argument("--preset", default="demo",
                    help="demo (default) | study | catalogue | smoke | standard_cl | long_sequence "
                         "| superni (aimm/reproduce.py's PRESETS)")
    rp.add_argument("--run-root", default="runs")
    rp.add_argument("--fig-dir", default="Fig")
    rp.add_argument("--data-dir")
    rp.add_argument("--model")
    rp.add_argument("--smoke", action="store_true",
                    help="the preset's grid with the tiny random model and tiny sizes (a quick "
                         "check; --model is refused with it)")
    rp.add_argument("--results-dir",
                    help="where the evidence goes (tables, study figures, command.txt); default: "
                         "the preset's (study: results/study-cpu, catalogue: results/catalogue-cpu), "
                         "none with --smoke")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "study": cmd_study, "report": cmd_report, "data": cmd_data,
                "reproduce": cmd_reproduce, "export": cmd_export, "methods": cmd_methods}
    try:
        return handlers[args.cmd](args)
    except (ConfigError, FileNotFoundError, OSError, ValueError, ArithmeticError) as exc:
        # user-caused: bad parameters or data, a damaged or busy run dir, a non-finite loss
        print(f"aimm {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
