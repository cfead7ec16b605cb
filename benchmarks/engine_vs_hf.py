"""aimm's engine against ``transformers.Trainer`` + PEFT and a minimal PyTorch loop.

    python -m benchmarks.engine_vs_hf --model smollm2-135m --steps 12 --repeats 3 --out result.json

In ONE process, on the same examples (identical token ids), batch size, dtype and sequence
length, trains a LoRA adapter (r 8, alpha 32, dropout 0.05, the model's default targets: q/v)
with each trainer for ``--steps`` optimiser steps (AdamW lr 3e-4, weight decay 0, linear
warm-up of ``--lr-warmup-steps`` then linear decay, gradients clipped at 1.0):

* ``aimm``: the engine through its public entry ``aimm.engine.run`` (method ``seq_lora``, one
  task, label-scoring evaluation of one test example after the stage, outside the timing);
  loss on the target tokens with the LM head on the target tail only (``logits_to_keep``);
* ``trainer``: ``Trainer`` + PEFT as a careful user sets it up: its defaults (random sampler, so
  no grouping by length; default optimiser ``adamw_torch_fused``) with ``logging_strategy="no"``,
  ``save_strategy="no"``, no evaluation, ``report_to="none"``, ``disable_tqdm``; batches padded
  per batch by ``DataCollatorForLanguageModeling(mlm=False)``, i.e. the loss on ALL tokens, as
  users do by default;
* ``trainer_target``: the same Trainer with ``DataCollatorForSeq2Seq``-style labels (the prompt
  labelled -100): loss on the target tokens only, but the model still computes every logit;
* ``floor``: a hand-written loop (batches collated up front, forward with ``logits_to_keep`` as
  aimm passes it, an index tensor: :func:`aimm.loss.last_positions`,
  cross-entropy on the target tail, backward, clip, AdamW, scheduler): the same math as aimm
  with nothing around it;
* ``aimm_attn32``: ``aimm`` with ``attention_dtype: float32`` (:mod:`aimm.attention`): the
  attention kernel on float32 copies of a bf16 model's query/key/value. An option, not aimm's
  default; ``trainer`` and the floor run the attention as transformers loads the model (sdpa in
  the weights' dtype), as a user without aimm would.

Three more, for the GPU check (``gpu_check.sh``; not in the default ``--trainers``: on a CPU
``torch.compile`` brings nothing and its warm-up takes minutes, issue #15):

* ``aimm_compiled``: ``aimm`` with ``compile: true`` (the engine compiles the model in place with
  ``--compile-backend`` and pads batch widths to multiples of 64: at a ``--seq-len`` that is not
  one, it computes the padded width);
* ``plain``: plain HF + PEFT, a hand-written loop that passes ``labels=input_ids`` to the PEFT
  model (transformers' own shifted cross-entropy over ALL tokens, every logit computed: the
  Trainer's math without the Trainer), then clip, AdamW, scheduler;
* ``plain_compiled``: ``plain`` on the PEFT model compiled in place (``model.compile``): the
  "plain compiled HF + PEFT" reference of issue #15's GPU goal.

Dtype policy (all trainers, as aimm does): the base model's weights in ``--dtype`` (``auto``
by default: bf16 where the CPU has AMX / AVX512-BF16, else fp32; see aimm.hardware), the LoRA
weights in fp32 (PEFT's ``autocast_adapter_dtype``), no autocast; Trainer runs with
``bf16=False`` so that it does not add an autocast aimm does not use.

Data: a synthetic one-label task whose prompts are cut to ``seq_len - 2`` tokens, so every
sequence (prompt + one label token + EOS) is exactly ``--seq-len`` tokens: no padding, and the
order in which a trainer draws the examples does not change its work.

Per trainer it reports the median step time after ``--warmup-steps`` steps (steps timed between
consecutive step ends), tokens/s, and the share of the bf16 GEMM rate measured in the same run at
the model's shapes (FLOPs per step from :mod:`benchmarks._flops`, counted per trainer: the LM head
over all positions for Trainer, over the target tail for aimm and the floor). Repeats are
interleaved (aimm, trainer, trainer_target, floor, aimm, ...) to cancel slow drifts of the
machine's load (finer interleaving, step by step, was tried and biases the ratios: see the
benchmarks README). Ratios: of the medians; per repeat, with their mean and 95% Student-t
interval over the repeats. Goals (issue #15): aimm <= 0.8x Trainer's time per step, aimm <= 1.1x
the floor; a goal's ``verdict`` is ``met`` / ``not met`` only when the repeats' interval lies
wholly on one side of it, else ``not resolved``. With the compiled trainers also compiled against
eager (``aimm_compiled/aimm``, ``plain_compiled/plain``) and the GPU goal, ``aimm_compiled`` <= 1.2x
``plain_compiled``. A compiled run's first steps include the compilation: leave them out with
``--warmup-steps``. On CUDA every trainer's step end is taken after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings as pywarnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks._common import (DTYPE_CHOICES, concrete_dtype, environment, fail, median, ratio,
                                resolve_device, write_json)
from benchmarks._flops import (FLOPS_FORMULA, gemm_shapes, lora_step_flops, measure_gemm_rate,
                               model_shapes)

PROG = "engine_vs_hf"
#: The default ``--trainers`` (the CPU comparison of issue #15, part 1).
DEFAULT_TRAINERS = ("aimm", "trainer", "trainer_target", "floor", "aimm_attn32")
#: Every trainer, in the order they run.
TRAINERS = DEFAULT_TRAINERS + ("aimm_compiled", "plain", "plain_compiled")
#: Trainers whose loss needs the LM head on every position (the rest: on the target tail).
ALL_LOGITS = ("trainer", "trainer_target", "plain", "plain_compiled")
TASK = "sst-2"
TARGET_TOKENS = 2  # one label token + EOS
GOALS = {"aimm/trainer": 0.8, "aimm/floor": 1.1, "aimm_compiled/plain_compiled": 1.2}
#: The ratios reported, ``(a, b)`` for ``a/b``, when both trainers ran.
PAIRS = (("aimm", "trainer"), ("aimm", "trainer_target"), ("aimm", "floor"), ("trainer", "floor"),
         ("aimm_attn32", "trainer"), ("aimm_attn32", "aimm"),
         ("aimm_compiled", "plain_compiled"), ("aimm_compiled", "aimm"), ("plain_compiled", "plain"),
         ("aimm", "plain"))


# ------------------------------------------------------------------------------ pure helpers
def steady_step_times(stamps: list[float], warmup: int) -> list[float]:
    """Step times from the step-end times ``e_1..e_N``: ``e_i - e_{i-1}`` for steps ``i > warmup``
    (step 1 has no start mark, so it is never timed)."""
    return [b - a for i, (a, b) in enumerate(zip(stamps, stamps[1:]), start=2) if i > warmup]


def goal_verdict(estimate, goal: float) -> str:
    """``met`` when the whole 95% interval of the ratio lies at or under ``goal``, ``not met``
    when it lies above, else ``not resolved`` (also with fewer than two repeats)."""
    if estimate.n < 2:
        return "not resolved (fewer than 2 repeats)"
    if estimate.ci_high <= goal:
        return "met"
    if estimate.ci_low > goal:
        return "not met"
    return "not resolved"


def summarize(runs: list[dict], tokens_per_step: float, flops: dict[str, float],
              gemm_flops_per_s: float | None) -> tuple[dict, dict]:
    """Medians per trainer and the ratios of the headline pairs.

    ``runs``: ``{"trainer", "repeat", "s_per_step"}`` (the run's median step time).
    ``flops``: model FLOPs of one step per trainer. Returns ``(summary, ratios)``.

    Per pair: ``time_per_step`` (ratio of the medians), ``per_repeat`` (ratio of each repeat's
    medians) with its mean and 95% Student-t interval (``repeats``); for a goal pair also
    ``verdict`` (:func:`goal_verdict` of that interval) and ``meets_goal`` (the point ratio
    alone at or under the goal).
    """
    from aimm.study.stats import estimate

    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["trainer"] for r in runs):
        s = median([r["s_per_step"] for r in runs if r["trainer"] == name])
        f = flops.get(name)
        summary[name] = {
            "s_per_step": s, "n": sum(r["trainer"] == name for r in runs),
            "tokens_per_s": ratio(tokens_per_step, s),
            "flops_per_step": f,
            "flops_per_s": ratio(f, s),
            "gemm_share": ratio(ratio(f, s), gemm_flops_per_s),
        }
    ratios: dict[str, dict] = {}
    for a, b in PAIRS:
        if a not in summary or b not in summary:
            continue
        per_repeat = []
        for rep in sorted({r["repeat"] for r in runs}):
            ra = next((r for r in runs if r["repeat"] == rep and r["trainer"] == a), None)
            rb = next((r for r in runs if r["repeat"] == rep and r["trainer"] == b), None)
            if ra and rb:
                per_repeat.append(ratio(ra["s_per_step"], rb["s_per_step"]))
        key = f"{a}/{b}"
        est = estimate(per_repeat)  # None dropped
        ratios[key] = {"time_per_step": ratio(summary[a]["s_per_step"], summary[b]["s_per_step"]),
                       "per_repeat": per_repeat, "median_of_repeats": median(per_repeat),
                       "repeats": {"n": est.n, "mean": est.mean,
                                   "ci95": [est.ci_low, est.ci_high] if est.n >= 2 else None}}
        if key in GOALS and ratios[key]["time_per_step"] is not None:
            ratios[key]["goal"] = GOALS[key]
            ratios[key]["meets_goal"] = ratios[key]["time_per_step"] <= GOALS[key]
            ratios[key]["verdict"] = goal_verdict(est, GOALS[key])
    return summary, ratios


# ------------------------------------------------------------------------------ set-up
class Setup:
    """What every trainer shares: data on disk, the encoded examples, the model spec."""

    def __init__(self, args, root: Path) -> None:
        from aimm.data import load_tasks
        from aimm.data.synthetic import SYNTHETIC_TASKS, make_synthetic_benchmark
        from aimm.encoding import EncodedExamples
        from aimm.models import load_model

        self.args = args
        self.n = args.steps * args.batch_size
        words = (args.seq_len + 4, args.seq_len + 12)  # >= 1 token per word: prompts get cut
        make_synthetic_benchmark(root, n_train=self.n, n_test=1, words=words, seed=args.seed,
                                 tasks={TASK: SYNTHETIC_TASKS[TASK]})
        self.data_dir = root
        task = load_tasks(root, "long_sequence", [TASK], max_train=self.n, max_test=1,
                          seed=args.seed)[TASK]
        bundle = load_model(args.model, dtype=self.dtype, seed=args.seed,
                            random_device="meta")  # for its shapes only: no memory, no init
        if bundle.is_seq2seq:
            fail(PROG, f"--model {args.model}: a seq2seq model; this benchmark compares "
                       "decoder-only trainers (e.g. smollm2-135m, tiny-causal)")
        self.tokenizer = bundle.tokenizer
        self.encoded = EncodedExamples.from_texts(
            self.tokenizer, [e.input for e in task.train], [e.output for e in task.train],
            is_seq2seq=False, max_input_len=args.seq_len - TARGET_TOKENS, max_target_len=128)
        lengths = [len(p) + len(t) for p, t in zip(self.encoded.prompt_ids, self.encoded.target_ids)]
        self.uniform = len(set(lengths)) == 1
        self.tokens_per_step = sum(lengths) / len(lengths) * args.batch_size
        self.keep = max(len(t) for t in self.encoded.target_ids) + 1  # aimm's logits_to_keep
        self.shapes = model_shapes(self.peft_model(bundle.model))
        del bundle

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.args.dtype)

    def peft_model(self, base=None):
        """A fresh base model (or ``base``) with the LoRA adapter of aimm's defaults."""
        from peft import LoraConfig, get_peft_model

        from aimm.models import default_lora_targets, load_model

        if base is None:
            base = load_model(self.args.model, dtype=self.dtype, seed=self.args.seed,
                              random_device=self.args.device).model  # as aimm's engine builds it
        torch.manual_seed(self.args.seed)
        config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                            target_modules=default_lora_targets(base))
        return get_peft_model(base, config)

    def lr_factor(self, step: int) -> float:
        w, total = self.args.lr_warmup_steps, self.args.steps
        return step / max(1, w) if step < w else max(0.0, (total - step) / max(1, total - w))


