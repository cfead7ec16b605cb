"""Continual merging of task vectors: pure tensor functions (issue #16).

A *task vector* is a dict ``name -> tensor``: for LoRA, ``ΔW = scaling * B @ A`` per
module (:func:`lora_delta`, :func:`lora_deltas`). Every function returns new tensors
and leaves its inputs alone. The continual form, what a method calls after each task,
takes the running merged task vector and the new one, plus plain state (a count, a
float, a list of floats) that the caller keeps and saves:

* ``task_arithmetic_step(merged, new, scaling)``; ``magmax_step(running, new)``;
  ``weight_average(running, new, count)``; ``opcm_step(merged, new, prev_lambda=...,
  task_norms=...)`` (after ``opcm_init(first)``);
* TIES / DARE merge a list, so their continual form is ``ties([merged, new], ...)``.

TIES, DARE and task arithmetic call PEFT's ``peft.utils.merge_utils`` per tensor.

Fidelity notes (differences from papers / releases):

* TIES (Yadav et al. 2023, arXiv 2306.01708): PEFT keeps the top ``density`` share of
  each tensor (the paper's release: of the whole flattened model) and its disjoint merge
  is a mean over sign-agreeing entries (the paper's; FusionBench's continual TIES uses a
  sum). Defaults: ``density=0.2`` (top-20 %) and ``scaling=1.0``, the paper's. FusionBench's
  continual TIES adds ``scaling * TIES(merged, new)`` to the merged model (so the merged
  vector is counted again each step); ``ties([merged, new])`` here *replaces* it.
* DARE (Yu et al. 2023, arXiv 2311.03099): PEFT drops with ``torch.bernoulli`` on the
  global RNG; ``seed`` runs it in a forked RNG seeded with ``seed`` (global RNG untouched).
  ``density=0.1`` (drop rate 0.9, the paper's headline setting) is our default.
* Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): the paper picks ``scaling`` on
  validation data; the default 0.3 is FusionBench's continual task arithmetic.
* MagMax (Marczak et al. 2024, arXiv 2407.06322): ties go to the later vector (``>=``,
  as the release). The selection is returned unscaled; the method applies its scaling.
* OPCM (Tang et al. 2025, arXiv 2501.09522): see :func:`opcm_step`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
from peft.utils import merge_utils as pmu

from aimm.errors import ConfigError

__all__ = [
    "lora_delta", "lora_deltas", "task_vector_norm", "task_arithmetic", "task_arithmetic_step",
    "ties", "dare_linear", "dare_ties", "magmax", "magmax_step", "weight_average",
    "opcm_split_rank", "opcm_project", "opcm_init", "opcm_step",
]

Tensors = Mapping[str, torch.Tensor]
SignMethod = Literal["total", "frequency"]


def _keys(vectors: Sequence[Tensors], what: str = "vectors") -> list[str]:
    if len(vectors) == 0:
        raise ConfigError(f"{what}: need at least one task vector")
    keys = list(vectors[0])
    for i, v in enumerate(vectors[1:], 1):
        if set(v) != set(keys):
            diff = sorted(set(v) ^ set(keys))[:5]
            raise ConfigError(f"{what}[{i}]: names differ from {what}[0] ({diff}); give every task vector the same names")
        for k in keys:
            if v[k].shape != vectors[0][k].shape:
                raise ConfigError(f"{what}[{i}][{k!r}]: shape {tuple(v[k].shape)} != {tuple(vectors[0][k].shape)}")
    return keys


def _check_density(density: float, *, allow_zero: bool) -> None:
    ok = (0.0 <= density <= 1.0) if allow_zero else (0.0 < density <= 1.0)
    if not ok:
        raise ConfigError(f"density: must be in {'[0, 1]' if allow_zero else '(0, 1]'}, got {density!r}")


def _weights(scaling: float, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), float(scaling), dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------------- LoRA deltas
def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``ΔW = scaling * B @ A`` for one LoRA module (``A``: r x in, ``B``: out x r).

    ``scaling`` is PEFT's ``lora_alpha / r``. Conv1D's ``fan_in_fan_out`` transpose is not
    applied (the caller transposes).
    """
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ConfigError(f"lora_delta: A {tuple(A.shape)} and B {tuple(B.shape)} are not r x in and out x r")
    return (B.detach() @ A.detach()) * scaling


