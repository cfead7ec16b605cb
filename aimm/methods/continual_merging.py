"""Continual merging of LoRA task vectors (issue #16): task arithmetic, TIES, DARE, MagMax, OPCM,
weight averaging, on the hooks of :class:`~aimm.methods.base.Method`.

Protocol (every method here but MagMax):

1. *a fresh LoRA per task*: at each stage start (:meth:`ContinualMerging.on_stage_start`) every
   LoRA is reset to PEFT's initialisation (A: PEFT's ``init_lora_weights``, B = 0), drawn from a
   forked RNG seeded ``seed + 1000 * stage`` (the engine's stage seed), and trained from the
   pretrained weights ``θ0``: the merged model is **not** in the model while a task trains;
2. after the task (:meth:`~ContinualMerging.on_stage_end`) its task vector is
   ``τ_t = ΔW_t = scaling * B_t @ A_t`` per LoRA target module (``scaling = lora_alpha / r``),
   and the running merged vector is updated with the method's pure function of
   :mod:`aimm.merging.continual`: ``M_t = f(M_{t-1}, τ_t)``;
3. the model that is evaluated is ``θ0 + M_t``: the LoRA is disabled and ``M_t`` is added to the
   target modules' outputs as a frozen float32 term (:class:`~aimm.methods.merged_delta.MergedDelta`;
   never added into the possibly-bfloat16 base weights). The scores matrix therefore means what
   it means for every other method: the one model after task t, on tasks 1..t.

MagMax (Marczak et al. 2024, arXiv 2407.06322) follows its paper instead: *sequential*
fine-tuning, so the LoRA is not reset and continues from the previous task's trained LoRA (the
sequential model is ``θ_t = θ0 + ΔW(LoRA after task t)``, trained with the merged delta off);
its task vectors are ``τ_t = θ_t − θ0 = ΔW(LoRA after task t)`` (cumulative, not per-task
increments), and the evaluated model is ``θ0 + λ · MagMax(τ_1..τ_t)``.

Cross-stage state (:meth:`~ContinualMerging.stage_state`, safetensors + JSON): the running vector,
the number of merged tasks and the method's scalars (OPCM's λ and task norms); a resumed run
continues as an uninterrupted one. The stage's ``adapter.safetensors`` / ``adapter/`` hold only
the task's LoRA, which is *not* the evaluated model (``adapter_is_model = False``);
``aimm export`` writes ``θ0 + M_t`` from the stage's method state
(:meth:`~ContinualMerging.evaluated_delta`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from aimm.config import MAX_SEED
from aimm.errors import ConfigError
from aimm.merging import continual as cm
from aimm.methods.base import Method
from aimm.methods.merged_delta import MergedDelta, task_vector, use_merged
from aimm.models import reset_lora

Vector = dict[str, torch.Tensor]
SIGN_METHODS = ("total", "frequency")


# ------------------------------------------------------------------------------ options
def _number(name: str, value: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    """``value`` a finite real number in the range (one ConfigError line otherwise)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        span = ("a finite number" if low is None and high is None else
                f"a number in {'(' if low_open else '['}{low}, {high if high is not None else 'inf'}"
                f"{']' if high is not None else ')'}")
        raise ConfigError(f"{name}={value!r}: must be {span}")


def _seed(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                              or value > MAX_SEED):
        raise ConfigError(f"seed={value!r}: must be an integer in [0, {MAX_SEED}] (or null: the "
                          "run's seed)")


def _sign(value: Any) -> None:
    if value not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={value!r}: choose {' or '.join(SIGN_METHODS)}")


@dataclass
class ScalingOptions:
    scaling: float = 0.3  # λ; FusionBench's continual task arithmetic

    def validate(self) -> None:
        _number("scaling", self.scaling)


@dataclass
class TiesOptions:
    density: float = 0.2  # top-20 % kept (the paper's k)
    majority_sign_method: str = "total"  # the paper's: sign of the sum
    scaling: float = 1.0  # λ (the paper's)

    def validate(self) -> None:
        _number("density", self.density, 0.0, 1.0)
        _sign(self.majority_sign_method)
        _number("scaling", self.scaling)