# ------------------------------------------------------------------------------ the trainers
class _AimmStepEnd:
    """An aimm callback that reports each optimiser step's end."""

    def __init__(self, step_end: Callable[[], None]) -> None:
        self.step_end = step_end

    def on_step(self, record: dict) -> None:
        self.step_end()


def run_aimm(setup: Setup, work: Path, repeat: int, step_end: Callable[[], None],
             attention_dtype: str = "model", compile: bool = False) -> None:
    from aimm.engine import run

    a = setup.args
    run_dir = work / f"aimm-{attention_dtype}-{int(compile)}-r{repeat}"
    clock = _AimmStepEnd(step_end)
    run({"benchmark": "long_sequence", "tasks": [TASK], "data_dir": str(setup.data_dir),
         "max_train": setup.n, "max_test": 1, "method": "seq_lora", "model": a.model,
         "dtype": a.dtype, "batch_size": a.batch_size, "grad_accum": 1, "epochs": 1.0,
         "lr": a.lr, "warmup_steps": a.lr_warmup_steps, "max_grad_norm": 1.0,
         "weight_decay": 0.0, "max_input_len": a.seq_len - TARGET_TOKENS,
         "eval_mode": "label_scoring", "eval_batch_size": 1, "device": a.device,
         "progress": False, "seed": a.seed, "run_dir": str(run_dir),
         "attention_dtype": attention_dtype, "compile": compile,
         "compile_backend": a.compile_backend}, callbacks=[clock])
    shutil.rmtree(run_dir, ignore_errors=True)


