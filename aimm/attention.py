"""Attention precision: the ``attention_dtype`` option (a run's config).

``"model"`` (default): attention runs as the model was loaded, transformers' ``sdpa`` kernel in
the base weights' dtype. ``"float32"``: the same ``sdpa`` call (masks, GQA, causal skip, KV
cache unchanged) on float32 copies of query, key and value, the output cast back to the
model's dtype. Nothing changes for a float32 model.

Why: on CPUs PyTorch's flash-attention backward is about twice as slow in bfloat16 as in
float32, so a bf16 model's attention costs more than its GEMMs would suggest. Measured on 2 idle
AVX512-BF16 cores (2026-12-07, ``benchmarks/results/cpu-avx512bf16/``), SmolLM2-135M bf16 +
LoRA at batch 4 x 150: one layer's kernel backward 6.5 ms in bf16 against 3.3 ms in float32
(``attention_dtype.json``); a whole training step of the engine 0.75 s against 0.87 s
(``engine_vs_hf_attention.json``); label scoring the same (1.31 against 1.33 s). float32
attention is also the more precise: one batch's loss lay 0.025 from the float32 model's with it
and 0.125 with bf16 attention (the LoRA gradient 3.1% and 3.4% off, relative norm).

Not the default: it changes a bf16 run's numbers (the release's and this project's committed
studies ran ``"model"``), so it is an option a study opts into. How much, on the CPU study
(``results/study-cpu-avx512bf16-attn32/``): OP per run -0.0015 on average [95% CI -0.0060,
+0.0031] over 12 runs, the same merges; 50.5 min against 54.7. A model whose attention is not
transformers' ``sdpa`` (a flash kernel), and an encoder-decoder model (T5: its relative position
bias takes another route through the kernel), is left as it is, with a warning (shown at the
start, and kept in the run's ``warnings.json``).
"""

from __future__ import annotations

# torch and transformers are imported where used: aimm.config imports this module's names

#: The values of ``RunConfig.attention_dtype``.
ATTENTION_DTYPES = ("model", "float32")

#: The name the float32 attention is registered under with transformers.
FLOAT32_SDPA = "aimm_sdpa_float32"


def sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa`` attention on float32 copies of its inputs; output in the input dtype."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                          attention_mask, **kwargs)
    return out.to(dtype), weights


def _register() -> None:
    """Register :func:`sdpa_in_float32` (and ``sdpa``'s mask builder) under :data:`FLOAT32_SDPA`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_SDPA, sdpa_in_float32)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)


def set_attention_dtype(model: "torch.nn.Module", attention_dtype: str) -> str | None:
    """Apply ``attention_dtype`` to a freshly loaded (not yet PEFT-wrapped) ``model``.

    Returns a warning when ``"float32"`` cannot apply (the model's attention is not ``sdpa``),
    else None."""
    if attention_dtype not in ATTENTION_DTYPES:
        raise ValueError(f"attention_dtype must be one of {ATTENTION_DTYPES}, got {attention_dtype!r}")
    if attention_dtype == "model":
        return None
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == FLOAT32_SDPA:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return (f"attention_dtype 'float32': {type(model).__name__} is an encoder-decoder model, "
                "whose attention (relative position bias) aimm does not re-route; it stays in "
                "the model's dtype")
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return (f"attention_dtype 'float32': {type(model).__name__} runs {current!r} attention, "
                "not transformers' sdpa; its attention stays in the model's dtype")
    _register()
    model.set_attn_implementation(FLOAT32_SDPA)
    return None


def honours_4d_mask(model: "torch.nn.Module") -> bool:
    """Whether ``model``'s attention applies a custom dense (4-D) mask (sdpa, eager and
    :data:`FLOAT32_SDPA` do; flash/flex-style kernels ignore it)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    return impl in ("sdpa", "eager", FLOAT32_SDPA)


__all__ = ["ATTENTION_DTYPES", "FLOAT32_SDPA", "honours_4d_mask", "sdpa_in_float32",
           "set_attention_dtype"]
