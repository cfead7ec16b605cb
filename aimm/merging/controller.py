"""Merge-timing controller of AIMMerging (pure Python, no torch).

One :class:`MergeController` drives one task (task 2 onwards). The trainer calls
:meth:`~MergeController.observe` after every inner step with the forgetting signal (the
paper's L_hist: loss of one no-grad forward on a memory batch; ``True``: merge now), then
:meth:`~MergeController.fusion_weights` for ``(w_in, w_out)``, runs ``outer_steps`` rehearsal steps,
fuses, and calls :meth:`~MergeController.next_interval_after_merge` with ``sum |delta_in|`` (the
learning signal's numerator), which records the merge and returns the next interval. The
parameters are one frozen :class:`ControllerConfig` (each release constant a named field with the
release's value as default), the dynamic state one :class:`ControllerState`, the interval rules
pure functions (:func:`official_next_interval`, :func:`paper_trend`, :func:`paper_next_interval`).

Fidelity: ``variant="official"`` is spec section 4b transcribed literally (checked against the
release's ``trainer.py`` of its forked ``transformers==4.28.1``):

* threshold: the first ``floor(2*S/3) + 1`` signal values after a merge (or task start) are
  collected, ``threshold = threshold_factor * sum / len``; the step completing the collection is
  not itself tested;
* ``A += 1`` when ``L >= threshold``; otherwise, once ``step >= planned + S`` (two intervals after
  the last merge), ``A`` is forced ``+1``; merge when ``(step >= planned and A >= 1) or A >= 3``;
* ``Lambda = l1 / S`` with the *planned* S; cold start checks ``len(lambdas) > cold_start``
  *before* appending, so the first ``cold_start + 1`` (=4) merges keep ``S0``;
* shrink / grow: :func:`official_next_interval`; ``outer = int(S * ratio)``, ``ratio = outer0/S0``.

Our choices where spec and release are silent:

* a zero (the release divides by it and crashes) or non-finite Lambda leaves S unchanged; the event
  carries ``zero_signal`` / ``nonfinite_signal`` and the Lambda is still recorded;
* ``normalize_by="actual"`` (spec section 7, defect 3) divides ``l1`` by ``step - last_merge_step``;
* ``variant="paper"`` (spec section 4; not in the release): :func:`paper_trend` of the last
  ``window`` Lambdas (current one included) and :func:`paper_next_interval`; same cold start,
  threshold and activations as the official variant;
* ``threshold_window`` becomes an exact fraction (``limit_denominator(1000)``) so that
  ``floor(S * 2/3)`` equals the release's ``int(S * 2 / 3)`` for every S;
* merge kinds: ``forced`` (the merge step's activation was forced), ``early``
  (``A >= max_activations`` before the planned step), ``planned``; recording a merge the
  controller did not ask for is refused;
* bounds are not enforced on ``initial_interval``, and the ``>= halve_at`` halving may drop below
  ``min_interval`` when ``min_interval > halve_at / 2`` (both as in the release).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Mapping, Optional

from aimm.typecheck import field_problems
from aimm.util import did_you_mean, is_num as _is_num

__all__ = ["ControllerConfig", "ControllerState", "MergeController", "MergeEvent", "fusion_weights",
           "official_next_interval", "paper_next_interval", "paper_trend", "OFFICIAL_FUSION_TABLE",
           "VARIANTS", "NORMALIZE_BY"]

VARIANTS = ("official", "paper")
NORMALIZE_BY = ("planned", "actual")
#: The kinds of a merge event (see the module docstring).
MERGE_KINDS = ("forced", "planned", "early")
TREND_METHODS = ("slope", "endpoints")

#: Fusion weight lookup of the release, ``(w_in, w_out)``.
#: "many" = activations > 1 (history important), "few" = activations <= 1;
#: "short" = interval <= boundary (new task important), "long" = interval > boundary.
OFFICIAL_FUSION_TABLE: dict[str, tuple[float, float]] = {
    "many_short": (0.5, 0.5),
    "many_long": (0.4, 0.6),
    "few_short": (0.6, 0.4),
    "few_long": (0.5, 0.5),
}


@dataclass(frozen=True)
class ControllerConfig:
    """Every parameter of the controller, with the release's value as default; validates itself
    (``ValueError`` naming the parameter). Float parameters are stored as floats."""

    initial_interval: int = 8  # S0, the first planned interval
    min_interval: int = 2  # S_min
    max_interval: int = 128  # S_max
    cold_start: int = 3  # Lambdas recorded before adaptation; the first cold_start + 1 merges keep S0
    threshold_factor: float = 2.0  # delta = factor * mean(collected forgetting signals)
    outer_ratio: float = 1.0  # outer_steps = int(S * outer_ratio)
    adaptive: bool = True  # adapt S from Lambda (release flag adaptive_merge_flag)
    variant: str = "official"  # official (section 4b) | paper (sliding-window trend)
    normalize_by: str = "planned"  # Lambda = l1 / S (planned) | l1 / (step - last merge) (actual)
    threshold_window: float = 2 / 3  # floor(threshold_window * S) + 1 values set the threshold
    halve_at: int = 64  # shrink halving and growth-bonus switch point
    growth_bonus_small: float = 1.0  # growth bonus while S < halve_at
    growth_bonus_large: float = 0.5  # growth bonus while S >= halve_at
    max_activations: int = 3  # early merge at this activation count
    fusion_boundary: float = 70  # S boundary of the fusion weight table
    fusion_table: Optional[Mapping[str, tuple[float, float]]] = None  # None: OFFICIAL_FUSION_TABLE
    window: int = 3  # paper: Lambdas in the trend window (L_w)
    gamma_up: float = 2.0  # paper: growth factor on a falling trend
    gamma_down: float = 2.0  # paper: shrink factor on a rising trend
    balance_tolerance: float = 0.05  # paper: relative change within which the trend is balanced
    trend_method: str = "slope"  # paper: slope (least squares) | endpoints (last - first)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, rule: str) -> None:
            if not cond:
                raise ValueError(f"{name}: {rule}, got {getattr(self, name)!r}")

        for problem in field_problems(  # strict types first: "False" is no bool, True no int
                ControllerConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}).values():
            raise ValueError(f"controller option {problem}")

        for name in ("initial_interval", "min_interval", "max_interval"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive int")
        if self.min_interval > self.max_interval:
            raise ValueError(f"min_interval: min_interval={self.min_interval} > "
                             f"max_interval={self.max_interval}")
        need(_is_int(self.cold_start) and self.cold_start >= 0, "cold_start", "must be an int >= 0")
        need(_finite(self.threshold_factor) and self.threshold_factor > 0, "threshold_factor", "must be > 0")
        need(_finite(self.outer_ratio) and self.outer_ratio >= 0, "outer_ratio", "must be >= 0")
        need(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}")
        need(self.normalize_by in NORMALIZE_BY, "normalize_by", f"must be one of {NORMALIZE_BY}")
        need(_finite(self.threshold_window) and self.threshold_window > 0, "threshold_window", "must be > 0")
        need(_finite(self.halve_at) and self.halve_at > 0, "halve_at", "must be > 0")
        for name in ("growth_bonus_small", "growth_bonus_large", "balance_tolerance"):
            need(_finite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be >= 0")
        need(_is_int(self.max_activations) and self.max_activations >= 1, "max_activations",
             "must be an int >= 1")
        need(_finite(self.fusion_boundary), "fusion_boundary", "must be finite")
        if self.fusion_table is not None:
            _check_fusion_table(self.fusion_table)
            object.__setattr__(self, "fusion_table", {k: (float(v[0]), float(v[1]))
                                                      for k, v in self.fusion_table.items()})
        need(_is_int(self.window) and self.window >= 2, "window", "must be an int >= 2")
        for name in ("gamma_up", "gamma_down"):
            need(_finite(getattr(self, name)) and getattr(self, name) >= 1, name, "must be >= 1")
        need(self.trend_method in TREND_METHODS, "trend_method", f"must be one of {TREND_METHODS}")
        for f in dataclasses.fields(self):
            if f.type == "float":
                object.__setattr__(self, f.name, float(getattr(self, f.name)))


@dataclass
class ControllerState:
    """The dynamic state of one task's controller (section 4b names in comments)."""

    interval: int  # S
    ratio: float  # outer0 / S0
    outer: int  # outer
    planned: int  # planned
    last_merge: int = 0  # last_merge
    collected: list[float] = field(default_factory=list)  # collected
    threshold: Optional[float] = None  # threshold
    activations: int = 0  # A
    forced: int = 0  # forced part of A
    lambdas: list[float] = field(default_factory=list)  # lambdas
    lambda_steps: list[int] = field(default_factory=list)
    last_obs: Optional[dict[str, Any]] = None  # the last observe(): step, loss, activated, forced, merge

    @classmethod
    def initial(cls, cfg: ControllerConfig) -> "ControllerState":
        S = cfg.initial_interval
        return cls(interval=S, ratio=cfg.outer_ratio, outer=int(S * cfg.outer_ratio), planned=S)