def training_arguments(setup: Setup, out_dir: Path):
    """The ``TrainingArguments`` of ``trainer`` and ``trainer_target``."""
    from transformers import TrainingArguments

    a = setup.args
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
        learning_rate=a.lr, weight_decay=0.0, warmup_steps=a.lr_warmup_steps,
        lr_scheduler_type="linear", max_grad_norm=1.0, bf16=False, seed=a.seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=a.device == "cpu", dataloader_pin_memory=a.device != "cpu")


def training_arguments_record(setup: Setup, work: Path) -> dict[str, str]:
    """The settings of :func:`training_arguments` that a reader of the JSON asks about."""
    args = training_arguments(setup, work / "trainer-args")
    return {k: str(getattr(args, k)) for k in (
        "optim", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "weight_decay", "bf16",
        "train_sampling_strategy", "logging_strategy", "save_strategy", "eval_strategy",
        "report_to", "dataloader_num_workers", "torch_compile")}


def run_trainer(setup: Setup, work: Path, repeat: int, step_end: Callable[[], None],
                target_only: bool) -> None:
    from transformers import (DataCollatorForLanguageModeling, DataCollatorForSeq2Seq,
                              PrinterCallback, Trainer, TrainerCallback)
    from transformers.utils import logging as hf_logging

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end()

    enc = setup.encoded
    if target_only:
        rows = [{"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)),
                 "labels": [-100] * len(p) + t} for p, t in zip(enc.prompt_ids, enc.target_ids)]
        collator = DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=-100)
    else:
        rows = [{"input_ids": p + t} for p, t in zip(enc.prompt_ids, enc.target_ids)]
        collator = DataCollatorForLanguageModeling(setup.tokenizer, mlm=False)
    out_dir = work / f"trainer-r{repeat}-{int(target_only)}"
    args = training_arguments(setup, out_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        trainer = Trainer(model=setup.peft_model(), args=args, train_dataset=rows,
                          data_collator=collator, callbacks=[StepEnd()])
        trainer.remove_callback(PrinterCallback)  # the final metrics print (tqdm is off)
        trainer.train()
    finally:
        hf_logging.set_verbosity(verbosity)
        shutil.rmtree(out_dir, ignore_errors=True)


def tail_loss(model, b: dict, device: str) -> torch.Tensor:
    """The floor's loss: aimm's math (LM head on the target tail, :func:`aimm.loss.last_positions`;
    cross-entropy on the target tokens)."""
    import torch.nn.functional as F
    from aimm.loss import last_positions

    keep = b["logits_to_keep"]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=b["position_ids"],
                   logits_to_keep=last_positions(keep, device)).logits
    labels = b["labels"][:, -keep:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def all_tokens_loss(model, b: dict, device: str) -> torch.Tensor:
    """Plain HF + PEFT: ``labels`` = the input ids (padding -100), transformers' own shifted
    cross-entropy over every position."""
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 labels=b["all_labels"]).loss


