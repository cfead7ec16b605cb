"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning", EMNLP Findings 2023, arXiv 2310.14152; release cmnfriend/O-LoRA).

IncLoRA's adapter stack (:class:`~aimm.methods.incremental_lora.IncLoRA`: a new LoRA per task,
the earlier ones frozen and summed into the forward) plus, on every inner micro-batch, the loss

    L = L_task + λ₁ Σ_modules Σ_{i<t} Σ_jk |(A_i A_tᵀ)_jk| + λ₂ Σ_{θ ∈ {A_t, B_t} per module} ‖θ‖₂

(the paper's §3: the orthogonality loss keeps the new task's LoRA subspace, spanned by the rows
of A_t, orthogonal to the earlier tasks' subspaces, the rows of the frozen A_i). The math is
:func:`aimm.methods.functional.olora_loss` in the release's form (``src/uie_trainer_lora.py``):
the release's frozen ``lora_A`` stacks every earlier A along the rank, so its
``|lora_A · loranew_Aᵀ|.sum()`` is the sum over old adapters here; its L2 term is the
*un-squared* Frobenius norm of each new A and B tensor, summed. For the first task there is no
earlier A (the release's stacked ``lora_A`` then has rank 0), so only the λ₂ term can be
non-zero. Defaults λ₁ 0.5, λ₂ 0: the release's scripts.

Differences from the paper / release: the loss is the release's (absolute values, un-squared
norms: :mod:`aimm.methods.functional` states it), which may differ from the paper's notation;
the release's hyper-parameters (T5 / LLaMA, its lr and epochs) are not copied, the run's settings
apply; each old adapter has its own dropout mask (see IncLoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aimm.errors import ConfigError
from aimm.methods.functional import OLORA_LAMBDA_1, OLORA_LAMBDA_2, olora_loss
from aimm.methods.incremental_lora import CURRENT, OLD, IncLoRA


@dataclass
class OLoRAOptions:
    lambda_1: float = OLORA_LAMBDA_1  # weight of the orthogonality loss (release scripts: 0.5)
    lambda_2: float = OLORA_LAMBDA_2  # weight of the L2 term on the new adapter (release: 0)

    def validate(self) -> None:
        for name in ("lambda_1", "lambda_2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be a finite number >= 0 "
                                  f"(release default {getattr(OLoRAOptions, name)})")


class OLoRA(IncLoRA):
    """IncLoRA plus O-LoRA's loss keeping each new A orthogonal to the frozen earlier A's."""

    name = "olora"
    display_name = "O-LoRA"
    color = "#AA4499"  # purple (Tol)
    first_stage_as = None  # lambda_2 > 0 changes the first task's loss too
    Options = OLoRAOptions

    def extra_loss(self, ctx, batch) -> torch.Tensor | None:
        """λ₁ · orthogonality + λ₂ · L2 of the new adapter; ``None`` while both are 0."""
        o = self.options
        use_orth = bool(o.lambda_1 and self.n_old)
        if not (use_orth or o.lambda_2):
            return None
        new_A = {m: layer.lora_A[CURRENT].weight for m, layer in self.layers.items()}
        old_A = [{m: layer.lora_A[OLD.format(i)].weight for m, layer in self.layers.items()}
                 for i in range(1, self.n_old + 1)] if use_orth else []
        new_params = None
        if o.lambda_2:
            new_params = {f"{m}.{part}": getattr(layer, part)[CURRENT].weight
                          for m, layer in self.layers.items() for part in ("lora_A", "lora_B")}
        return olora_loss(new_A, old_A, new_params, lambda_1=o.lambda_1, lambda_2=o.lambda_2)
