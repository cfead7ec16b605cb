"""Which base-model dtype this machine computes fast: the ``dtype: auto`` choice.

bfloat16 halves the frozen base model's memory and, where the hardware has bf16 matrix units
(Intel AMX, AVX512-BF16; a CUDA GPU with bf16), runs the GEMMs faster than float32: the 2-core
AMX machine of ``benchmarks/results/cpu-2core`` did a SmolLM2 LoRA step in 1.9 s in bf16 against
2.5 s in fp32. Without them PyTorch's CPU bf16 GEMM takes a slow path. Measured on 2 idle AVX2
cores (AMD EPYC, no AVX-512, 2026-12-02, ``benchmarks/results/cpu-avx2/dtype_speed.json``): the
frozen GEMMs at 15 GFLOP/s in bf16 against 84 in fp32; a SmolLM2 LoRA training step (batch
4 x 150 tokens) 125.9 s against 4.6 s (27x); label scoring of 20 dbpedia test examples 60.9 s
against 8.9 s (6.8x). On 2 cores with AVX512-BF16 but no AMX (AMD EPYC, 2026-12-07,
``benchmarks/results/cpu-avx512bf16/dtype_speed.json``) bf16 is the faster again: a step 1.27 s
against 2.86 s, the GEMMs at 889 against 201 GFLOP/s.

So ``auto`` means bfloat16 only where the matrix units are known to be there, float32
otherwise. The CPU check reads ``torch.cpu.get_capabilities()`` (cpuinfo): x86 ``amx_bf16`` or
``avx512_bf16`` (both measured); Arm ``bf16`` or ``sve_bf16`` (BFMMLA; not measured here).
"""

from __future__ import annotations

from typing import Mapping

DTYPES = ("float32", "bfloat16")
CHOICES = (*DTYPES, "auto")

#: CPU capability flags (``torch.cpu.get_capabilities()``) with fast bf16 matrix products.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def cpu_capabilities() -> Mapping:
    import torch

    try:
        return torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no cpuinfo mapping, assume nothing
        return {}


def cpu_has_fast_bfloat16(capabilities: Mapping | None = None) -> bool:
    """Whether the CPU has bf16 matrix units (pure given ``capabilities``)."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    return any(bool(caps.get(flag, False)) for flag in FAST_BF16_CPU_FLAGS)


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` for a config's ``device`` (``auto``: cuda when one is visible)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(device: str, *, capabilities: Mapping | None = None,
               cuda_bf16: bool | None = None) -> str:
    """The dtype ``auto`` stands for on ``device`` (a config's ``auto`` / ``cpu`` / ``cuda``)."""
    if device_type(device) == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bfloat16" if cuda_bf16 else "float32"
    return "bfloat16" if cpu_has_fast_bfloat16(capabilities) else "float32"


def slow_bfloat16_warning(dtype: str, device: str, *,
                          capabilities: Mapping | None = None) -> str | None:
    """One line when ``dtype`` bfloat16 runs on a CPU without bf16 matrix units, else None."""
    if dtype != "bfloat16" or device_type(device) != "cpu" or cpu_has_fast_bfloat16(capabilities):
        return None
    return ("dtype=bfloat16 on a CPU without bf16 matrix units (no AMX / AVX512-BF16): training "
            "steps measured ~27x slower than float32 on such cores; use dtype auto or float32")