@dataclass
class DareLinearOptions:
    density: float = 0.1  # keep probability; drop rate 0.9 (the paper's headline setting)
    scaling: float = 1.0
    seed: int | None = None  # None: the run's seed; the drop of task t uses seed + 1000 * stage

    def validate(self) -> None:
        _number("density", self.density, 0.0, 1.0, low_open=True)
        _number("scaling", self.scaling)
        _seed(self.seed)


@dataclass
class DareTiesOptions(DareLinearOptions):
    majority_sign_method: str = "total"

    def validate(self) -> None:
        super().validate()
        _sign(self.majority_sign_method)


@dataclass
class MagMaxOptions:
    scaling: float = 0.5  # λ of the release's 8-dataset script (FusionBench's default)

    def validate(self) -> None:
        _number("scaling", self.scaling)


@dataclass
class OPCMOptions:
    alpha: float = 0.5  # share of the merged vector's singular-value mass kept out of reach

    def validate(self) -> None:
        _number("alpha", self.alpha, 0.0, 1.0)


# ------------------------------------------------------------------------------ base class
class ContinualMerging(Method):
    """A fresh LoRA per task from ``θ0``; after each task ``M_t = f(M_{t-1}, τ_t)``; evaluated:
    ``θ0 + M_t`` (see the module docstring). Subclasses supply :meth:`fold`."""

    adapter_is_model = False  # the stage adapter is task t's LoRA; the model is θ0 + M_t
    continues_lora: ClassVar[bool] = False  # True: sequential fine-tuning (MagMax)

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.vector: Vector = {}  # the running vector the fold keeps (empty before task 1)
        self.tasks = 0  # task vectors folded in
        self.delta = MergedDelta()

    # ------------------------------------------------------------ what a subclass defines
    def fold(self, new: Vector, stage_index: int, run_seed: int) -> Vector:
        """The running vector after task ``self.tasks + 1`` from ``self.vector`` and ``new``."""
        raise NotImplementedError

    def evaluated(self, vector: Vector) -> Vector:
        """The ``ΔW`` of the evaluated model from the running vector (default: itself)."""
        return vector

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------ hooks
    def on_stage_start(self, ctx) -> None:
        """Training mode: ``θ0 + LoRA``, the merged delta off; a fresh LoRA unless sequential."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        if not self.continues_lora:
            reset_lora(model, ctx.cfg.seed + 1000 * ctx.stage.index)
        use_merged(model, self.delta, on=False)

    def add_task(self, new: Vector, stage_index: int, run_seed: int) -> Vector:
        """Fold task vector ``new`` (of stage ``stage_index``) in; returns the evaluated ``ΔW``."""
        self.vector = self.fold(new, stage_index, run_seed)
        self.tasks += 1
        return self.evaluated(self.vector)

    def on_stage_end(self, ctx) -> None:
        """Fold the task's ``τ_t`` into the running vector; evaluation mode: ``θ0 + M_t``."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        evaluated = self.add_task(task_vector(model), ctx.stage.index, ctx.cfg.seed)
        self.delta.attach(model)
        self.delta.set(evaluated)
        use_merged(model, self.delta, on=True)

    def stage_state(self) -> dict[str, Any]:
        return {"vector": {k: v.detach().cpu().contiguous() for k, v in self.vector.items()},
                "tasks": self.tasks, **self.extra_state()}

    def load_stage_state(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        self.vector = {k: v.float() for k, v in state["vector"].items()}
        self.tasks = int(state["tasks"])
        self.load_extra_state(state)
        self.delta.attach(model)
        self.delta.set(self.evaluated(self.vector))

    def evaluated_delta(self, state: dict[str, Any]) -> Vector:
        """``ΔW`` per LoRA target module (PEFT module names) of the model a stage evaluated,
        from that stage's :meth:`stage_state` (``aimm export``: ``θ0 + ΔW``)."""
        return self.evaluated({k: v.float() for k, v in state["vector"].items()})

    # ------------------------------------------------------------ helpers
    def _seed(self, stage_index: int, run_seed: int) -> int:
        base = self.options.seed if self.options.seed is not None else run_seed
        return base + 1000 * stage_index


# ------------------------------------------------------------------------------ methods
class TaskArithmetic(ContinualMerging):
    """Continual task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): ``M_t = M_{t-1} + λ τ_t``.

    ``M_t = λ Σ_{i<=t} τ_i`` (:func:`~aimm.merging.continual.task_arithmetic_step`). The paper
    picks λ on validation data; 0.3 is FusionBench's continual task arithmetic."""

    name = "task_arithmetic"
    display_name = "Task arithmetic"
    color = "#BCBD22"  # yellow-green (brown is seq_ft's)
    description = "a fresh LoRA per task; the merged model is θ0 + λ·Σ task vectors"
    Options = ScalingOptions

    def fold(self, new, stage_index, run_seed):
        running = self.vector or {k: torch.zeros_like(v) for k, v in new.items()}
        return cm.task_arithmetic_step(running, new, self.options.scaling)


class Ties(ContinualMerging):
    """Continual TIES-merging (Yadav et al. 2023, arXiv 2306.01708): ``M_t = TIES(M_{t-1}, τ_t)``.

    ``M_1 = TIES(τ_1)`` (top-``density`` trim times λ), then TIES of the running vector and the
    new task vector (:func:`~aimm.merging.continual.ties`, PEFT's ``merge_utils.ties``: trim each
    to its top-``density`` magnitudes, elect the sign, disjoint mean, times λ). The running
    vector is one input of two, so older tasks weigh 1/2 where they agree; λ applies at every
    step (λ^t on the oldest task: keep 1.0, the paper's, unless that is intended). FusionBench's
    continual TIES instead adds λ·TIES(merged, new) to the merged model."""

    name = "ties"
    display_name = "TIES"
    color = "#9467BD"  # purple
    description = "a fresh LoRA per task; TIES-merge (trim, elect sign, disjoint mean) into the running model"
    Options = TiesOptions

    def fold(self, new, stage_index, run_seed):
        o = self.options
        vectors = [self.vector, new] if self.vector else [new]
        return cm.ties(vectors, o.density, o.majority_sign_method, o.scaling)


class DareLinear(ContinualMerging):
    """Continual DARE + task arithmetic (Yu et al. 2023, arXiv 2311.03099):
    ``M_t = M_{t-1} + DARE_linear([τ_t])``.

    Each task vector is dropped-and-rescaled once, when it arrives (kept with probability
    ``density``, times ``1/density``; :func:`~aimm.merging.continual.dare_linear`, PEFT's
    ``merge_utils.dare_linear``, seeded ``seed + 1000 * stage``), times λ, and summed: ``M_t``
    equals the batch ``DARE_linear(τ_1..τ_t)`` with those drops. The running vector is never
    dropped again (``dare_linear([M, τ])`` would re-drop and re-scale it at every task)."""

    name = "dare_linear"
    display_name = "DARE (linear)"
    color = "#66A61E"  # green (Dark2; the yellow it had was Recurrent-KIF's orange in print)
    description = "a fresh LoRA per task; drop-and-rescale it (DARE), then add it to the running model"
    Options = DareLinearOptions

    def fold(self, new, stage_index, run_seed):
        o = self.options
        dropped = cm.dare_linear([new], o.density, o.scaling, seed=self._seed(stage_index, run_seed))
        return cm.task_arithmetic_step(self.vector, dropped, 1.0) if self.vector else dropped


class DareTies(ContinualMerging):
    """Continual DARE-TIES (Yu et al. 2023, arXiv 2311.03099 with TIES' sign election):
    ``M_t = TIES_{density=1}(M_{t-1}, DARE(τ_t))``.

    DARE replaces TIES' magnitude trim: the new task vector is dropped-and-rescaled once
    (:func:`~aimm.merging.continual.dare_linear` with λ = 1, seeded ``seed + 1000 * stage``),
    then sign election and disjoint mean with the running vector, times λ
    (:func:`~aimm.merging.continual.ties` without trimming). Per pair of tensors this is PEFT's
    ``dare_ties`` except that the running vector is not dropped again."""

    name = "dare_ties"
    display_name = "DARE (TIES)"
    color = "#E7298A"  # magenta
    description = "a fresh LoRA per task; drop-and-rescale it (DARE), then TIES-merge it into the running model"
    Options = DareTiesOptions

    def fold(self, new, stage_index, run_seed):
        o = self.options
        dropped = cm.dare_linear([new], o.density, 1.0, seed=self._seed(stage_index, run_seed))
        vectors = [self.vector, dropped] if self.vector else [dropped]
        with warnings.catch_warnings():  # PEFT warns that density 1 trims nothing: intended
            warnings.filterwarnings("ignore", message="The density 1.0", category=UserWarning)
            return cm.ties(vectors, 1.0, o.majority_sign_method, o.scaling)


class MagMax(ContinualMerging):
    """MagMax (Marczak et al. 2024, arXiv 2407.06322): sequential fine-tuning, then the
    maximum-magnitude merge of the task vectors, ``θ0 + λ · MagMax(τ_1..τ_t)``.

    The LoRA continues from the previous task's trained LoRA (not reset), trained with the merged
    delta off, so ``θ_t = θ0 + ΔW(LoRA_t)`` is the sequentially fine-tuned model and
    ``τ_t = θ_t − θ0``. Per entry, MagMax keeps the value of largest ``|τ_i|`` over ``i <= t``
    (sign kept; ties: the later task, as the release) via
    :func:`~aimm.merging.continual.magmax_step` on the running selection; λ = 0.5 as the
    release's 8-dataset script. The paper fine-tunes all weights; here the LoRA's ``ΔW``."""

    name = "magmax"
    display_name = "MagMax"
    color = "#D62728"  # red
    description = "sequential LoRA fine-tuning; the model is θ0 + λ·(largest-|Δ| entry over the task vectors)"
    Options = MagMaxOptions
    continues_lora = True

    def fold(self, new, stage_index, run_seed):
        return cm.magmax_step(self.vector, new) if self.vector else {k: v.clone() for k, v in new.items()}

    def evaluated(self, vector):
        return {k: v * self.options.scaling for k, v in vector.items()}


class OPCM(ContinualMerging):
    """OPCM (Tang et al. 2025, arXiv 2501.09522): orthogonal projection onto the complement of
    the merged vector's principal subspace, with the adaptive scaling λ_t.

    ``M_1 = τ_1``, ``λ_1 = 1``; then per 2-D module ``P(τ_t)`` (:func:`~aimm.merging.continual.opcm_project`:
    in the SVD basis of ``M_{t-1}``, the diagonal and the top-``r`` block, ``r`` from ``alpha``'s
    share of the singular values, are zeroed), ``S = λ_{t-1} M_{t-1} + P(τ_t)``,
    ``λ_t = ‖S‖ / mean(‖τ_1‖..‖τ_t‖)``, ``M_t = S / λ_t``
    (:func:`~aimm.merging.continual.opcm_step`, FusionBench's release). λ and the task norms are
    saved with the stage. The paper merges full fine-tuned weights; here LoRA ``ΔW``."""

    name = "opcm"
    display_name = "OPCM"
    color = "#393B79"  # indigo
    description = "a fresh LoRA per task; project it off the merged model's principal subspace, adaptive scaling"
    Options = OPCMOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.lam = 0.0
        self.task_norms: list[float] = []

    def fold(self, new, stage_index, run_seed):
        if not self.vector:
            merged, self.lam, self.task_norms = cm.opcm_init(new)
            return merged
        merged, self.lam, self.task_norms = cm.opcm_step(
            self.vector, new, prev_lambda=self.lam, task_norms=self.task_norms, alpha=self.options.alpha)
        return merged

    def extra_state(self):
        return {"lambda": self.lam, "task_norms": list(self.task_norms)}

    def load_extra_state(self, state):
        self.lam, self.task_norms = float(state["lambda"]), [float(x) for x in state["task_norms"]]


class WeightAverage(ContinualMerging):
    """Continual weight averaging (Wortsman et al. 2022, arXiv 2203.05482, uniform soup): the
    running mean of the task models ``θ0 + τ_i``, i.e. ``M_t = (t−1)/t · M_{t-1} + τ_t / t``
    (:func:`~aimm.merging.continual.weight_average`, FusionBench's continual formula)."""

    name = "weight_average"
    display_name = "Weight average"
    color = "#A6761D"  # mustard
    description = "a fresh LoRA per task; the model is the running mean of the task models"

    def fold(self, new, stage_index, run_seed):
        running = self.vector or {k: torch.zeros_like(v) for k, v in new.items()}
        return cm.weight_average(running, new, self.tasks)


CONTINUAL_MERGING = (TaskArithmetic, Ties, DareLinear, DareTies, MagMax, OPCM, WeightAverage)

__all__ = ["CONTINUAL_MERGING", "ContinualMerging", "DareLinear", "DareTies", "MagMax", "OPCM",
           "TaskArithmetic", "Ties", "WeightAverage"]
