"""Merge-timing controller of AIMMerging (pure Python, no torch).

One :class:`MergeController` drives one task (task 2 onwards). The trainer calls

* :meth:`MergeController.observe` after every inner optimiser step with the
  forgetting signal ``L_hist`` (loss of one no-grad forward on a memory batch);
  it returns ``True`` when a merge must happen now;
* :func:`fusion_weights` (or :meth:`MergeController.fusion_weights`) to get
  ``(w_in, w_out)`` for the fusion, then runs ``c.outer_steps`` rehearsal steps
  and fuses;
* :meth:`MergeController.merged` with ``sum |delta_in|`` (the learning signal
  numerator); it adapts and returns the next merge interval.

Fidelity notes
--------------
``variant="official"`` is the pseudo-code of spec section 4b, transcribed
literally (checked against the authors' release, ``trainer.py`` of the forked
``transformers==4.28.1``):

* threshold: the first ``floor(2*S/3) + 1`` forgetting-signal values after a
  merge (or task start) are collected, ``threshold = threshold_factor *
  sum(values) / len(values)``; the step that completes the collection is not
  itself tested against the threshold;
* activation ``A += 1`` when ``L >= threshold``; otherwise, once
  ``step >= planned + S`` (two intervals after the last merge) ``A`` is forced
  ``+1``; merge when ``(step >= planned and A >= 1) or A >= 3``;
* ``Lambda = l1 / S`` with the *planned* S; cold start checks
  ``len(lambdas) > cold_start`` *before* appending, so the first
  ``cold_start + 1`` (=4) merges keep ``S0``;
* shrink ``S = max(S_min, int(S / (lam / prev)))`` then ``if S >= 64: S =
  int(S / 2)``; grow ``S = min(S_max, int(S * (prev / lam + (1 if S < 64 else
  0.5))))``; ``outer = int(S * ratio)``, ``ratio = outer0 / S0``.

Every constant of the release is a named constructor parameter whose default
is the release's value (``threshold_window=2/3``, ``halve_at=64``,
``growth_bonus_small=1.0``, ``growth_bonus_large=0.5``, ``max_activations=3``,
fusion table boundary 70).

Our choices where spec and release are silent (not in the release):

* zero / non-finite learning signal: the release divides by zero (crash) when a
  Lambda is 0. Here, if ``prev <= 0`` or ``lam <= 0`` the interval is left
  unchanged and the event carries ``zero_signal=True``; if ``prev`` or ``lam``
  is NaN/inf the interval is left unchanged and ``nonfinite_signal=True``.
  The Lambda is still appended (the record stays faithful).
* ``normalize_by="actual"`` (spec section 7, defect 3) divides ``l1`` by
  ``step - last_merge_step`` instead of the planned ``S``.
* ``variant="paper"`` (spec section 4; the release does not implement it): the
  trend of the last ``window`` Lambdas (current one included) is measured by the
  least-squares slope (``trend_method="slope"``, default) or by last minus first
  (``"endpoints"``), expressed as a relative change over the window
  ``rel = slope * (window - 1) / mean(|window values|)``. ``rel >
  balance_tolerance`` -> rising -> ``S = max(S_min, int(S / gamma_down))``;
  ``rel < -balance_tolerance`` -> falling -> ``S = min(S_max, int(S *
  gamma_up))``; otherwise balanced -> unchanged. The same cold start applies
  and fewer than ``window`` Lambdas -> unchanged. FS/threshold/activation logic
  is the official one.
* ``threshold_window`` is turned into an exact fraction
  (``Fraction(x).limit_denominator(1000)``) so that ``floor(S * 2/3)`` equals
  the release's integer ``int(S * 2 / 3)`` for every S.
* merge kinds: ``"forced"`` if the observation of the merge step was a forced
  activation; ``"early"`` if ``A >= max_activations`` before the planned step;
  ``"planned"`` if at/after the planned step with ``A >= 1``; ``"manual"`` if
  :meth:`merged` is called although the controller did not ask for a merge
  (e.g. a final flush at the end of a task).
* the interval bounds are not enforced on ``initial_interval`` (the release
  does not either); the ``>= halve_at`` halving may drop below ``min_interval``
  when ``min_interval > halve_at / 2`` (as in the release).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Mapping, Optional

__all__ = [
    "MergeController",
    "MergeEvent",
    "fusion_weights",
    "OFFICIAL_FUSION_TABLE",
    "VARIANTS",
    "NORMALIZE_BY",
]

VARIANTS = ("official", "paper")
NORMALIZE_BY = ("planned", "actual")
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


def fusion_weights(
    activations: int,
    interval: int,
    *,
    boundary: float = 70,
    activation_boundary: int = 1,
    table: Optional[Mapping[str, tuple[float, float]]] = None,
) -> tuple[float, float]:
    """Official fusion weights ``(w_in, w_out)`` (spec section 3).

    Args:
        activations: activation count A at merge time.
        interval: current planned interval S at merge time (before adaptation).
        boundary: S boundary of the table; ``S <= boundary`` is "short" (release: 70).
        activation_boundary: ``A > activation_boundary`` is "many" (release: 1).
        table: mapping with keys ``many_short``, ``many_long``, ``few_short``,
            ``few_long``; defaults to :data:`OFFICIAL_FUSION_TABLE`.

    Returns:
        ``(w_in, w_out)`` for ``theta_t + w_in * delta_in + w_out * delta_out``.
    """
    tbl = OFFICIAL_FUSION_TABLE if table is None else table
    key = ("many" if activations > activation_boundary else "few") + (
        "_short" if interval <= boundary else "_long"
    )
    w_in, w_out = tbl[key]
    return float(w_in), float(w_out)


@dataclass
class MergeEvent:
    """One merge, as recorded by :meth:`MergeController.merged`.

    ``lam`` is the learning signal Lambda (dict key ``"lambda"`` in
    :meth:`as_dict` and for ``event["lambda"]``). ``outer_steps`` is the number of
    rehearsal steps run for this merge (value before the update);
    ``outer_steps_after`` the value for the next merge.
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
    kind: str
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
        if "lam" not in d:
            d["lam"] = d["lambda"]
        d.pop("lambda", None)
        return cls(**d)

    def __getitem__(self, key: str) -> Any:
        if key == "lambda":
            return self.lam
        return getattr(self, key)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