def lora_deltas(params: Tensors, scaling: Union[float, Mapping[str, float]] = 1.0) -> dict[str, torch.Tensor]:
    """``module -> ΔW`` from PEFT parameter names (``<module>.lora_A.<adapter>.weight`` pairs).

    ``scaling``: one float, or ``module -> float`` (PEFT's ``lora_alpha / r`` per module).
    """
    out: dict[str, torch.Tensor] = {}
    for name, a in params.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.", 1)
        if b_name not in params:
            raise ConfigError(f"lora_deltas: {name!r} has no partner {b_name!r}")
        s = scaling[module] if isinstance(scaling, Mapping) else scaling
        out[module] = lora_delta(a, params[b_name], s)
    return out


def task_vector_norm(vector: Tensors) -> float:
    """Frobenius norm of the whole task vector (all tensors as one vector), a float."""
    ts = [t.detach() for t in vector.values()]
    if not ts:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])))


# ------------------------------------------------------------------- PEFT-based merges
def task_arithmetic(vectors: Sequence[Tensors], scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): ``τ = λ Σ_t τ_t``."""
    keys = _keys(vectors)
    return {k: pmu.task_arithmetic([v[k].detach() for v in vectors], _weights(scaling, len(vectors), vectors[0][k]))
            for k in keys}


def task_arithmetic_step(merged: Tensors, new: Tensors, scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Continual task arithmetic: ``merged + λ τ_new`` (``merged`` starts at zero)."""
    keys = _keys([merged, new], "merged/new")
    out = torch._foreach_add([merged[k].detach() for k in keys], [new[k].detach() for k in keys], alpha=scaling)
    return dict(zip(keys, out))


