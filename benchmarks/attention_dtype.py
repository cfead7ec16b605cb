"""``attention_dtype``: the attention kernel in bf16 against float32, speed and precision.

    python -m benchmarks.attention_dtype --model smollm2-135m --out attention_dtype.json

1. Kernel: ``F.scaled_dot_product_attention`` forward and backward (causal, the model's heads,
   key/value heads and head size, ``--batch-size`` x ``--seq-len``), median of ``--reps`` calls,
   on bf16 inputs (the model's attention in bf16) and on float32 inputs (``attention_dtype:
   float32``); PyTorch picks the kernel as it does in the model.
2. Precision: one batch of the engine_vs_hf data (``--seq-len`` tokens per row), LoRA as aimm
   attaches it (r 8 on q/v, lora_B drawn at random so that every LoRA weight has a gradient),
   dropout off: the loss on the target tail and the LoRA gradient of the bf16 model with each
   attention, against the float32 model's (the same weights, the same LoRA). Reported as
   ``|loss - loss_fp32|`` and ``||g - g_fp32|| / ||g_fp32||``.
3. Evaluation: label scoring (packed, a 4-D mask, the presets' path) of ``--n-eval`` prompts
   of the same data against 4 options in one batch, with each attention of the bf16 model;
   median of ``--eval-reps`` runs, the two models alternating.

The whole training step's time with each attention is in ``engine_vs_hf`` (``aimm`` against
``aimm_attn32``, interleaved in one process).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks._common import environment, fail, write_json

PROG = "attention_dtype"


def kernel_ms(shape: dict, dtype: torch.dtype, reps: int, seed: int) -> dict:
    """Median forward and backward milliseconds of one causal sdpa call at ``shape``."""
    g = torch.Generator().manual_seed(seed)
    b, h, kv, s, d = (shape[k] for k in ("batch", "heads", "kv_heads", "seq_len", "head_dim"))
    q = torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, kv, s, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, kv, s, d, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(b, h, s, d, generator=g).to(dtype)
    fwd, bwd = [], []
    for i in range(reps + 2):  # 2 warm-up calls
        t0 = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
        t1 = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        if i >= 2:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    return {"forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd)}


def loss_and_lora_grad(model, batch: dict) -> tuple[float, torch.Tensor]:
    from aimm.loss import lm_loss

    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch, is_seq2seq=False)
    loss.backward()
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    grads = [p.grad.float().flatten() for _, p in params if p.requires_grad]
    return float(loss.detach()), torch.cat(grads)


def lora_model(spec: str, dtype: torch.dtype, seed: int, attention_dtype: str):
    from aimm.attention import set_attention_dtype
    from aimm.models import attach_lora, load_model

    bundle = load_model(spec, dtype=dtype, seed=seed)
    set_attention_dtype(bundle.model, attention_dtype)
    torch.manual_seed(seed)
    bundle = attach_lora(bundle, r=8, alpha=32, dropout=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(bundle.model.named_parameters()):
            if "lora_B" in name:  # PEFT starts B at 0: then only B would get a gradient
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    bundle.model.eval()  # no dropout; gradients still flow
    return bundle.model


def label_scoring_s(models: dict, tokenizer, prompts: list[str], reps: int) -> dict:
    """Median seconds of one label-scoring pass per model; the models alternate run by run
    (after one warm-up pass each), so that a drift of the machine hits both alike."""
    from aimm.evaluation.label_scoring import label_logprobs

    options = ["positive", "negative", "neutral", "mixed feelings"]
    times: dict = {name: [] for name in models}
    for i in range(reps + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            label_logprobs(model, tokenizer, prompts, options, is_seq2seq=False,
                           batch_size=len(prompts), max_input_len=None)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="decoder-only model spec (tests: tiny-causal)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=150)
    ap.add_argument("--reps", type=int, default=30, help="timed kernel calls per dtype")
    ap.add_argument("--n-eval", type=int, default=20, help="prompts label-scored in one batch")
    ap.add_argument("--eval-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="attention_dtype.json")
    return ap


def main(argv=None) -> dict:
    from benchmarks.engine_vs_hf import Setup

    args = build_parser().parse_args(argv)
    for name, low in (("batch_size", 1), ("seq_len", 16), ("reps", 1), ("n_eval", 1),
                      ("eval_reps", 1)):
        if getattr(args, name) < low:
            fail(PROG, f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = max(1, -(-args.n_eval // args.batch_size))  # enough rows for --n-eval prompts
    setup_args = SimpleNamespace(model=args.model, steps=steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, dtype="bfloat16", seed=args.seed,
                                 lr=3e-4, lr_warmup_steps=0, device="cpu")
    with tempfile.TemporaryDirectory(prefix="aimm-attention-dtype-") as work:
        result = measure(args, Setup(setup_args, Path(work)))
    write_json(args.out, result)
    k = result["kernel"]
    for name in ("bfloat16", "float32"):
        print(f"kernel {name}: forward {k[name]['forward_ms']:.2f} ms, backward {k[name]['backward_ms']:.2f} ms")
    for attention in ("model", "float32"):
        p = result["precision"][f"bf16_model_attention_{attention}"]
        print(f"bf16 model, attention_dtype {attention}: |loss - fp32| {p['abs_loss_diff']:.4f}, "
              f"LoRA grad rel. diff {p['grad_rel_diff']:.4f}, label scoring of "
              f"{result['label_scoring_s']['n_prompts']} prompts "
              f"{result['label_scoring_s'][attention]:.2f} s")
    return result


def measure(args, setup) -> dict:
    """The kernel times, the precision against float32 and the label-scoring times."""
    batch = setup.encoded.batch(range(args.batch_size))
    ref = lora_model(args.model, torch.float32, args.seed, "model")
    cfg = ref.get_base_model().config
    shape = {"batch": args.batch_size, "heads": cfg.num_attention_heads,
             "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
             "seq_len": args.seq_len,
             "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads}
    ref_loss, ref_grad = loss_and_lora_grad(ref, batch)
    del ref
    result = {"benchmark": PROG, "environment": environment("cpu", model=args.model),
              "args": vars(args), "kernel_shape": shape, "kernel": {}, "precision": {
                  "reference": "the float32 model with the same LoRA weights",
                  "float32_model_loss": ref_loss}}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        result["kernel"][name] = kernel_ms(shape, dtype, args.reps, args.seed)
    prompts = [setup.tokenizer.decode(p) for p in setup.encoded.prompt_ids[:args.n_eval]]
    result["label_scoring_s"] = {"n_prompts": len(prompts), "options": 4}
    models = {}
    for attention in ("model", "float32"):
        model = models[attention] = lora_model(args.model, torch.bfloat16, args.seed, attention)
        loss, grad = loss_and_lora_grad(model, batch)
        result["precision"][f"bf16_model_attention_{attention}"] = {
            "loss": loss, "abs_loss_diff": abs(loss - ref_loss),
            "grad_rel_diff": float((grad - ref_grad).norm() / ref_grad.norm())}
        model.zero_grad(set_to_none=True)
    result["label_scoring_s"].update(label_scoring_s(models, setup.tokenizer, prompts, args.eval_reps))
    k = result["kernel"]
    result["kernel"]["float32_over_bfloat16"] = {
        "forward": k["float32"]["forward_ms"] / k["bfloat16"]["forward_ms"],
        "backward": k["float32"]["backward_ms"] / k["bfloat16"]["backward_ms"]}
    return result


if __name__ == "__main__":
    main()
