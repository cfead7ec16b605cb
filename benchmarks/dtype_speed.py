"""float32 against bfloat16 on this machine: the facts behind ``dtype: auto`` (aimm.hardware).

    python -m benchmarks.dtype_speed --model smollm2-135m --steps 2 --n-eval 20 --out result.json

For each dtype, in one process: the frozen GEMMs' rate at the model's shapes (FLOP/s), a LoRA
training step (r 8 on q/v, AdamW, loss on all tokens, batch ``--batch-size`` x ``--seq-len``
random tokens; every step timed, the median reported) and label scoring of ``--n-eval`` test
examples of ``--task`` (packed, evaluation batch 20). Also records the CPU's capability flags and
what ``auto`` chose. A bf16 step takes minutes on a CPU without bf16 matrix units, so keep
``--steps`` small there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aimm.evaluation.label_scoring import label_logprobs
from aimm.hardware import FAST_BF16_CPU_FLAGS, auto_dtype, cpu_capabilities
from aimm.models import attach_lora, load_model
from benchmarks._common import environment, fail, write_json
from benchmarks._flops import gemm_shapes, measure_gemm_rate, model_shapes
from benchmarks.eval_throughput import DEFAULT_DATA, load_examples

PROG = "benchmarks.dtype_speed"


def train_steps(model, steps: int, batch: int, seq_len: int, seed: int = 0) -> list[float]:
    """Seconds of each of ``steps`` LoRA steps (forward, backward, AdamW) on random tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (batch, seq_len), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per dtype")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=150)
    ap.add_argument("--n-eval", type=int, default=20, help="test examples scored per dtype")
    ap.add_argument("--task", default="dbpedia")
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--gemm-seconds", type=float, default=0.3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            fail(PROG, f"--dtypes {d}: choose float32 and/or bfloat16")
    for name in ("steps", "batch_size", "seq_len", "n_eval"):
        if getattr(a, name) < 1:
            fail(PROG, f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    try:
        rows, labels, path = load_examples(a.data_dir, a.task, "test", a.n_eval, seed=0)
    except (OSError, ValueError) as exc:
        fail(PROG, f"--data-dir {a.data_dir} --task {a.task}: cannot read the test split ({exc})")
    prompts = [r["input"] for r in rows]
    caps = dict(cpu_capabilities())
    result: dict = {
        "environment": environment("cpu", cpu_flags={k: caps.get(k) for k in FAST_BF16_CPU_FLAGS},
                                   architecture=caps.get("architecture")),
        "auto_chooses": auto_dtype("cpu"),
        "settings": {**vars(a), "eval_file": path, "eval_batch_size": 20, "lora": "r 8 on q/v"},
        "dtypes": {},
    }
    for name in dtypes:
        dtype = getattr(torch, name)
        bundle = attach_lora(load_model(a.model, dtype=dtype), r=8, alpha=32, targets=None)
        gemm = measure_gemm_rate(gemm_shapes(model_shapes(bundle.model), a.batch_size * a.seq_len),
                                 dtype, a.gemm_seconds)
        steps = train_steps(bundle.model, a.steps, a.batch_size, a.seq_len)
        start = time.perf_counter()
        label_logprobs(bundle.model, bundle.tokenizer, prompts, labels, is_seq2seq=False,
                       batch_size=20, max_input_len=256)
        eval_s = time.perf_counter() - start
        result["dtypes"][name] = {"gemm_flops_per_s": gemm["flops_per_s"], "step_s": steps,
                                  "step_s_median": statistics.median(steps),
                                  "eval_s": eval_s, "eval_examples_per_s": len(prompts) / eval_s}
        print(f"{name}: GEMM {gemm['flops_per_s'] / 1e9:.0f} GFLOP/s, step "
              f"{statistics.median(steps):.2f} s (each {[round(s, 2) for s in steps]}), "
              f"label scoring {len(prompts)} ex {eval_s:.1f} s", flush=True)
        del bundle
    if {"float32", "bfloat16"} <= set(result["dtypes"]):
        f, b = result["dtypes"]["float32"], result["dtypes"]["bfloat16"]
        result["bf16_over_fp32"] = {"step": b["step_s_median"] / f["step_s_median"],
                                    "eval": b["eval_s"] / f["eval_s"],
                                    "gemm_rate": b["gemm_flops_per_s"] / f["gemm_flops_per_s"]}
        print("bf16 / fp32: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["bf16_over_fp32"].items()))
    write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
