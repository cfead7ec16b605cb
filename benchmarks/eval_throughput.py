"""Evaluation throughput: batched greedy generation vs one-by-one vs label scoring.

    python -m benchmarks.eval_throughput --model smollm2-135m --n 100 --out result.json

Takes the first ``n`` examples of a task's split after a seeded shuffle, decodes them with each
method on the same model and writes examples/s, accuracy and agreement rates as JSON.

``--adapter <run>/stages/<NN_task>/adapter.safetensors`` evaluates with a LoRA adapter trained
by ``aimm run`` (its rank / alpha / targets are read from ``<run>/config.json``): agreement
between generation and label scoring means little for an untrained model, which mostly does not
answer with a label at all.

Timing on a shared machine is noisy, so ``--repeats R`` runs every method R times in a rotated
order and reports the best (least disturbed) and the median wall time, plus the process CPU time;
the speed ratios use the best wall times.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from aimm.encoding import TruncationCounter, encode_prompts
from aimm.evaluation import (
    exact_match,
    generate,
    generate_one_by_one,
    label_scores,
    max_new_tokens_for,
)
from aimm.models import load_model

DEFAULT_DATA = "/work/shared/benchmarks/aimm/data_longsequence"


def load_examples(data_dir: str, task: str, split: str, n: int, seed: int):
    path = Path(data_dir) / split / f"{task}_T5.json"
    with open(path) as fh:
        rows = json.load(fh)
    labels = sorted({str(r["output"]) for r in rows})
    random.Random(seed).shuffle(rows)
    return rows[:n], labels, str(path)


def with_adapter(bundle, adapter: Path):
    """``bundle`` with the LoRA adapter a run saved at ``adapter`` (config from the run dir)."""
    from safetensors.torch import load_file

    from aimm.models import attach_lora, load_lora_state_dict

    if not adapter.is_file():
        raise SystemExit(f"{adapter}: no such adapter file")
    config_path = adapter.parent.parent.parent / "config.json"
    cfg = json.loads(config_path.read_text()) if config_path.is_file() else {}
    bundle = attach_lora(bundle, r=cfg.get("lora_r", 8), alpha=cfg.get("lora_alpha", 32),
                         targets=cfg.get("lora_targets"))
    load_lora_state_dict(bundle.model, load_file(str(adapter)))
    return bundle


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _same_rate(a, b) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-causal")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="eval_throughput.json")
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--task", default="dbpedia")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--label-batch-size", type=int, default=16, help="prompts per label-scoring group")
    ap.add_argument("--label-strategies", default="packed", help="comma list of packed,cache,full")
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument("--adapter", help="adapter.safetensors of a run's stage (LoRA config from the run)")
    ap.add_argument("--skip-one-by-one", action="store_true")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    examples, labels, path = load_examples(args.data_dir, args.task, args.split, args.n, args.seed)
    prompts = [str(r["input"]) for r in examples]
    refs = [str(r["output"]) for r in examples]

    load_start = time.perf_counter()
    bundle = load_model(args.model)
    if args.adapter:
        bundle = with_adapter(bundle, Path(args.adapter))
    bundle.model.to(device)
    load_s = time.perf_counter() - load_start
    model, tok, s2s = bundle.model, bundle.tokenizer, bundle.is_seq2seq
    budget = max_new_tokens_for(labels, tok, "accuracy")
    counter = TruncationCounter()
    lengths = [len(x) for x in encode_prompts(tok, prompts, is_seq2seq=s2s,
                                              max_input_len=args.max_input_len, counter=counter)]
    gkw = dict(is_seq2seq=s2s, max_new_tokens=budget, max_input_len=args.max_input_len)

    methods = {"batched": lambda: generate(model, tok, prompts, batch_size=args.batch_size, **gkw)}
    if not args.skip_one_by_one:
        methods["one_by_one"] = lambda: generate_one_by_one(model, tok, prompts, **gkw)
    for strategy in [s for s in args.label_strategies.split(",") if s]:
        methods[f"label_scoring_{strategy}"] = (lambda st: lambda: label_scores(
            model, tok, prompts, labels, is_seq2seq=s2s, batch_size=args.label_batch_size,
            max_input_len=args.max_input_len, strategy=st))(strategy)

    generate(model, tok, prompts[:2], batch_size=2, **gkw)  # warm-up, not timed
    names = list(methods)
    walls = {m: [] for m in names}
    cpus = {m: [] for m in names}
    preds: dict[str, list[str]] = {}
    stable = True
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            out, wall, cpu = _timed(methods[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"[round {r + 1}/{args.repeats}] {name}: {wall:.1f} s wall, {cpu:.1f} s cpu, "
                  f"{len(prompts) / wall:.2f} ex/s", flush=True)
            stable &= preds.setdefault(name, out) == out

    def acc(p):
        return sum(exact_match(x, y) for x, y in zip(p, refs)) / len(refs)

    n = len(prompts)
    result = {
        "model": args.model, "adapter": args.adapter, "is_seq2seq": s2s, "data": path, "task": args.task, "n": n,
        "seed": args.seed, "device": device, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "model_load_s": round(load_s, 2), "labels": len(labels), "max_new_tokens": budget,
        "prompt_tokens_mean": sum(lengths) / n, "prompt_tokens_max": max(lengths),
        "prompts_truncated": counter.prompts, "batch_size": args.batch_size,
        "label_batch_size": args.label_batch_size, "repeats": args.repeats,
        "predictions_stable_across_repeats": stable,
    }
    for name in names:
        best = min(walls[name])
        result[name] = {
            "best_wall_s": best, "median_wall_s": statistics.median(walls[name]),
            "walls_s": walls[name], "cpu_s": cpus[name], "examples_per_s": n / best,
            "accuracy": acc(preds[name]),
            "valid_label_rate": sum(p in labels for p in preds[name]) / n,
        }
    best = {name: min(walls[name]) for name in names}
    if "one_by_one" in preds:
        result["speedup_batched_vs_one_by_one"] = best["one_by_one"] / best["batched"]
        result["agreement_batched_vs_one_by_one"] = _same_rate(preds["batched"], preds["one_by_one"])
        result["disagreements_batched_vs_one_by_one"] = [
            {"id": r["id"], "batched": a, "one_by_one": b}
            for r, a, b in zip(examples, preds["batched"], preds["one_by_one"]) if a != b]
    for name in names:
        if name.startswith("label_scoring"):
            result[f"speedup_{name}_vs_batched"] = best["batched"] / best[name]
            result[f"agreement_batched_vs_{name}"] = sum(
                exact_match(a, b) for a, b in zip(preds["batched"], preds[name])) / n
    label_names = [m for m in names if m.startswith("label_scoring")]
    if len(label_names) > 1:
        result["agreement_between_label_strategies"] = _same_rate(
            preds[label_names[0]], preds[label_names[1]])
    result["sample"] = [
        {"id": r["id"], "reference": r["output"], **{m: preds[m][k] for m in names}}
        for k, r in enumerate(examples[:5])]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("sample", "disagreements_batched_vs_one_by_one")}, indent=1))
    return result


if __name__ == "__main__":
    main()
