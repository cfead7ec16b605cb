"""Label scoring of a prompt-tuning model (``progprompt``): the packed path against PEFT's forward.

    python -m benchmarks.prompt_scoring --model smollm2-135m --dtype bfloat16 --stage 3 --n 10 \
        --out benchmarks/results/cpu-2core/prompt_scoring.json

The model is wrapped by :class:`aimm.methods.progprompt.ProgPrompt` at stage ``--stage``
(0-based: ``(stage + 1) * prompt_length`` virtual tokens, the soft prompts initialised from the
vocabulary as the method does), and the first ``n`` test prompts of a task (seeded shuffle) are
scored against all the task's labels with ``strategy="packed"`` (one base-model forward per group,
the soft prompt fed as input embeddings) and ``strategy="full"`` (PEFT's own forward on one
right-padded row per (prompt, option) pair; what every prompt-tuning model got before). Reported:
wall time per strategy (best of ``--repeats``, rotated order), the speed ratio, the prediction
agreement and the largest log-probability difference between the two paths (bf16 rounding).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from aimm.evaluation.label_scoring import label_logprobs
from aimm.methods.progprompt import ProgPrompt
from aimm.models import load_model
from benchmarks._common import DTYPE_CHOICES, concrete_dtype, environment, ratio, write_json
from benchmarks.eval_throughput import DEFAULT_DATA, load_examples

STRATEGIES = ("packed", "full")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-causal")
    ap.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    ap.add_argument("--stage", type=int, default=3, help="0-based ProgPrompt stage (stage+1 prompts)")
    ap.add_argument("--tasks", type=int, default=4, help="tasks the prompt table is sized for")
    ap.add_argument("--prompt-length", type=int, default=10)
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--task", default="dbpedia")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=20, help="prompts per label-scoring group")
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="prompt_scoring.json")
    a = ap.parse_args(argv)
    a.dtype = concrete_dtype(a.dtype, "cpu")
    if not 0 <= a.stage < a.tasks:
        ap.error(f"--stage {a.stage}: must be in 0..{a.tasks - 1} (--tasks {a.tasks})")

    examples, labels, path = load_examples(a.data_dir, a.task, a.split, a.n, a.seed)
    prompts = [str(r["input"]) for r in examples]
    dtype = getattr(torch, a.dtype)
    method = ProgPrompt(ProgPrompt.parse_options({"prompt_length": a.prompt_length}))
    bundle = method.setup_model(load_model(a.model, dtype=dtype, seed=a.seed),
                                SimpleNamespace(task_names=lambda: [f"t{i}" for i in range(a.tasks)]))
    method._activate(a.stage)
    model = bundle.model
    model.eval()

    def score(strategy):
        return label_logprobs(model, bundle.tokenizer, prompts, labels,
                              is_seq2seq=bundle.is_seq2seq, batch_size=a.batch_size,
                              max_input_len=a.max_input_len, strategy=strategy)

    score("packed")  # warm-up, not timed
    walls: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    tables: dict[str, list[list[float]]] = {}
    for r in range(a.repeats):
        for strategy in STRATEGIES[r % 2:] + STRATEGIES[: r % 2]:
            start = time.perf_counter()
            tables[strategy] = score(strategy)
            walls[strategy].append(time.perf_counter() - start)
            print(f"[round {r + 1}/{a.repeats}] {strategy}: {walls[strategy][-1]:.2f} s", flush=True)

    def argmax(row):
        return max(range(len(row)), key=row.__getitem__)

    packed, full = (torch.tensor(tables[s], dtype=torch.float64) for s in STRATEGIES)
    best = {s: min(w) for s, w in walls.items()}
    result = {
        "benchmark": "prompt_scoring",
        "environment": environment("cpu", model=a.model, dtype=a.dtype),
        "args": vars(a), "data": path, "labels": len(labels),
        "virtual_tokens": (a.stage + 1) * a.prompt_length,
        "runs": {s: {"walls_s": walls[s], "best_wall_s": best[s],
                     "examples_per_s": len(prompts) / best[s]} for s in STRATEGIES},
        "speedup_packed_vs_full": ratio(best["full"], best["packed"]),
        "prediction_agreement": sum(argmax(p) == argmax(f) for p, f in zip(tables["packed"],
                                                                            tables["full"])) / len(prompts),
        "max_abs_logprob_diff": float((packed - full).abs().max()),
        "mean_abs_logprob": float(full.abs().mean()),
    }
    write_json(a.out, result)
    print({k: result[k] for k in ("virtual_tokens", "speedup_packed_vs_full",
                                  "prediction_agreement", "max_abs_logprob_diff")})
    return result


if __name__ == "__main__":
    main()