def run_loop(setup: Setup, work: Path, repeat: int, step_end: Callable[[], None],
             loss: Callable = tail_loss, compile: bool = False) -> None:
    """A hand-written loop over batches collated up front: ``loss``, backward, clip, AdamW,
    scheduler; ``compile``: the PEFT model compiled in place, as the engine does."""
    a = setup.args
    model = setup.peft_model().to(a.device)
    model.train()
    if compile:
        model.compile(backend=a.compile_backend)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, setup.lr_factor)
    batches = [setup.encoded.batch(range(i * a.batch_size, (i + 1) * a.batch_size))
               for i in range(a.steps)]
    for b in batches:
        b["all_labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    batches = [{k: v.to(a.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
               for b in batches]
    for b in batches:
        loss(model, b, a.device).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_end()


#: ``runner(setup, work, repeat, step_end)``: one run of a trainer, ``step_end()`` after each step.
RUNNERS = {
    "aimm": run_aimm,
    "trainer": partial(run_trainer, target_only=False),
    "trainer_target": partial(run_trainer, target_only=True),
    "floor": run_loop,
    "aimm_attn32": partial(run_aimm, attention_dtype="float32"),
    "aimm_compiled": partial(run_aimm, compile=True),
    "plain": partial(run_loop, loss=all_tokens_loss),
    "plain_compiled": partial(run_loop, loss=all_tokens_loss, compile=True),
}


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="decoder-only model spec (tests: tiny-causal)")
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    ap.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every trainer")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=150, help="tokens of every sequence")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    ap.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS),
                    help=f"comma-separated, run in this order; from {', '.join(TRAINERS)}")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the *_compiled trainers (eager: trace only, tests)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-warmup-steps", type=int, default=2)
    ap.add_argument("--gemm-seconds", type=float, default=0.5, help="GEMM timing per shape")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="engine_vs_hf.json")
    return ap


