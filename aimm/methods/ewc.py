"""Online EWC on the LoRA weights: a Fisher-weighted pull back to the previous tasks' solution.

Elastic weight consolidation (Kirkpatrick et al. 2017, arXiv 1612.00796), online form of
Schwarz et al. 2018 (Progress & Compress, arXiv 1805.06370). After task k (its training done,
θ*_k = the LoRA weights then):

* diagonal empirical Fisher ``F_k[i] = 1/N Σ_n (∂ℓ_n/∂θ_i)²`` at θ*_k over N training examples
  of the task (Kirkpatrick et al., Eq. 3's F; ``ℓ_n`` = the example's LM loss, the token-mean
  cross-entropy on its target that training minimises);
* ``F ← γ F + F_k`` (Schwarz et al.'s online EWC: one running Fisher and one anchor instead of
  one penalty per task; :func:`~aimm.methods.functional.update_fisher`), anchor θ* ← θ*_k;
* from task k+1 on every inner micro-batch loss gets ``λ/2 Σ_i F_i (θ_i − θ*_i)²``
  (Kirkpatrick et al., Eq. 3; :func:`~aimm.methods.functional.ewc_penalty`).

Per-EXAMPLE squared gradients (one backward per example, batch 1), not squared micro-batch
gradients: the square of a batch-mean gradient is ``E[g]²``, which drops the per-example variance
``E[g²] − E[g]²`` that the Fisher is made of and shrinks it by up to the batch size (near θ*,
where the mean gradient is ~0, almost to zero). The cost is ``fisher_samples`` forward+backward
passes at batch 1 after every task, with dropout off (the Fisher of the model as evaluated).

Differences from the papers: parameters are the LoRA weights only (the base model is frozen);
the Fisher is the empirical one (observed targets, not labels sampled from the model: Kirkpatrick
et al.'s practice, EasyCL's too); ``fisher_samples`` (default 100, EasyCL's ``ewc_num_samples``)
examples drawn without replacement by a generator seeded from the run seed and the stage.
Defaults λ = 10000 (EasyCL), γ = 1 (plain
accumulation): see :mod:`aimm.methods.functional`. Per-process: every rank computes the same
Fisher on the same examples (not sharded under FSDP).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from aimm.encoding import EncodedExamples
from aimm.errors import ConfigError
from aimm.loss import lm_loss
from aimm.methods import functional as fn
from aimm.methods.base import Method


@dataclass
class EWCOptions:
    ewc_lambda: float = fn.EWC_LAMBDA  # λ: penalty strength (EasyCL's ewc_lambda)
    gamma: float = fn.EWC_GAMMA  # γ: decay of the earlier tasks' Fisher (online EWC)
    fisher_samples: int = 100  # examples per task for the Fisher (EasyCL's ewc_num_samples)

    def validate(self) -> None:
        lam = self.ewc_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"ewc_lambda={lam!r}: must be a finite number >= 0")
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1:
            raise ConfigError(f"gamma={g!r}: must be in [0, 1]")
        n = self.fisher_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"fisher_samples={n!r}: must be an integer >= 1")


class EWC(Method):
    """Online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018): λ/2·Σ F(θ−θ*)² on the LoRA weights."""

    name = "ewc"
    display_name = "EWC"
    color = "#882255"  # wine (Tol's muted palette)
    Options = EWCOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.fisher: dict[str, torch.Tensor] | None = None  # accumulated F (float32)
        self.anchor: dict[str, torch.Tensor] | None = None  # θ* at the last task's end

    def extra_loss(self, ctx, batch: dict) -> torch.Tensor | None:
        if self.fisher is None:  # the first task: nothing to protect yet
            return None
        params = ctx.lora_params()
        self._to_device(next(iter(params.values())).device)
        return fn.ewc_penalty(params, self.anchor, self.fisher, self.options.ewc_lambda)

    def on_stage_end(self, ctx) -> None:
        """F ← γF + F_task at θ* (this task's end), then θ* ← the current LoRA weights."""
        params = ctx.lora_params()
        new = task_fisher(ctx, params, self.options.fisher_samples)
        if self.fisher is not None:
            self._to_device(next(iter(params.values())).device)
        self.fisher = fn.update_fisher(self.fisher, new, self.options.gamma)
        self.anchor = {k: p.detach().clone() for k, p in params.items()}

    def _to_device(self, device: torch.device) -> None:
        for state in (self.fisher, self.anchor):
            for k, v in state.items():
                if v.device != device:
                    state[k] = v.to(device)

    # ---------------------------------------------------------------- across stages
    def stage_state(self) -> dict[str, Any] | None:
        if self.fisher is None:
            return None
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()},
                "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_stage_state(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])


def task_fisher(ctx, params: dict[str, torch.nn.Parameter], samples: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the stage's training examples at the current weights: the mean
    of per-example squared gradients of the LM loss (:func:`~aimm.methods.functional.fisher_diagonal`),
    over ``samples`` examples drawn with a generator seeded from the run seed and the stage."""
    examples = [ex for t in ctx.stage.train_tasks for ex in ctx.data[t].train]
    rng = random.Random(ctx.cfg.seed * 1000 + ctx.stage.index)
    chosen = rng.sample(examples, min(samples, len(examples)))
    cfg = ctx.cfg
    encoded = EncodedExamples.from_texts(
        ctx.tokenizer, [e.input for e in chosen], [e.output for e in chosen],
        is_seq2seq=ctx.is_seq2seq, max_input_len=cfg.max_input_len,
        max_target_len=cfg.max_target_len, truncation=cfg.truncation)
    model = ctx.accelerator.unwrap_model(ctx.model)  # autograd.grad, outside DDP's reducer
    names, tensors = list(params), list(params.values())
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is evaluated

    def per_example():
        for i in range(len(encoded)):
            loss = lm_loss(model, ctx.to_device(encoded.batch([i])), ctx.is_seq2seq)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            yield dict(zip(names, grads))

    try:
        fisher = fn.fisher_diagonal(per_example())
    finally:
        model.train(was_training)
    # a weight no example's loss reaches has Fisher 0 (not a missing name)
    return {k: fisher[k] if k in fisher else torch.zeros_like(p, dtype=torch.float32)
            for k, p in params.items()}


__all__ = ["EWC", "EWCOptions", "task_fisher"]
