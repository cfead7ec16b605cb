"""Model FLOPs of a LoRA training step and the GEMM rate at the model's shapes.

The FLOP counts are pure functions of the shapes (tested on hand-made numbers); the GEMM rate is
measured with ``torch.nn.functional.linear`` at the shapes of the model's frozen linear layers
(``M`` = the tokens of one micro-batch), in the training dtype.

Formula of one LoRA training step (frozen base, trainable adapters), ``T`` = batch x sequence
tokens, ``H`` = the LM-head positions (all ``T`` when the logits of every position are
computed; ``batch x logits_to_keep`` when only the target tail is)::

    4 x body_params x T          frozen body: forward 2PT + activation gradient 2PT (no weight grad)
  + 6 x lora_params x T          adapters: forward, activation gradient and weight gradient
  + 4 x head_params x H          frozen (tied) LM head: forward + activation gradient
  + 12 x layers x batch x seq^2 x attn_width   attention scores and values, forward + 2x backward

``body_params`` are the weights of the decoder's linear layers (embeddings and LM head apart),
``head_params`` = vocabulary x hidden size. A full fine-tune would be ``6 x params x T``.
"""

from __future__ import annotations

import time

import torch

FLOPS_FORMULA = ("4*body_params*T + 6*lora_params*T + 4*head_params*H "
                 "+ 12*layers*batch*seq_len^2*attn_width  (T = batch*seq_len tokens; "
                 "H = LM-head positions: T for full logits, batch*logits_to_keep for the target tail)")


def model_shapes(model: torch.nn.Module) -> dict:
    """Linear-layer shapes of a (PEFT-wrapped) causal LM: body, head, LoRA and attention sizes."""
    body: dict[tuple[int, int], int] = {}  # (in, out) -> count
    head = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        shape = (module.in_features, module.out_features)
        if name.endswith("lm_head"):
            head = shape
        else:
            body[shape] = body.get(shape, 0) + 1
    cfg = getattr(model, "config", None)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = getattr(cfg, "head_dim", None) or (
        (getattr(cfg, "hidden_size", 0) or 0) // max(1, heads))
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    return {
        "body_linear_shapes": [[i, o, c] for (i, o), c in sorted(body.items())],
        "body_params": sum(i * o * c for (i, o), c in body.items()),
        "head_params": head[0] * head[1] if head else 0,
        "head_shape": list(head) if head else None,
        "lora_params": int(lora),
        "layers": layers,
        "attn_width": int(heads * head_dim),
    }


def lora_step_flops(shapes: dict, batch: int, seq_len: int, head_positions: int) -> dict:
    """FLOPs of one LoRA training step (see the module docstring); ``head_positions`` per row."""
    tokens = batch * seq_len
    parts = {
        "body": 4 * shapes["body_params"] * tokens,
        "lora": 6 * shapes["lora_params"] * tokens,
        "head": 4 * shapes["head_params"] * batch * head_positions,
        "attention": 12 * shapes["layers"] * batch * seq_len ** 2 * shapes["attn_width"],
    }
    return {"total": sum(parts.values()), **parts}


def gemm_shapes(shapes: dict, tokens: int, head_rows: int | None = None) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the model's frozen GEMMs for ``tokens`` rows (the head: ``head_rows``)."""
    out = [(tokens, i, o, c) for i, o, c in shapes["body_linear_shapes"]]
    if shapes.get("head_shape"):
        i, o = shapes["head_shape"]
        out.append((head_rows or tokens, i, o, 1))
    return out


def measure_gemm_rate(gemms: list[tuple[int, int, int, int]], dtype: torch.dtype,
                      seconds: float = 0.5, device: str = "cpu") -> dict:
    """FLOP/s of ``x @ W.T`` at each shape, and their FLOP-weighted aggregate.

    Each shape runs for about ``seconds`` after one warm-up call; the aggregate is the total
    FLOPs of one pass over all shapes (each ``count`` times) divided by its estimated time.
    """
    per_shape = []
    total_flops = total_time = 0.0
    for m, k, n, count in gemms:
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device)
        torch.nn.functional.linear(x, w)  # warm-up
        reps, start = 0, time.perf_counter()
        while True:
            torch.nn.functional.linear(x, w)
            reps += 1
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        per_call = elapsed / reps
        flops = 2.0 * m * k * n
        per_shape.append({"m": m, "k": k, "n": n, "count": count, "s_per_call": per_call,
                          "flops_per_s": flops / per_call})
        total_flops += flops * count
        total_time += per_call * count
    return {"dtype": str(dtype).replace("torch.", ""), "seconds_per_shape": seconds,
            "flops_per_s": total_flops / total_time if total_time else None, "shapes": per_shape}
