"""Evaluation throughput: batched greedy generation vs one-by-one vs label scoring.

    python -m benchmarks.eval_throughput --model smollm2-135m --n 100 --out result.json

Takes the first ``n`` examples of a task's test split after a seeded shuffle, decodes them three
ways with the same model and reports examples/s, accuracy and agreement rates as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
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


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _agreement(a, b) -> float:
    return sum(exact_match(x, y) for x, y in zip(a, b)) / len(a)


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
    ap.add_argument("--label-batch-size", type=int, default=4, help="prompts per label-scoring group")
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument("--skip-one-by-one", action="store_true")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    examples, labels, path = load_examples(args.data_dir, args.task, args.split, args.n, args.seed)
    prompts = [str(r["input"]) for r in examples]
    refs = [str(r["output"]) for r in examples]

    load_start = time.perf_counter()
    bundle = load_model(args.model)
    bundle.model.to(device)
    load_s = time.perf_counter() - load_start
    model, tok, s2s = bundle.model, bundle.tokenizer, bundle.is_seq2seq
    budget = max_new_tokens_for(labels, tok, "accuracy")
    counter = TruncationCounter()
    lengths = [len(x) for x in encode_prompts(tok, prompts, is_seq2seq=s2s,
                                              max_input_len=args.max_input_len, counter=counter)]
    gkw = dict(is_seq2seq=s2s, max_new_tokens=budget, max_input_len=args.max_input_len)

    generate(model, tok, prompts[:2], batch_size=2, **gkw)  # warm-up, not timed
    batched, t_batched = _timed(lambda: generate(model, tok, prompts, batch_size=args.batch_size, **gkw))
    if args.skip_one_by_one:
        single, t_single = None, None
    else:
        single, t_single = _timed(lambda: generate_one_by_one(model, tok, prompts, **gkw))
    scored, t_label = _timed(lambda: label_scores(
        model, tok, prompts, labels, is_seq2seq=s2s, batch_size=args.label_batch_size,
        max_input_len=args.max_input_len))

    def acc(preds):
        return sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(refs)

    n = len(prompts)
    result = {
        "model": args.model,
        "is_seq2seq": s2s,
        "data": path,
        "task": args.task,
        "n": n,
        "seed": args.seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_load_s": round(load_s, 2),
        "labels": len(labels),
        "max_new_tokens": budget,
        "prompt_tokens_mean": sum(lengths) / n,
        "prompt_tokens_max": max(lengths),
        "prompts_truncated": counter.prompts,
        "batch_size": args.batch_size,
        "label_batch_size": args.label_batch_size,
        "batched": {"seconds": t_batched, "examples_per_s": n / t_batched, "accuracy": acc(batched)},
        "label_scoring": {"seconds": t_label, "examples_per_s": n / t_label, "accuracy": acc(scored)},
        "agreement_generate_vs_label_scoring": _agreement(batched, scored),
        "valid_label_rate_batched": sum(p in labels for p in batched) / n,
    }
    if single is not None:
        result["one_by_one"] = {"seconds": t_single, "examples_per_s": n / t_single, "accuracy": acc(single)}
        result["speedup_batched_vs_one_by_one"] = t_single / t_batched
        result["agreement_batched_vs_one_by_one"] = sum(a == b for a, b in zip(batched, single)) / n
        result["disagreements_batched_vs_one_by_one"] = [
            {"id": r["id"], "batched": a, "one_by_one": b}
            for r, a, b in zip(examples, batched, single) if a != b
        ]
    result["speedup_label_scoring_vs_batched"] = t_batched / t_label
    result["sample"] = [
        {"id": r["id"], "reference": r["output"], "batched": a, "label_scoring": c}
        for r, a, c in list(zip(examples, batched, scored))[:5]
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k not in ("sample", "disagreements_batched_vs_one_by_one")}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
