"""Cost of one AIMMerging merge's tensor work on a model's LoRA state (``aimm.merging.fusion``).

    python -m benchmarks.merge_ops --model smollm2-135m --repeats 50 --out result.json

One merge (``AIMMerging.merge``) does: ``snapshot`` (theta_k), ``delta`` (delta_in), [rehearsal
steps], ``snapshot`` + ``delta`` (delta_out), ``weighted_fusion``, ``apply_`` and ``l1_norm``.
Each op is timed separately (median over ``--repeats``; CUDA synchronised around each op), as is
the whole sequence, for the ``torch._foreach_*`` implementation of ``aimm.merging.fusion`` and a
naive per-parameter Python loop (``.item()`` per tensor for the L1 norm). The two are run
interleaved, in alternating order, and must give the same values.

``random:*`` shapes are built on the meta device (no weights allocated); only the LoRA tensors
are materialised, with random values.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch

from aimm.merging import fusion
from benchmarks._common import environment, median, ratio, resolve_device, write_json

OPS = ("snapshot", "delta", "weighted_fusion", "apply_", "l1_norm")
W_IN, W_OUT = 0.4, 0.6


# ------------------------------------------------------------------------------ naive reference
def naive_snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def naive_delta(after, before):
    return {k: after[k].detach() - before[k].detach() for k in after}


def naive_weighted_fusion(theta_t, d_in, d_out, w_in, w_out):
    return {k: theta_t[k] + (w_in * d_in[k] + w_out * d_out[k]) for k in theta_t}


def naive_apply_(params, values):
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)


def naive_l1_norm(deltas):
    return float(sum(d.abs().sum().item() for d in deltas.values()))


IMPLS = {
    "foreach": {"snapshot": fusion.snapshot, "delta": fusion.delta,
                "weighted_fusion": fusion.weighted_fusion,
                "apply_": fusion.apply_, "l1_norm": fusion.l1_norm},
    "naive": {"snapshot": naive_snapshot, "delta": naive_delta,
              "weighted_fusion": naive_weighted_fusion, "apply_": naive_apply_,
              "l1_norm": naive_l1_norm},
}


# ------------------------------------------------------------------------------ LoRA state
def lora_state(model: str, device: str, dtype: torch.dtype, r: int, seed: int) -> tuple[dict, str]:
    """Name -> LoRA parameter (float32, random values) of ``model``; and how it was built."""
    from aimm.models import attach_lora, load_model, lora_parameters

    how = "loaded"
    if model.startswith("random:"):
        try:
            with torch.device("meta"):
                bundle = attach_lora(load_model(model, dtype=dtype), r=r)
            how = "meta"
        except Exception:  # noqa: BLE001 - fall back to a real build
            bundle = attach_lora(load_model(model, dtype=dtype), r=r)
    else:
        bundle = attach_lora(load_model(model, dtype=dtype), r=r)
    shapes = {n: (tuple(p.shape), p.dtype if p.dtype.is_floating_point else torch.float32)
              for n, p in lora_parameters(bundle.model).items()}
    del bundle
    gen = torch.Generator().manual_seed(seed)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32)
                                    .to(device=device, dtype=dt if dt != torch.bfloat16 else torch.float32))
              for n, (s, dt) in shapes.items()}
    return params, how


# ------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_merge(impl: dict, params: dict, theta_t: dict, device: str, times: dict) -> dict:
    """The tensor work of one merge, each op timed; returns the values for the equality check."""

    def timed(op: str, fn: Callable, *a):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*a)
        _sync(device)
        times[op].append(time.perf_counter() - t0)
        return out

    total0 = time.perf_counter()
    theta_k = timed("snapshot", impl["snapshot"], params)
    d_in = timed("delta", impl["delta"], theta_k, theta_t)
    # (rehearsal steps would change params here; the second snapshot/delta cost the same)
    theta_o = timed("snapshot", impl["snapshot"], params)
    d_out = timed("delta", impl["delta"], theta_o, theta_k)
    fused = timed("weighted_fusion", impl["weighted_fusion"], theta_t, d_in, d_out, W_IN, W_OUT)
    timed("apply_", impl["apply_"], params, fused)
    l1 = timed("l1_norm", impl["l1_norm"], d_in)
    _sync(device)
    times["merge_total"].append(time.perf_counter() - total0)
    return {"fused": fused, "l1": l1}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="base-model dtype (the LoRA state is float32)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="merge_ops.json")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    t0 = time.perf_counter()
    params, how = lora_state(args.model, device, getattr(torch, args.dtype), args.lora_r, args.seed)
    build_s = time.perf_counter() - t0
    theta_t = {k: v.detach() + 0.01 for k, v in params.items()}
    start = {k: v.detach().clone() for k, v in params.items()}

    # equality of the two implementations on the same inputs
    check = {}
    for name, impl in IMPLS.items():
        with torch.no_grad():
            for k in params:
                params[k].copy_(start[k])
        check[name] = one_merge(impl, params, theta_t, device, {op: [] for op in OPS + ("merge_total",)})
    max_diff = max(float((check["foreach"]["fused"][k] - check["naive"]["fused"][k]).abs().max())
                   for k in params) if params else 0.0
    l1_rel = abs(check["foreach"]["l1"] - check["naive"]["l1"]) / max(1e-30, abs(check["naive"]["l1"]))

    times = {name: {op: [] for op in OPS + ("merge_total",)} for name in IMPLS}
    order = list(IMPLS)
    for i in range(args.warmup + args.repeats):
        for name in (order if i % 2 == 0 else order[::-1]):  # interleaved, alternating order
            scratch = {op: [] for op in OPS + ("merge_total",)}
            one_merge(IMPLS[name], params, theta_t, device, scratch)
            if i >= args.warmup:
                for op, v in scratch.items():
                    times[name][op].extend(v)

    n_params = sum(p.numel() for p in params.values())
    result = {
        "benchmark": "merge_ops",
        "environment": environment(device, model=args.model, dtype=args.dtype),
        "model": args.model, "dtype": args.dtype, "device": device, "lora_dtype": "float32",
        "lora_r": args.lora_r, "built_on": how, "build_s": round(build_s, 2),
        "n_tensors": len(params), "n_params": n_params, "bytes": n_params * 4,
        "repeats": args.repeats, "warmup": args.warmup,
        "max_abs_diff_fused": max_diff, "l1_rel_diff": l1_rel,
        # snapshot and delta run twice per merge: their medians are per call
        "median_s": {name: {op: median(v) for op, v in t.items()} for name, t in times.items()},
        "min_s": {name: {op: min(v) if v else None for op, v in t.items()} for name, t in times.items()},
        "ratio_naive_over_foreach": {op: ratio(median(times["naive"][op]), median(times["foreach"][op]))
                                     for op in OPS + ("merge_total",)},
    }
    write_json(args.out, result)
    print(f"merge_ops {args.model} on {device}: {len(params)} LoRA tensors, {n_params:,} params")
    print(f"{'op':<17}{'foreach_us':>12}{'naive_us':>12}{'naive/foreach':>15}")
    for op in OPS + ("merge_total",):
        a, b = result["median_s"]["foreach"][op], result["median_s"]["naive"][op]
        print(f"{op:<17}{a * 1e6:12.1f}{b * 1e6:12.1f}{result['ratio_naive_over_foreach'][op]:15.2f}")
    return result


if __name__ == "__main__":
    main()