# ------------------------------------------------------------------------------ pure rules
def fusion_weights(activations: int, interval: int, *, boundary: float = 70,
                   activation_boundary: int = 1,
                   table: Optional[Mapping[str, tuple[float, float]]] = None) -> tuple[float, float]:
    """Official fusion weights ``(w_in, w_out)`` (spec section 3): ``"many"`` when
    ``activations > activation_boundary`` (release: 1), ``"short"`` when ``interval <= boundary``
    (release: 70); ``table`` defaults to :data:`OFFICIAL_FUSION_TABLE`."""
    tbl = OFFICIAL_FUSION_TABLE if table is None else table
    key = ("many" if activations > activation_boundary else "few") + (
        "_short" if interval <= boundary else "_long")
    w_in, w_out = tbl[key]
    return float(w_in), float(w_out)


def official_next_interval(S: int, lam: float, prev: float,
                           cfg: ControllerConfig) -> tuple[int, bool, bool]:
    """Section 4b's interval rule: ``(next S, zero_signal, nonfinite_signal)``.

    Rising (``lam >= prev``): ``S = max(S_min, int(S / (lam / prev)))``, then ``int(S / 2)`` if
    ``S >= halve_at`` (64). Falling: ``S = min(S_max, int(S * (prev / lam + bonus)))``, bonus
    ``growth_bonus_small`` (1) while ``S < halve_at``, else ``growth_bonus_large`` (0.5). A zero or
    non-finite signal leaves S unchanged."""
    if not (math.isfinite(lam) and math.isfinite(prev)):
        return S, False, True
    if prev <= 0 or lam <= 0:
        return S, True, False
    if lam >= prev:
        S = max(cfg.min_interval, int(S / (lam / prev)))
        return (int(S / 2) if S >= cfg.halve_at else S), False, False
    bonus = cfg.growth_bonus_small if S < cfg.halve_at else cfg.growth_bonus_large
    return min(cfg.max_interval, int(S * (prev / lam + bonus))), False, False