def check_args(args) -> list[str]:
    trainers = [t for t in args.trainers.split(",") if t]
    bad = [t for t in trainers if t not in TRAINERS]
    if bad or not trainers:
        fail(PROG, f"--trainers {args.trainers!r}: choose from {', '.join(TRAINERS)}")
    if args.steps < args.warmup_steps + 2:
        fail(PROG, f"--steps {args.steps}: need at least --warmup-steps + 2 = "
                   f"{args.warmup_steps + 2} steps to time one")
    for name in ("warmup_steps", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            fail(PROG, f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    for name, low in (("repeats", 1), ("batch_size", 1), ("seq_len", TARGET_TOKENS + 8)):
        if getattr(args, name) < low:
            fail(PROG, f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    if not args.compile_backend:
        fail(PROG, "--compile-backend '': name a torch.compile backend, e.g. inductor")
    if not args.gemm_seconds > 0:
        fail(PROG, f"--gemm-seconds {args.gemm_seconds}: must be > 0")
    return trainers


def main(argv=None) -> dict:
    from aimm.errors import ModelError

    args = build_parser().parse_args(argv)
    args.dtype = concrete_dtype(args.dtype, args.device)
    trainers = check_args(args)
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="aimm-engine-vs-hf-"))
    try:
        try:
            setup = Setup(args, tmp / "data")
        except ModelError as exc:
            fail(PROG, f"--model {args.model}: {str(exc).splitlines()[0]}")
        result = measure(args, setup, trainers, tmp / "runs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(result)
    return result


def measure(args, setup: Setup, trainers: list[str], work: Path) -> dict:
    a, shapes = args, setup.shapes
    tokens = a.batch_size * a.seq_len
    gemm = measure_gemm_rate(gemm_shapes(shapes, tokens), setup.dtype, a.gemm_seconds, a.device)
    flops = {name: lora_step_flops(shapes, a.batch_size, a.seq_len,
                                   a.seq_len if name in ALL_LOGITS else setup.keep)
             for name in trainers}
    result: dict[str, Any] = {
        "benchmark": PROG, "partial": True,
        "environment": environment(a.device, model=a.model, dtype=a.dtype),
        "model": a.model, "dtype": a.dtype, "device": a.device, "args": vars(a),
        "dtype_policy": f"base weights {a.dtype}, LoRA weights float32, no autocast (aimm's "
                        "policy, all trainers; Trainer bf16=False)",
        "data": {"examples": setup.n, "seq_len": a.seq_len, "uniform_length": setup.uniform,
                 "target_tokens": TARGET_TOKENS, "logits_to_keep": setup.keep},
        "tokens_per_step": setup.tokens_per_step, "shapes": shapes,
        "flops_formula": FLOPS_FORMULA, "flops_per_step": flops, "gemm": gemm,
        "trainers": trainers, "runs": [], "summary": {}, "ratios": {},
        "trainer_args": training_arguments_record(setup, work),
    }
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    for rep in range(a.repeats):
        for run in _repeat(setup, work, rep, trainers):
            result["runs"].append(run)
            print(f"[{PROG}] repeat {rep} {run['trainer']}: {run['s_per_step']:.4f} s/step "
                  f"({run['steps_done']} steps)", file=sys.stderr, flush=True)
            result["summary"], result["ratios"] = summarize(
                result["runs"], setup.tokens_per_step,
                {k: v["total"] for k, v in flops.items()}, gemm["flops_per_s"])
            result["elapsed_s"] = round(time.perf_counter() - started, 2)
            write_json(a.out, result)
    result["partial"] = False
    write_json(a.out, result)
    return result


def _repeat(setup: Setup, work: Path, rep: int, trainers: list[str]):
    """One repeat: one whole run after the other; steps timed between consecutive step ends
    (on CUDA after the device finished the step: it runs asynchronously)."""
    cuda = setup.args.device == "cuda"
    for name in trainers:
        stamps: list[float] = []

        def step_end() -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        wall, graphs = time.perf_counter(), _compiled_graphs()
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")
            RUNNERS[name](setup, work, rep, step_end)
        steps = steady_step_times(stamps, setup.args.warmup_steps)
        yield {"trainer": name, "repeat": rep, "steps_done": len(stamps),
               "step_s": [round(x, 5) for x in steps], "s_per_step": median(steps),
               "run_wall_s": round(time.perf_counter() - wall, 3),
               "compiled_graphs": _compiled_graphs() - graphs}


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's counter): a compiled
    trainer's run that adds none ran eagerly."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def print_table(result: dict) -> None:
    gemm = result["gemm"]["flops_per_s"]
    print(f"GEMM rate ({result['gemm']['dtype']}, model shapes): {gemm / 1e9:.1f} GFLOP/s; "
          f"{result['tokens_per_step']:.0f} tokens/step")
    print(f"{'trainer':<16}{'s/step':>10}{'tokens/s':>11}{'GFLOP/step':>12}{'GEMM share':>12}")
    for name, s in result["summary"].items():
        print(f"{name:<16}{s['s_per_step']:>10.4f}{s['tokens_per_s']:>11.1f}"
              f"{s['flops_per_step'] / 1e9:>12.2f}{s['gemm_share']:>12.1%}")
    for key, r in result["ratios"].items():
        per = ", ".join(f"{x:.3f}" for x in r["per_repeat"] if x is not None)
        ci = r["repeats"]["ci95"]
        spread = f", mean {r['repeats']['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        goal = f"  goal <= {r['goal']}: {r['verdict']}" if "goal" in r else ""
        print(f"{key:<30}{r['time_per_step']:.3f}x  per repeat [{per}]{spread}{goal}")


if __name__ == "__main__":
    main()
