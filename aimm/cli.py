"""Command line: ``aimm run | report | data convert | data check | reproduce``."""

from __future__ import annotations

import argparse
import json
import sys

from aimm.config import ConfigError, RunConfig


def _parse_value(text: str):
    """``key=value`` option values: JSON if it parses (numbers, true, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train a method through a task sequence and evaluate it")
    p.add_argument("--config", help="YAML file of RunConfig fields (flags override it)")
    p.add_argument("--benchmark", help="standard_cl | long_sequence | superni")
    p.add_argument("--order", type=int, help="task order number of the benchmark")
    p.add_argument("--tasks", help="custom order: comma-separated task names")
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
    p.add_argument("--probe-history", action="store_true", default=None,
                   help="record the forgetting signal (history loss) for any method")
    p.add_argument("--checkpoint-every", type=int, help="within-task checkpoint every N steps")
    p.add_argument("--nan-policy", help="stop | skip")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-dir", help="run directory (re-running an existing one resumes it)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--dtype", help="base-model weights: float32 (default) | bfloat16 (LoRA stays float32)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


FLAG_FIELDS = ("benchmark", "order", "method", "model", "data_dir", "max_train", "max_test",
               "epochs", "lr", "batch_size", "grad_accum", "max_input_len", "eval_mode",
               "eval_batch_size", "buffer_mode", "probe_history", "checkpoint_every",
               "nan_policy", "seed", "run_dir", "device", "dtype")


def config_from_args(args) -> RunConfig:
    values = {f: getattr(args, f) for f in FLAG_FIELDS if getattr(args, f) is not None}
    if args.tasks:
        values["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_progress:
        values["progress"] = False
    options = {}
    for item in args.option:
        if "=" not in item:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value)
    if args.config:
        base = RunConfig.from_yaml(args.config)
        merged = base.to_dict()
        merged.update(values)
        if options:
            merged["method_options"] = {**merged.get("method_options", {}), **options}
        return _validated(merged, args.config)
    if options:
        values["method_options"] = options
    return _validated(values, "command line")


def _validated(values: dict, source: str) -> RunConfig:
    """The config, its fields and its method's options checked (``ConfigError`` names them)."""
    from aimm.methods import build_method

    cfg = RunConfig.from_dict(values, source=source)
    build_method(cfg, source=source)
    return cfg


def cmd_run(args) -> int:
    from aimm.engine import run
    from aimm.runs import report_text

    cfg = config_from_args(args)
    run_dir = run(cfg)
    print(f"run dir: {run_dir}")
    print(report_text(run_dir))
    return 0


def cmd_report(args) -> int:
    from aimm.runs import report_text

    print(report_text(args.run_dir))
    return 0


def cmd_data(args) -> int:
    from aimm.data.check import main_check, main_convert

    if args.data_cmd == "check":
        return main_check(args.dir)
    return main_convert(args.src, args.dst)


def cmd_reproduce(args) -> int:
    from aimm.reproduce import reproduce

    out = reproduce(args.preset, run_root=args.run_root, fig_dir=args.fig_dir,
                    data_dir=args.data_dir, model=args.model)
    print(f"reproduction written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    rep = sub.add_parser("report", help="scores matrix and metrics of a run")
    rep.add_argument("run_dir")
    data = sub.add_parser("data", help="benchmark data tools")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    conv = dsub.add_parser("convert", help="raw CL_Benchmark / Instances data -> release layout")
    conv.add_argument("src")
    conv.add_argument("dst")
    chk = dsub.add_parser("check", help="validate a benchmark folder")
    chk.add_argument("dir")
    rp = sub.add_parser("reproduce", help="run the notebooks 01-04 with papermill")
    rp.add_argument("--preset", default="demo",
                    help="demo | smoke | standard_cl | long_sequence | superni")
    rp.add_argument("--run-root", default="runs")
    rp.add_argument("--fig-dir", default="Fig")
    rp.add_argument("--data-dir")
    rp.add_argument("--model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "report": cmd_report, "data": cmd_data, "reproduce": cmd_reproduce}
    try:
        return handlers[args.cmd](args)
    except (ConfigError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"aimm {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