def paper_trend(values: list[float], window: int, trend_method: str = "slope",
                tolerance: float = 0.05) -> tuple[Optional[str], bool, bool]:
    """Trend of the last ``window`` Lambdas: ``(trend, zero_signal, nonfinite_signal)`` with trend
    ``rising`` / ``falling`` / ``balanced`` (``None``: fewer than ``window`` values or not finite).

    The change over the window (least-squares ``slope * (window - 1)``, or last minus first) is
    relative to the mean absolute value; within ``tolerance`` it is balanced."""
    n = window
    if len(values) < n:
        return None, False, False
    w = values[-n:]
    if not all(math.isfinite(v) for v in w):
        return None, False, True
    scale = sum(abs(v) for v in w) / n
    if scale == 0:
        return "balanced", True, False
    if trend_method == "slope":
        xm, ym = (n - 1) / 2, sum(w) / n
        slope = sum((i - xm) * (v - ym) for i, v in enumerate(w)) / sum((i - xm) ** 2 for i in range(n))
        change = slope * (n - 1)
    else:
        change = w[-1] - w[0]
    rel = change / scale
    if rel > tolerance:
        return "rising", False, False
    if rel < -tolerance:
        return "falling", False, False
    return "balanced", False, False


def paper_next_interval(S: int, trend: Optional[str], cfg: ControllerConfig) -> int:
    """The paper variant's S after a trend: rising -> shrink by ``gamma_down``, falling -> grow by
    ``gamma_up``, otherwise unchanged (clamped to ``[min_interval, max_interval]``)."""
    if trend == "rising":
        return max(cfg.min_interval, int(S / cfg.gamma_down))
    if trend == "falling":
        return min(cfg.max_interval, int(S * cfg.gamma_up))
    return S