def ties(vectors: Sequence[Tensors], density: float = 0.2, majority_sign_method: SignMethod = "total",
         scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708, Alg. 1) via ``peft...merge_utils.ties``.

    Trim to the top-``density`` magnitudes, elect the sign (``"total"``: sign of the sum,
    the paper's), disjoint mean of the agreeing entries, times ``scaling`` (λ).
    """
    _check_density(density, allow_zero=True)
    keys = _keys(vectors)
    return {k: pmu.ties([v[k].detach() for v in vectors], _weights(scaling, len(vectors), vectors[0][k]),
                        density, majority_sign_method) for k in keys}


@contextmanager
def _seeded(seed: Optional[int], like: torch.Tensor) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [like.device.index or 0] if like.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def dare_linear(vectors: Sequence[Tensors], density: float = 0.1, scaling: float = 1.0,
                seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """DARE (Yu et al. 2023, arXiv 2311.03099) + linear sum, via ``merge_utils.dare_linear``.

    Each entry kept with probability ``density`` and rescaled by ``1/density``; then
    ``λ Σ_t``. Names are processed in the order of ``vectors[0]``, one RNG stream.
    """
    _check_density(density, allow_zero=False)
    keys = _keys(vectors)
    with _seeded(seed, vectors[0][keys[0]]):
        return {k: pmu.dare_linear([v[k].detach() for v in vectors], _weights(scaling, len(vectors), vectors[0][k]),
                                   density) for k in keys}


def dare_ties(vectors: Sequence[Tensors], density: float = 0.1, majority_sign_method: SignMethod = "total",
              scaling: float = 1.0, seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """DARE drop-and-rescale, then TIES sign election + disjoint mean (``merge_utils.dare_ties``)."""
    _check_density(density, allow_zero=False)
    keys = _keys(vectors)
    with _seeded(seed, vectors[0][keys[0]]):
        return {k: pmu.dare_ties([v[k].detach() for v in vectors], _weights(scaling, len(vectors), vectors[0][k]),
                                 density, majority_sign_method) for k in keys}


# --------------------------------------------------------------------------- MagMax
def magmax_step(running: Tensors, new: Tensors) -> dict[str, torch.Tensor]:
    """One MagMax fold: per entry, ``new`` where ``|new| >= |running|`` else ``running``."""
    keys = _keys([running, new], "running/new")
    return {k: torch.where(new[k].detach().abs() >= running[k].detach().abs(), new[k].detach(), running[k].detach())
            for k in keys}


def magmax(vectors: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """MagMax (Marczak et al. 2024, arXiv 2407.06322): ``τ[j] = τ_{t*}[j]``,
    ``t* = argmax_t |τ_t[j]|`` (sign kept; ties: the later task, as the release)."""
    keys = _keys(vectors)
    out = {k: vectors[0][k].detach().clone() for k in keys}
    for v in vectors[1:]:
        out = magmax_step(out, v)
    return out


def weight_average(running: Tensors, new: Tensors, count: int) -> dict[str, torch.Tensor]:
    """Running mean of task models (Wortsman et al. 2022, arXiv 2203.05482, uniform soup):
    ``(running * count + new) / (count + 1)``, ``count`` = models already in ``running``
    (FusionBench's continual weight average formula)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"count: must be an int >= 0 (models already averaged), got {count!r}")
    keys = _keys([running, new], "running/new")
    return {k: (running[k].detach() * count + new[k].detach()) / (count + 1) for k in keys}


# ----------------------------------------------------------------------------- OPCM
def opcm_split_rank(s: torch.Tensor, alpha: float) -> int:
    """The release's split rank: first 0-based index with ``cumsum(s) / sum(s) > alpha``.

    Used as a count, so it protects one direction fewer than "the smallest k whose
    cumulative share exceeds alpha"; ``alpha >= 1`` or ``s == 0`` give 0.
    """
    return int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item())


def opcm_project(merged_tv: torch.Tensor, task_tv: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """OPCM's projection of ``task_tv`` against the SVD basis of ``merged_tv`` (one 2-D module).

    ``U Σ Vᵀ = merged_tv`` (full SVD); ``P = Uᵀ τ V``; ``P_ii = 0`` for all i;
    ``P[:r, :r] = 0`` with ``r = opcm_split_rank(Σ, alpha)``; returns ``U P Vᵀ``. The result
    is Frobenius-orthogonal to ``u_i v_jᵀ`` (i, j < r) and to every ``u_i v_iᵀ``, hence to
    ``merged_tv``. Tensors that are not 2-D are returned unchanged (the release's
    "other parameters"). Low-precision inputs are computed in float32.
    """
    if merged_tv.dim() != 2:
        return task_tv.detach().clone()
    dtype = task_tv.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    m, t = merged_tv.detach().to(work), task_tv.detach().to(work)
    u, s, vh = torch.linalg.svd(m, full_matrices=True, driver="gesvd" if m.is_cuda else None)
    v = vh.T
    r = opcm_split_rank(s, alpha)
    p = u.T @ t @ v
    p.diagonal().fill_(0)
    p[:r, :r] = 0
    return (u @ p @ v.T).to(dtype)


def opcm_init(first: Tensors) -> tuple[dict[str, torch.Tensor], float, list[float]]:
    """OPCM state after the first task: ``(merged = τ_1, λ_1 = 1, task_norms = [‖τ_1‖])``."""
    _keys([first], "first")
    return {k: t.detach().clone() for k, t in first.items()}, 1.0, [task_vector_norm(first)]


def opcm_step(merged: Tensors, new: Tensors, *, prev_lambda: float, task_norms: Sequence[float],
              alpha: float = 0.5) -> tuple[dict[str, torch.Tensor], float, list[float]]:
    """One OPCM merge (Tang et al. 2025, arXiv 2501.09522), transcribed from FusionBench's
    release (``method/opcm/opcm.py``; ``opcm_general.py`` and ``flan_t5_opcm.py`` are the same).

    ``S = λ_{t-1} τ_merged + Σ_modules P(τ_t)`` (:func:`opcm_project` per 2-D tensor, others
    added as they are); ``n̄ = mean(‖τ_1‖, ..., ‖τ_t‖)``; ``λ_t = ‖S‖ / n̄``;
    ``τ_merged' = S / λ_t`` (so ``‖τ_merged'‖ = n̄``). Norms are over the whole task vector.

    Returns ``(merged', λ_t, task_norms + [‖τ_t‖])``; keep the last two for the next step.
    Differences: the release works on full fine-tuned weights (CLIP/Flan-T5), we on LoRA
    ΔW; α has no paper default we could verify (0.5 in FusionBench's docs/config); a zero
    ``S`` gives zeros and ``λ_t = 0`` (the release divides by zero). See the module and
    :func:`opcm_split_rank` / :func:`opcm_project` docstrings for the release's quirks.
    """
    if not (0.0 <= alpha <= 1.0):
        raise ConfigError(f"alpha: must be in [0, 1], got {alpha!r}")
    keys = _keys([merged, new], "merged/new")
    norms = [float(x) for x in task_norms] + [task_vector_norm(new)]
    avg = sum(norms) / len(norms)
    summed = {k: prev_lambda * merged[k].detach() + opcm_project(merged[k], new[k], alpha) for k in keys}
    n = task_vector_norm(summed)
    if n == 0.0:
        return summed, 0.0, norms
    lam = n / avg
    return {k: summed[k] * (avg / n) for k in keys}, lam, norms
