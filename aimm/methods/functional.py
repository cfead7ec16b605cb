"""Training-time continual-learning math as pure tensor functions (issue #16).

Avalanche ``evaluation/functional.py`` style: no state, no modules; dicts ``name ->
tensor`` in, new tensors out (a trailing ``_`` marks the one in-place helper). The
method plug-ins keep the state (Fisher, anchors, reference gradients, old adapters).

Fidelity notes (differences from papers / releases, and where defaults come from):

* EWC (Kirkpatrick et al. 2017, arXiv 1612.00796, Eq. 3) penalty ``λ/2 Σ F (θ-θ*)²``;
  online accumulation ``F ← γ F + F_new`` (Schwarz et al. 2018, Progress & Compress,
  arXiv 1805.06370). Default ``λ = 10000`` is EasyCL's EWC config (``ewc_lambda``);
  EasyCL's penalty has no ``1/2`` and it *replaces* the Fisher each task (γ = 0) and
  averages squared batch gradients over samples, not batches. Default ``γ = 1`` (plain
  accumulation): the online-EWC paper tunes γ ≤ 1 and gives no single value.
* A-GEM (Chaudhry et al. 2019, arXiv 1812.00420), over all tensors as one flat vector.
* LwF (Li & Hoiem 2016, arXiv 1606.09282): the paper's distillation loss is the
  cross-entropy to the old model's temperature-T probabilities (T = 2); we use the KL
  divergence (same gradient, zero at equality) with Hinton et al.'s ``T²`` factor
  (arXiv 1503.02531) so its scale does not depend on T.
* O-LoRA (Wang et al. 2023, arXiv 2310.14152), as the release (cmnfriend/O-LoRA,
  ``src/uie_trainer_lora.py``): ``Σ_modules |A_old A_newᵀ|.sum()`` where the release's
  frozen ``lora_A`` stacks all earlier A's (= the sum over old adapters here), and the L2 term ``Σ_tensors ‖θ_new‖₂`` over the
  new A and B, *not squared* (``squared=True`` gives ``Σ ‖θ‖²``). Defaults λ₁ = 0.5,
  λ₂ = 0 (the release's scripts).
"""

from __future__ import annotations

from typing import Iterable, Mapping, MutableMapping, Optional, Sequence

import torch
import torch.nn.functional as F

from aimm.errors import ConfigError

__all__ = [
    "add_squared_grads_", "fisher_diagonal", "update_fisher", "ewc_penalty", "ewc_penalty_grad",
    "dot", "agem_project", "lwf_loss", "olora_orthogonality_loss", "olora_l2_loss", "olora_loss",
]

Tensors = Mapping[str, torch.Tensor]

EWC_LAMBDA = 10000.0
EWC_GAMMA = 1.0
LWF_TEMPERATURE = 2.0
OLORA_LAMBDA_1 = 0.5
OLORA_LAMBDA_2 = 0.0


def _same_keys(name_a: str, a: Mapping, name_b: str, b: Mapping) -> list[str]:
    keys = list(a)
    if set(keys) != set(b):
        raise ConfigError(f"{name_a} and {name_b} have different names: "
                          f"{sorted(set(keys) ^ set(b))[:5]}; pass matching dicts")
    return keys


# ----------------------------------------------------------------------------- EWC
def add_squared_grads_(acc: MutableMapping[str, torch.Tensor], grads: Mapping[str, Optional[torch.Tensor]]) -> None:
    """``acc[name] += grad²`` in place (``None`` gradients skipped; missing names start at 0)."""
    for k, g in grads.items():
        if g is None:
            continue
        sq = g.detach().float().pow(2)
        if k in acc:
            acc[k].add_(sq)
        else:
            acc[k] = sq.clone()