# ------------------------------------------------------------------------------ the record
@dataclass
class MergeEvent:
    """One merge, as recorded by :meth:`MergeController.next_interval_after_merge`.

    ``lam`` is the learning signal Lambda (dict key ``"lambda"`` in :meth:`as_dict` and for
    ``event["lambda"]``). ``outer_steps`` is the number of rehearsal steps run for this merge
    (value before the update); ``outer_steps_after`` the value for the next merge.
    """

    step: int
    lam: float
    l1: float
    denominator: int
    interval_before: int
    interval_after: int
    outer_steps: int
    outer_steps_after: int
    activations: int
    forced_activations: int
    w_in: float
    w_out: float
    kind: str  # forced | early | planned
    planned_step: int
    previous_merge_step: int
    threshold: Optional[float]
    cold_start: bool = False
    zero_signal: bool = False
    nonfinite_signal: bool = False
    trend: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict; ``lam`` is exported under both ``lambda`` and ``lam``."""
        d = asdict(self)
        d["lambda"] = d["lam"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MergeEvent":
        d = dict(d)
        d.setdefault("lam", d.get("lambda"))
        d.pop("lambda", None)
        return cls(**d)

    def __getitem__(self, key: str) -> Any:
        return self.lam if key == "lambda" else getattr(self, key)


# ------------------------------------------------------------------------------ the controller
class MergeController:
    """Decides when to merge and adapts the merge interval (spec sections 2-4, 4b).

    ``MergeController(config)`` with a :class:`ControllerConfig`; keyword arguments change
    fields of it (``MergeController(initial_interval=20)``).
    """

    def __init__(self, config: ControllerConfig | None = None, /, **changes: Any) -> None:
        self.config = dataclasses.replace(config or ControllerConfig(), **changes)
        self.state = ControllerState.initial(self.config)
        self.events: list[MergeEvent] = []
        self._window_frac = Fraction(self.config.threshold_window).limit_denominator(1000)

    # ------------------------------------------------------------------ read-only views
    variant = property(lambda self: self.config.variant)
    interval = property(lambda self: self.state.interval, doc="Current planned merge interval S.")
    outer_steps = property(lambda self: self.state.outer, doc="Rehearsal steps of the next merge.")
    activations = property(lambda self: self.state.activations, doc="A since the last merge.")
    forced_activations = property(lambda self: self.state.forced, doc="Forced part of A.")
    threshold = property(lambda self: self.state.threshold, doc="delta; None while collecting.")
    collected = property(lambda self: list(self.state.collected), doc="Forgetting-signal values collected.")
    planned_step = property(lambda self: self.state.planned)
    last_merge_step = property(lambda self: self.state.last_merge)
    lambdas = property(lambda self: list(self.state.lambdas), doc="Learning signals of this task.")
    lambda_steps = property(lambda self: list(self.state.lambda_steps))

    @property
    def last_observation(self) -> Optional[dict[str, Any]]:
        """The last :meth:`observe` call: step, loss, activated, forced, merge."""
        return None if self.state.last_obs is None else dict(self.state.last_obs)

    @property
    def n_threshold_values(self) -> int:
        """Number of values collected for the threshold: ``floor(window * S) + 1``."""
        return math.floor(self._window_frac * self.state.interval) + 1

    # ------------------------------------------------------------------ protocol
    def observe(self, step: int, forgetting_signal: float) -> bool:
        """Feed the forgetting signal of inner step ``step`` (1, 2, ... in this task; rehearsal
        steps do not count); return "merge now"."""
        s = self.state
        if step <= s.last_merge:
            raise ValueError(f"step: must be > last_merge_step={s.last_merge}, got {step}")
        L = float(forgetting_signal)
        activated = forced = False
        if s.threshold is None:
            s.collected.append(L)
            if len(s.collected) == self.n_threshold_values:
                s.threshold = self.config.threshold_factor * (sum(s.collected) / len(s.collected))
        elif L >= s.threshold:
            s.activations += 1
            activated = True
        elif step >= s.planned + s.interval:
            s.activations += 1
            s.forced += 1
            activated = forced = True
        merge = self._should_merge(step)
        s.last_obs = dict(step=step, loss=L, activated=activated, forced=forced, merge=merge)
        return merge

    def _should_merge(self, step: int) -> bool:
        s = self.state
        return (step >= s.planned and s.activations >= 1) or s.activations >= self.config.max_activations

    def fusion_weights(self) -> tuple[float, float]:
        """:func:`fusion_weights` for the current A and S with this controller's table."""
        return fusion_weights(self.state.activations, self.state.interval,
                              boundary=self.config.fusion_boundary, table=self.config.fusion_table)

    def next_interval_after_merge(self, step: int, param_change_l1: float, *,
                                  weights: Optional[tuple[float, float]] = None) -> int:
        """Record the merge of ``step`` (whose :meth:`observe` asked for it), adapt the interval
        from ``param_change_l1 = sum |delta_in|`` and return the next interval S.

        ``weights``: the ``(w_in, w_out)`` used, for the event; default :meth:`fusion_weights`.
        """
        s, cfg = self.state, self.config
        if step <= s.last_merge:
            raise ValueError(f"step: must be > last_merge_step={s.last_merge}, got {step}")
        obs = s.last_obs
        if obs is not None and obs["step"] == step and obs["forced"]:
            kind = "forced"
        elif self._should_merge(step):
            kind = "early" if step < s.planned else "planned"
        else:
            raise ValueError(f"step: no merge was asked for at step {step}")
        S_before, outer_before = s.interval, s.outer
        w_in, w_out = self.fusion_weights() if weights is None else (float(weights[0]), float(weights[1]))
        denom = S_before if cfg.normalize_by == "planned" else step - s.last_merge
        l1 = float(param_change_l1)
        lam = l1 / denom
        cold = zero = nonfinite = False
        trend: Optional[str] = None
        if cfg.adaptive and len(s.lambdas) > cfg.cold_start:
            if cfg.variant == "official":
                s.interval, zero, nonfinite = official_next_interval(s.interval, lam, s.lambdas[-1], cfg)
            else:
                trend, zero, nonfinite = paper_trend(s.lambdas + [lam], cfg.window, cfg.trend_method,
                                                     cfg.balance_tolerance)
                s.interval = paper_next_interval(s.interval, trend, cfg)
            s.outer = int(s.interval * s.ratio)
        elif cfg.adaptive:
            cold = True
        self.events.append(MergeEvent(
            step=step, lam=lam, l1=l1, denominator=denom, interval_before=S_before,
            interval_after=s.interval, outer_steps=outer_before, outer_steps_after=s.outer,
            activations=s.activations, forced_activations=s.forced, w_in=w_in, w_out=w_out,
            kind=kind, planned_step=s.planned, previous_merge_step=s.last_merge,
            threshold=s.threshold, cold_start=cold, zero_signal=zero, nonfinite_signal=nonfinite,
            trend=trend))
        s.lambdas.append(lam)
        s.lambda_steps.append(step)
        s.planned, s.last_merge = step + s.interval, step
        s.collected, s.threshold, s.activations, s.forced = [], None, 0, 0
        return s.interval

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot (config + dynamic state + events)."""
        return {"version": 1, "config": asdict(self.config), "state": asdict(self.state),
                "events": [e.as_dict() for e in self.events]}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "MergeController":
        """Rebuild a controller from :meth:`state_dict` output."""
        if d.get("version") != 1:
            raise ValueError(f"version: unsupported state_dict version {d.get('version')!r}")
        c = cls(ControllerConfig(**d["config"]))
        c.state = ControllerState(**d["state"])
        c.events = [MergeEvent.from_dict(e) for e in d["events"]]
        return c

    def __repr__(self) -> str:
        s = self.state
        return (f"MergeController(variant={self.variant!r}, interval={s.interval}, "
                f"outer_steps={s.outer}, planned_step={s.planned}, activations={s.activations}, "
                f"threshold={s.threshold}, merges={len(self.events)})")


def _check_fusion_table(table: Any) -> None:
    """``ValueError`` naming the entry unless ``table`` maps each official key to ``[w_in, w_out]``."""
    keys = list(OFFICIAL_FUSION_TABLE)
    if not isinstance(table, Mapping):
        raise ValueError(f"fusion_table={table!r}: must map {', '.join(keys)} to [w_in, w_out]")
    for k, v in table.items():
        if k not in keys:
            raise ValueError(f"fusion_table: unknown key {k!r}{did_you_mean(k, keys)}; keys: {', '.join(keys)}")
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(w) and _finite(w) for w in v)):
            raise ValueError(f"fusion_table.{k}={v!r}: must be [w_in, w_out], two finite numbers")
    if set(keys) - set(table):
        raise ValueError(f"fusion_table: missing keys {sorted(set(keys) - set(table))}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
