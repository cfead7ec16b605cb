"""Sequential full fine-tuning (SeqFT): every base weight trained through the tasks, no adapter.

The naive lower bound of the continual-learning literature (TRACE, Wang et al. 2023, arXiv
2310.06762, "SeqFT"; EasyCL's "SeqFT"): for tasks t = 1..T in order, with all weights θ,

    θ_t = argmin_θ  L_t(θ)   (AdamW from θ_{t-1}, the engine's schedule),
    L_t(θ) = - 1/|y| Σ_j log p_θ(y_j | x, y_<j)   (target tokens only, as every method).

No memory, no regulariser: it measures how much full fine-tuning forgets. Options: none; the
run's ``lr`` applies (full fine-tuning usually wants a smaller one than LoRA's 3e-4, e.g. 1e-5 to
5e-5; the engine does not change it).

Weights and their files (never pickle):

* across stages: :meth:`SeqFT.stage_state` returns every weight, so each stage folder holds the
  model after that stage as ``method_state.safetensors`` (+ ``method_state.json``: names -> keys),
  sha256-recorded like every stage file. Resume after stage k puts them back
  (:meth:`SeqFT.load_stage_state`), and ``aimm export`` writes them as a full model
  (``save_pretrained``). Size: every parameter once (tied embeddings once): SmolLM2-135M has
  134,515,008, i.e. 538 MB per stage in float32 (269 MB in bfloat16), T stages = T copies.
* within a stage: :meth:`SeqFT.state_dict` puts the weights into the checkpoint beside the
  optimiser state the engine saves (AdamW's two moments: with the weights about 3x the model,
  1.6 GB for SmolLM2 in float32).
* ``adapter.safetensors`` is empty (no LoRA) and there is no ``adapter/`` (``peft_adapter`` False).

dtype policy: the weights are trained in the model's dtype (``dtype``, float32 by default), with
no float32 master copy. With ``dtype=bfloat16`` the AdamW moments are bfloat16 too and an update
smaller than half a bfloat16 step of a weight (0.2-0.4% of its magnitude) is rounded away, so
small learning rates may barely move the model; the run records a warning. Use float32 for
full fine-tuning where memory allows (SmolLM2-135M: 0.5 GB weights + 1.1 GB moments).

Differences from the papers: the engine's schedule and settings (linear warmup/decay, clipping,
``epochs``) instead of each paper's; no early stopping.
"""

from __future__ import annotations

from typing import Any

import torch

from aimm.errors import ModelError
from aimm.methods.base import Method
from aimm.models import unwrap

LOW_PRECISION = (torch.bfloat16, torch.float16)


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, tied ones once (detached views: the caller copies)."""
    return {n: p.detach() for n, p in unwrap(model).named_parameters()}


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``weights`` (:func:`model_weights` of the same architecture) into ``model``."""
    params = dict(unwrap(model).named_parameters())
    if set(params) != set(weights):
        odd = sorted(set(params) ^ set(weights))
        raise ModelError(f"{source}: weights do not fit the model ({len(odd)} names differ, e.g. "
                         f"{odd[0]}); restart the run from this stage")
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise ModelError(f"{source}: weight {name} has shape {tuple(weights[name].shape)}, the "
                             f"model {tuple(p.shape)}; restart the run from this stage")
        p.copy_(weights[name])


class SeqFT(Method):
    """Full fine-tuning through the tasks: all weights trained, no LoRA."""

    name = "seq_ft"
    display_name = "SeqFT"
    color = "#8C564B"  # brown
    description = "full fine-tuning of every weight through the tasks (no adapter)"
    peft_adapter = False

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.model: torch.nn.Module | None = None

    def setup_model(self, bundle, cfg):
        """The base model itself, every weight trainable."""
        bundle.model.requires_grad_(True)
        self.model = bundle.model
        return bundle

    def on_stage_start(self, ctx) -> None:
        self.model = unwrap(ctx.model)
        dtypes = {p.dtype for p in self.model.parameters() if p.requires_grad}
        if dtypes & set(LOW_PRECISION):
            ctx.warnings.append(
                f"seq_ft: weights trained in {', '.join(sorted(str(d) for d in dtypes))} without a "
                "float32 master copy: updates under 0.2-0.4% of a weight are rounded away "
                "(dtype=float32 avoids this)")

    def stage_state(self) -> dict[str, Any]:
        return {"weights": model_weights(self.model)}

    def load_stage_state(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        load_weights(model, state["weights"], "seq_ft stage state")
        self.model = unwrap(model)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": model_weights(self.model)}

    def load_state_dict(self, state: dict[str, Any], ctx) -> None:
        load_weights(ctx.model, state["weights"], "seq_ft checkpoint")