def fisher_diagonal(grad_batches: Iterable[Mapping[str, Optional[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: the mean over batches of the squared (batch-mean) gradients.

    Each item is one batch's ``name -> grad`` (of the task loss at θ*), e.g.
    ``{n: p.grad for n, p in model.named_parameters() if p.requires_grad}``. Float32.
    """
    acc: dict[str, torch.Tensor] = {}
    n = 0
    for grads in grad_batches:
        add_squared_grads_(acc, grads)
        n += 1
    if n == 0:
        raise ConfigError("fisher_diagonal: grad_batches is empty; give at least one batch of gradients")
    return {k: v / n for k, v in acc.items()}


def update_fisher(old: Optional[Tensors], new: Tensors, gamma: float = EWC_GAMMA) -> dict[str, torch.Tensor]:
    """Online-EWC accumulation ``F ← γ F_old + F_new`` (Schwarz et al. 2018); ``old=None`` gives ``F_new``."""
    if not (0.0 <= gamma <= 1.0):
        raise ConfigError(f"gamma: must be in [0, 1], got {gamma!r}")
    if old is None:
        return {k: v.detach().clone() for k, v in new.items()}
    keys = _same_keys("old", old, "new", new)
    return {k: gamma * old[k].detach() + new[k].detach() for k in keys}


def ewc_penalty(params: Tensors, anchor: Tensors, fisher: Tensors, lam: float = EWC_LAMBDA) -> torch.Tensor:
    """EWC penalty ``λ/2 Σ_i F_i (θ_i - θ*_i)²`` (Kirkpatrick et al. 2017, Eq. 3), differentiable in ``params``.

    Only the names in ``fisher`` are penalised; each must be in ``params`` and ``anchor``.
    """
    missing = [k for k in fisher if k not in params or k not in anchor]
    if missing:
        raise ConfigError(f"ewc_penalty: fisher names not in params/anchor: {missing[:5]}")
    terms = [(fisher[k] * (params[k] - anchor[k].detach()).pow(2)).sum() for k in fisher]
    if not terms:
        return torch.zeros(())
    return 0.5 * lam * torch.stack(terms).sum()


def ewc_penalty_grad(params: Tensors, anchor: Tensors, fisher: Tensors, lam: float = EWC_LAMBDA) -> dict[str, torch.Tensor]:
    """Closed-form gradient of :func:`ewc_penalty`: ``λ F (θ - θ*)`` per name."""
    return {k: lam * fisher[k] * (params[k].detach() - anchor[k].detach()) for k in fisher}


# ---------------------------------------------------------------------------- A-GEM
def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """``Σ_names <a, b>`` over all tensors as one flat vector (float64 accumulation)."""
    keys = _same_keys("a", a, "b", b)
    if not keys:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([(a[k].detach().double() * b[k].detach().double()).sum() for k in keys]).sum()


def agem_project(grads: Tensors, ref_grads: Tensors) -> tuple[dict[str, torch.Tensor], bool]:
    """A-GEM (Chaudhry et al. 2019): ``g̃ = g - (gᵀg_ref / g_refᵀg_ref) g_ref`` if ``gᵀg_ref < 0``.

    ``grads``: the current gradient; ``ref_grads``: the gradient on a memory-buffer batch
    (same names). Returns ``(g̃, projected)``; ``g̃ = g`` (copies) when no projection is
    needed or ``g_ref = 0``. After projection ``g̃ᵀg_ref = 0`` up to rounding.
    """
    keys = _same_keys("grads", grads, "ref_grads", ref_grads)
    g_dot_r = dot(grads, ref_grads)
    r_dot_r = dot(ref_grads, ref_grads)
    if not (g_dot_r < 0) or r_dot_r == 0:
        return {k: grads[k].detach().clone() for k in keys}, False
    coef = (g_dot_r / r_dot_r).item()
    return {k: grads[k].detach() - coef * ref_grads[k].detach().to(grads[k].dtype) for k in keys}, True


# ------------------------------------------------------------------------------ LwF
def lwf_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
             temperature: float = LWF_TEMPERATURE) -> torch.Tensor:
    """LwF distillation: ``T² · mean_{masked positions} KL(softmax(z_old/T) ‖ softmax(z/T))``.

    ``student_logits``/``teacher_logits``: ``(..., vocab)``, the same positions (for a causal
    LM the rows that predict target tokens); ``mask``: bool ``(...)`` selecting them (None:
    all). The teacher is detached. No selected position gives 0 (still in the graph).
    """
    if temperature <= 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"lwf_loss: student {tuple(student_logits.shape)} and teacher "
                          f"{tuple(teacher_logits.shape)} logits differ in shape")
    s = student_logits.float().reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ConfigError(f"lwf_loss: mask {tuple(mask.shape)} != logits positions {tuple(student_logits.shape[:-1])}")
        sel = mask.reshape(-1).bool()
        s, t = s[sel], t[sel]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / s.shape[0]
    return kl * temperature ** 2


# ---------------------------------------------------------------------------- O-LoRA
def olora_orthogonality_loss(new_A: Tensors, old_A: Sequence[Tensors]) -> torch.Tensor:
    """O-LoRA orthogonality loss ``Σ_modules Σ_old Σ_ij |(A_old A_newᵀ)_ij|`` (Wang et al. 2023).

    ``new_A``: module -> the current task's A (r x in); ``old_A``: one such dict per earlier
    adapter (frozen, detached). Zero when every new row is orthogonal to every old row.
    """
    terms = []
    for i, old in enumerate(old_A):
        keys = _same_keys("new_A", new_A, f"old_A[{i}]", old)
        terms += [torch.abs(old[k].detach() @ new_A[k].T).sum() for k in keys]
    if not terms:
        ref = next(iter(new_A.values()), None)
        return ref.sum() * 0.0 if ref is not None else torch.zeros(())
    return torch.stack(terms).sum()


def olora_l2_loss(new_params: Tensors, squared: bool = False) -> torch.Tensor:
    """O-LoRA's L2 term over the new adapter's A and B: ``Σ ‖θ‖₂`` (release) or ``Σ ‖θ‖²``."""
    terms = [p.pow(2).sum() if squared else torch.linalg.vector_norm(p) for p in new_params.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def olora_loss(new_A: Tensors, old_A: Sequence[Tensors], new_params: Optional[Tensors] = None,
               lambda_1: float = OLORA_LAMBDA_1, lambda_2: float = OLORA_LAMBDA_2,
               squared: bool = False) -> torch.Tensor:
    """O-LoRA regulariser added to the task loss: ``λ₁ L_orth + λ₂ L_2`` (release defaults 0.5, 0).

    ``new_params`` (new A and B) is needed only when ``lambda_2 != 0``.
    """
    loss = lambda_1 * olora_orthogonality_loss(new_A, old_A)
    if lambda_2:
        if new_params is None:
            raise ConfigError("olora_loss: lambda_2 != 0 needs new_params (the new adapter's A and B)")
        loss = loss + lambda_2 * olora_l2_loss(new_params, squared)
    return loss