class MergeController:
    """Decides when to merge and adapts the merge interval (spec sections 2-4, 4b).

    Args:
        initial_interval: S0, the first planned interval (release: 8).
        min_interval, max_interval: clamps S_min, S_max (release: 2, 128).
        cold_start: number of Lambdas recorded before adaptation starts; the
            first ``cold_start + 1`` merges keep S0 (release: 3).
        threshold_factor: delta = factor * mean(collected L_hist) (release: 2.0).
        outer_ratio: outer/inner ratio; ``outer_steps = int(S * outer_ratio)`` (release: 1).
        adaptive: adapt S from Lambda (release flag ``adaptive_merge_flag``).
        variant: ``"official"`` (section 4b) or ``"paper"`` (sliding-window trend).
        normalize_by: ``"planned"`` (release: Lambda = l1 / S) or ``"actual"``
            (Lambda = l1 / (step - last_merge_step)).
        threshold_window: fraction of S for threshold collection,
            ``floor(threshold_window * S) + 1`` values (release: 2/3).
        halve_at: shrink halving and growth-bonus switch point (release: 64).
        growth_bonus_small: growth bonus while ``S < halve_at`` (release: 1.0).
        growth_bonus_large: growth bonus while ``S >= halve_at`` (release: 0.5).
        max_activations: early merge at this activation count (release: 3).
        fusion_boundary: S boundary of the fusion weight table (release: 70).
        fusion_table: fusion weight table, default :data:`OFFICIAL_FUSION_TABLE`.
        window: paper variant, number of Lambdas L_w in the trend window (3).
        gamma_up, gamma_down: paper variant growth / shrink factors (2.0).
        balance_tolerance: paper variant, relative change within which the trend
            is "balanced" (0.05).
        trend_method: paper variant, ``"slope"`` (least squares) or ``"endpoints"``.
    """

    def __init__(
        self,
        initial_interval: int = 8,
        min_interval: int = 2,
        max_interval: int = 128,
        cold_start: int = 3,
        threshold_factor: float = 2.0,
        outer_ratio: float = 1.0,
        adaptive: bool = True,
        variant: str = "official",
        *,
        normalize_by: str = "planned",
        threshold_window: float = 2 / 3,
        halve_at: int = 64,
        growth_bonus_small: float = 1.0,
        growth_bonus_large: float = 0.5,
        max_activations: int = 3,
        fusion_boundary: float = 70,
        fusion_table: Optional[Mapping[str, tuple[float, float]]] = None,
        window: int = 3,
        gamma_up: float = 2.0,
        gamma_down: float = 2.0,
        balance_tolerance: float = 0.05,
        trend_method: str = "slope",
    ) -> None:
        _check(isinstance(initial_interval, int) and initial_interval > 0,
               "initial_interval", f"must be a positive int, got {initial_interval!r}")
        _check(isinstance(min_interval, int) and min_interval > 0,
               "min_interval", f"must be a positive int, got {min_interval!r}")
        _check(isinstance(max_interval, int) and max_interval > 0,
               "max_interval", f"must be a positive int, got {max_interval!r}")
        _check(min_interval <= max_interval, "min_interval",
               f"min_interval={min_interval} > max_interval={max_interval}")
        _check(isinstance(cold_start, int) and cold_start >= 0,
               "cold_start", f"must be an int >= 0, got {cold_start!r}")
        _check(_finite(threshold_factor) and threshold_factor > 0,
               "threshold_factor", f"must be > 0, got {threshold_factor!r}")
        _check(_finite(outer_ratio) and outer_ratio >= 0,
               "outer_ratio", f"must be >= 0, got {outer_ratio!r}")
        _check(variant in VARIANTS, "variant", f"must be one of {VARIANTS}, got {variant!r}")
        _check(normalize_by in NORMALIZE_BY, "normalize_by",
               f"must be one of {NORMALIZE_BY}, got {normalize_by!r}")
        _check(_finite(threshold_window) and threshold_window > 0,
               "threshold_window", f"must be > 0, got {threshold_window!r}")
        _check(_finite(halve_at) and halve_at > 0, "halve_at", f"must be > 0, got {halve_at!r}")
        _check(_finite(growth_bonus_small) and growth_bonus_small >= 0,
               "growth_bonus_small", f"must be >= 0, got {growth_bonus_small!r}")
        _check(_finite(growth_bonus_large) and growth_bonus_large >= 0,
               "growth_bonus_large", f"must be >= 0, got {growth_bonus_large!r}")
        _check(isinstance(max_activations, int) and max_activations >= 1,
               "max_activations", f"must be an int >= 1, got {max_activations!r}")
        _check(_finite(fusion_boundary), "fusion_boundary", f"must be finite, got {fusion_boundary!r}")
        if fusion_table is not None:
            missing = set(OFFICIAL_FUSION_TABLE) - set(fusion_table)
            _check(not missing, "fusion_table", f"missing keys {sorted(missing)}")
        _check(isinstance(window, int) and window >= 2, "window", f"must be an int >= 2, got {window!r}")
        _check(_finite(gamma_up) and gamma_up >= 1, "gamma_up", f"must be >= 1, got {gamma_up!r}")
        _check(_finite(gamma_down) and gamma_down >= 1, "gamma_down", f"must be >= 1, got {gamma_down!r}")
        _check(_finite(balance_tolerance) and balance_tolerance >= 0,
               "balance_tolerance", f"must be >= 0, got {balance_tolerance!r}")
        _check(trend_method in TREND_METHODS, "trend_method",
               f"must be one of {TREND_METHODS}, got {trend_method!r}")

        self._config: dict[str, Any] = dict(
            initial_interval=initial_interval, min_interval=min_interval,
            max_interval=max_interval, cold_start=cold_start,
            threshold_factor=float(threshold_factor), outer_ratio=float(outer_ratio),
            adaptive=bool(adaptive), variant=variant, normalize_by=normalize_by,
            threshold_window=float(threshold_window), halve_at=halve_at,
            growth_bonus_small=float(growth_bonus_small),
            growth_bonus_large=float(growth_bonus_large), max_activations=max_activations,
            fusion_boundary=fusion_boundary,
            fusion_table=None if fusion_table is None
            else {k: [float(v[0]), float(v[1])] for k, v in fusion_table.items()},
            window=window, gamma_up=float(gamma_up), gamma_down=float(gamma_down),
            balance_tolerance=float(balance_tolerance), trend_method=trend_method,
        )
        self._window_frac = Fraction(threshold_window).limit_denominator(1000)

        # Dynamic state (section 4b names in comments).
        self._interval = initial_interval                       # S
        self._ratio = float(outer_ratio)                        # outer0 / S0
        self._outer = int(initial_interval * self._ratio)       # outer
        self._planned = initial_interval                        # planned
        self._last_merge = 0                                    # last_merge
        self._collected: list[float] = []                       # collected
        self._threshold: Optional[float] = None                 # threshold
        self._activations = 0                                   # A
        self._forced = 0                                        # forced part of A
        self._lambdas: list[float] = []                         # lambdas
        self._lambda_steps: list[int] = []
        self._events: list[MergeEvent] = []
        self._last_obs: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ state
    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (copy)."""
        return dict(self._config)

    @property
    def variant(self) -> str:
        return self._config["variant"]

    @property
    def interval(self) -> int:
        """Current planned merge interval S."""
        return self._interval

    @property
    def outer_steps(self) -> int:
        """Rehearsal steps to run at the next merge."""
        return self._outer

    @property
    def activations(self) -> int:
        """Activation count A since the last merge."""
        return self._activations

    @property
    def forced_activations(self) -> int:
        """How many of :attr:`activations` were forced."""
        return self._forced

    @property
    def threshold(self) -> Optional[float]:
        """Forgetting-signal threshold delta, ``None`` while still collecting."""
        return self._threshold

    @property
    def collected(self) -> list[float]:
        """L_hist values collected so far for the threshold (copy)."""
        return list(self._collected)

    @property
    def n_threshold_values(self) -> int:
        """Number of values collected for the threshold: ``floor(window * S) + 1``."""
        return math.floor(self._window_frac * self._interval) + 1

    @property
    def planned_step(self) -> int:
        return self._planned

    @property
    def last_merge_step(self) -> int:
        return self._last_merge

    @property
    def lambdas(self) -> list[float]:
        """Learning signals recorded in this task (copy)."""
        return list(self._lambdas)

    @property
    def lambda_steps(self) -> list[int]:
        """Steps at which :attr:`lambdas` were recorded (copy)."""
        return list(self._lambda_steps)

    @property
    def events(self) -> list[MergeEvent]:
        """Merge events (copy of the list)."""
        return list(self._events)

    @property
    def last_observation(self) -> Optional[dict[str, Any]]:
        """The last :meth:`observe` call: step, loss, activated, forced, merge."""
        return None if self._last_obs is None else dict(self._last_obs)

    # --------------------------------------------------------------- protocol
    def observe(self, step: int, history_loss: float) -> bool:
        """Feed the forgetting signal of inner step ``step``; return "merge now".

        ``step`` counts inner optimiser steps in this task (1, 2, ...); outer
        (rehearsal) steps do not advance it.
        """
        if step <= self._last_merge:
            raise ValueError(f"step: must be > last_merge_step={self._last_merge}, got {step}")
        L = float(history_loss)
        activated = forced = False
        if self._threshold is None:
            self._collected.append(L)
            if len(self._collected) == self.n_threshold_values:
                self._threshold = self._config["threshold_factor"] * (
                    sum(self._collected) / len(self._collected)
                )
        elif L >= self._threshold:
            self._activations += 1
            activated = True
        elif step >= self._planned + self._interval:
            self._activations += 1
            self._forced += 1
            activated = forced = True
        merge = self._should_merge(step)
        self._last_obs = dict(step=step, loss=L, activated=activated, forced=forced, merge=merge)
        return merge

    def _should_merge(self, step: int) -> bool:
        return (step >= self._planned and self._activations >= 1) or (
            self._activations >= self._config["max_activations"]
        )

    def fusion_weights(self) -> tuple[float, float]:
        """:func:`fusion_weights` for the current A and S with this controller's table."""
        return fusion_weights(
            self._activations, self._interval,
            boundary=self._config["fusion_boundary"], table=self._config["fusion_table"],
        )

    def _kind(self, step: int) -> str:
        obs = self._last_obs
        if obs is not None and obs["step"] == step and obs["forced"]:
            return "forced"
        if not self._should_merge(step):
            return "manual"
        if step < self._planned:
            return "early"
        return "planned"

    def merged(
        self,
        step: int,
        param_change_l1: float,
        *,
        weights: Optional[tuple[float, float]] = None,
    ) -> int:
        """Record a merge at ``step`` and adapt the interval; return the next S.

        Args:
            step: inner step of the merge (the step whose :meth:`observe` returned True).
            param_change_l1: ``sum |delta_in|`` over all LoRA parameters.
            weights: the ``(w_in, w_out)`` actually used, for the event record;
                defaults to :meth:`fusion_weights`.
        """
        if step <= self._last_merge:
            raise ValueError(f"step: must be > last_merge_step={self._last_merge}, got {step}")
        cfg = self._config
        S_before, outer_before = self._interval, self._outer
        w_in, w_out = self.fusion_weights() if weights is None else (float(weights[0]), float(weights[1]))
        kind = self._kind(step)
        denom = S_before if cfg["normalize_by"] == "planned" else step - self._last_merge
        l1 = float(param_change_l1)
        lam = l1 / denom
        cold = zero = nonfinite = False
        trend: Optional[str] = None

        if cfg["adaptive"] and len(self._lambdas) > cfg["cold_start"]:
            prev = self._lambdas[-1]
            if cfg["variant"] == "official":
                if not (math.isfinite(lam) and math.isfinite(prev)):
                    nonfinite = True
                elif prev <= 0 or lam <= 0:
                    zero = True
                else:
                    S = self._interval
                    if lam >= prev:
                        S = max(cfg["min_interval"], int(S / (lam / prev)))
                        if S >= cfg["halve_at"]:
                            S = int(S / 2)
                    else:
                        bonus = cfg["growth_bonus_small"] if S < cfg["halve_at"] else cfg["growth_bonus_large"]
                        S = min(cfg["max_interval"], int(S * (prev / lam + bonus)))
                    self._interval = S
            else:
                trend, zero, nonfinite = self._paper_trend(self._lambdas + [lam])
                if trend == "rising":
                    self._interval = max(cfg["min_interval"], int(self._interval / cfg["gamma_down"]))
                elif trend == "falling":
                    self._interval = min(cfg["max_interval"], int(self._interval * cfg["gamma_up"]))
            self._outer = int(self._interval * self._ratio)
        elif cfg["adaptive"]:
            cold = True

        event = MergeEvent(
            step=step, lam=lam, l1=l1, denominator=denom,
            interval_before=S_before, interval_after=self._interval,
            outer_steps=outer_before, outer_steps_after=self._outer,
            activations=self._activations, forced_activations=self._forced,
            w_in=w_in, w_out=w_out, kind=kind, planned_step=self._planned,
            previous_merge_step=self._last_merge, threshold=self._threshold,
            cold_start=cold, zero_signal=zero, nonfinite_signal=nonfinite, trend=trend,
        )
        self._events.append(event)
        self._lambdas.append(lam)
        self._lambda_steps.append(step)
        self._planned = step + self._interval
        self._last_merge = step
        self._collected = []
        self._threshold = None
        self._activations = 0
        self._forced = 0
        return self._interval

    def _paper_trend(self, values: list[float]) -> tuple[Optional[str], bool, bool]:
        """Trend of the last ``window`` Lambdas: (trend, zero_signal, nonfinite_signal)."""
        cfg = self._config
        n = cfg["window"]
        if len(values) < n:
            return None, False, False
        w = values[-n:]
        if not all(math.isfinite(v) for v in w):
            return None, False, True
        scale = sum(abs(v) for v in w) / n
        if scale == 0:
            return "balanced", True, False
        if cfg["trend_method"] == "slope":
            xm = (n - 1) / 2
            ym = sum(w) / n
            slope = sum((i - xm) * (v - ym) for i, v in enumerate(w)) / sum(
                (i - xm) ** 2 for i in range(n)
            )
            change = slope * (n - 1)
        else:
            change = w[-1] - w[0]
        rel = change / scale
        tol = cfg["balance_tolerance"]
        if rel > tol:
            return "rising", False, False
        if rel < -tol:
            return "falling", False, False
        return "balanced", False, False

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot (config + dynamic state + events)."""
        return {
            "version": 1,
            "config": self.config,
            "state": {
                "interval": self._interval,
                "ratio": self._ratio,
                "outer": self._outer,
                "planned": self._planned,
                "last_merge": self._last_merge,
                "collected": list(self._collected),
                "threshold": self._threshold,
                "activations": self._activations,
                "forced": self._forced,
                "lambdas": list(self._lambdas),
                "lambda_steps": list(self._lambda_steps),
                "last_obs": None if self._last_obs is None else dict(self._last_obs),
            },
            "events": [e.as_dict() for e in self._events],
        }

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "MergeController":
        """Rebuild a controller from :meth:`state_dict` output."""
        if d.get("version") != 1:
            raise ValueError(f"version: unsupported state_dict version {d.get('version')!r}")
        cfg = dict(d["config"])
        if cfg.get("fusion_table") is not None:
            cfg["fusion_table"] = {k: tuple(v) for k, v in cfg["fusion_table"].items()}
        c = cls(**cfg)
        s = d["state"]
        c._interval = int(s["interval"])
        c._ratio = float(s["ratio"])
        c._outer = int(s["outer"])
        c._planned = int(s["planned"])
        c._last_merge = int(s["last_merge"])
        c._collected = [float(x) for x in s["collected"]]
        c._threshold = None if s["threshold"] is None else float(s["threshold"])
        c._activations = int(s["activations"])
        c._forced = int(s["forced"])
        c._lambdas = [float(x) for x in s["lambdas"]]
        c._lambda_steps = [int(x) for x in s["lambda_steps"]]
        c._last_obs = None if s["last_obs"] is None else dict(s["last_obs"])
        c._events = [MergeEvent.from_dict(e) for e in d["events"]]
        return c

    def __repr__(self) -> str:
        return (
            f"MergeController(variant={self.variant!r}, interval={self._interval}, "
            f"outer_steps={self._outer}, planned_step={self._planned}, "
            f"activations={self._activations}, threshold={self._threshold}, "
            f"merges={len(self._events)})"
        )


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
