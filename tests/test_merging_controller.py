"""Tests of aimm.merging.controller: one test per rule of spec sections 2-4 / 4b."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from aimm.merging import MergeController, MergeEvent, fusion_weights

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def run_to_merge(c: MergeController, step: int, low: float = 1.0, high: float = 100.0) -> int:
    """Feed `low` until the threshold exists, then `high` until a merge is asked; return its step."""
    while True:
        step += 1
        loss = low if c.threshold is None else high
        if c.observe(step, loss):
            return step


def merge_with_lambda(c: MergeController, step: int, lam: float) -> int:
    """Run to the next merge and report l1 = lam * S (planned normalisation)."""
    m = run_to_merge(c, step)
    c.next_interval_after_merge(m, lam * c.interval)
    return m


# ------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("S", [2, 3, 8, 9, 20, 100])
def test_threshold_collects_floor_two_thirds_plus_one(S):
    c = MergeController(initial_interval=S, min_interval=1, max_interval=200)
    n = int(S * 2 / 3) + 1
    assert c.n_threshold_values == n
    for step in range(1, n):
        c.observe(step, float(step))
        assert c.threshold is None
    c.observe(n, float(n))
    assert c.threshold == pytest.approx(2.0 * sum(range(1, n + 1)) / n)
    assert c.collected == [float(i) for i in range(1, n + 1)]


def test_early_merge_at_three_activations():
    c = MergeController(initial_interval=20)
    for step in range(1, 15):  # 14 values -> threshold 2.0
        assert not c.observe(step, 1.0)
    assert c.threshold == 2.0
    assert not c.observe(15, 5.0)
    assert not c.observe(16, 5.0)
    assert c.observe(17, 5.0)  # A == 3 before planned step 20
    assert c.activations == 3
    c.next_interval_after_merge(17, 1.0)
    ev = c.events[-1]
    assert ev.kind == "early" and ev.activations == 3 and ev.step == 17 and ev.planned_step == 20


def test_merge_at_planned_step_after_one_activation():
    c = MergeController(initial_interval=20)
    for step in range(1, 15):
        c.observe(step, 1.0)
    assert not c.observe(15, 5.0)
    for step in range(16, 20):
        assert not c.observe(step, 1.0)
    assert c.observe(20, 1.0)
    c.next_interval_after_merge(20, 1.0)
    ev = c.events[-1]
    assert ev.kind == "planned" and ev.activations == 1 and ev.forced_activations == 0


def test_forced_activation_at_planned_plus_interval():
    c = MergeController(initial_interval=8)
    for step in range(1, 16):
        assert not c.observe(step, 1.0), step
    assert c.activations == 0
    assert c.observe(16, 1.0)  # 16 == planned (8) + S (8)
    assert c.activations == 1 and c.forced_activations == 1
    assert c.last_observation["forced"] is True
    c.next_interval_after_merge(16, 1.0)
    assert c.events[-1].kind == "forced"


def test_forced_only_when_threshold_exists():
    # A long threshold window (31 values for S=3): steps 1..31 only collect, so no forced
    # activation even though planned + S = 6 has long passed.
    c = MergeController(initial_interval=3, min_interval=1, threshold_window=10.0)
    for step in range(1, 31):
        assert not c.observe(step, 1.0)
        assert c.activations == 0
    c.observe(31, 1.0)
    assert c.threshold is not None and c.activations == 0
    assert c.observe(32, 1.0) and c.last_observation["forced"]


def test_cold_start_first_four_merges_keep_s0():
    c = MergeController()
    step, lam = 0, 1.0
    for _ in range(4):
        step = merge_with_lambda(c, step, lam)
        assert c.interval == 8
        lam *= 2
    assert [e.cold_start for e in c.events] == [True] * 4
    step = merge_with_lambda(c, step, lam)  # lam / prev = 2 -> int(8 / 2) = 4
    assert c.interval == 4 and not c.events[-1].cold_start


def test_shrink_with_halving_at_64():
    c = MergeController(initial_interval=100, cold_start=0, max_interval=200)
    step = merge_with_lambda(c, 0, 1.0)
    assert c.interval == 100
    step = merge_with_lambda(c, step, 1.25)  # int(100 / 1.25) = 80 >= 64 -> 40
    assert c.interval == 40
    step = merge_with_lambda(c, step, 1.25 * 1.25)  # int(40 / 1.25) = 32 < 64, no halving
    assert c.interval == 32
    assert c.events[-1].interval_before == 40 and c.events[-1].interval_after == 32


def test_growth_bonus_one_below_64_and_half_above():
    c = MergeController(initial_interval=8, cold_start=0, max_interval=1000)
    step = merge_with_lambda(c, 0, 1.0)
    step = merge_with_lambda(c, step, 0.5)  # g = 2 + 1 -> 24
    assert c.interval == 24
    step = merge_with_lambda(c, step, 0.25)  # g = 2 + 1 -> 72
    assert c.interval == 72
    step = merge_with_lambda(c, step, 0.125)  # S >= 64: g = 2 + 0.5 -> 180
    assert c.interval == 180


def test_clamps_at_min_and_max():
    c = MergeController(initial_interval=8, cold_start=0)
    step = merge_with_lambda(c, 0, 1.0)
    step = merge_with_lambda(c, step, 10.0)  # int(8 / 10) = 0 -> S_min 2
    assert c.interval == 2
    c = MergeController(initial_interval=100, cold_start=0)
    step = merge_with_lambda(c, 0, 1.0)
    step = merge_with_lambda(c, step, 0.1)  # 100 * 10.5 -> S_max 128
    assert c.interval == 128


def test_reset_after_merge_uses_new_interval():
    c = MergeController(initial_interval=8, cold_start=0)
    step = merge_with_lambda(c, 0, 1.0)
    assert (c.activations, c.threshold, c.collected) == (0, None, [])
    assert c.last_merge_step == step and c.planned_step == step + 8
    step = merge_with_lambda(c, step, 0.5)  # S -> 24
    assert c.interval == 24 and c.planned_step == step + 24
    assert c.n_threshold_values == 17  # floor(2 * 24 / 3) + 1 with the NEW S
    for i in range(1, 17):
        c.observe(step + i, 1.0)
    assert c.threshold is None
    c.observe(step + 17, 1.0)
    assert c.threshold == 2.0


def test_outer_steps_follow_ratio():
    c = MergeController(initial_interval=8, cold_start=0, outer_ratio=0.5)
    assert c.outer_steps == 4
    step = merge_with_lambda(c, 0, 1.0)
    step = merge_with_lambda(c, step, 0.5)  # S -> 24
    assert c.outer_steps == 12
    assert c.events[-1].outer_steps == 4 and c.events[-1].outer_steps_after == 12
    c = MergeController(initial_interval=8, cold_start=0, outer_ratio=0.3)
    step = merge_with_lambda(c, 0, 1.0)
    step = merge_with_lambda(c, step, 0.5)
    assert c.outer_steps == int(24 * 0.3) == 7


def test_normalize_by_actual_steps():
    kw = dict(initial_interval=8)
    planned, actual = MergeController(**kw), MergeController(**kw, normalize_by="actual")
    for c in (planned, actual):
        for step in range(1, 16):
            c.observe(step, 1.0)
        assert c.observe(16, 1.0)  # forced merge, 16 steps after the last merge
        c.next_interval_after_merge(16, 32.0)
    assert planned.lambdas == [4.0] and planned.events[0].denominator == 8
    assert actual.lambdas == [2.0] and actual.events[0].denominator == 16


def test_zero_and_nonfinite_signal_do_not_crash():
    c = MergeController(initial_interval=8, cold_start=0)
    step = merge_with_lambda(c, 0, 0.0)
    step = merge_with_lambda(c, step, 1.0)  # prev == 0
    assert c.interval == 8 and c.events[-1].zero_signal
    step = merge_with_lambda(c, step, 0.0)  # lam == 0
    assert c.interval == 8 and c.events[-1].zero_signal
    step = merge_with_lambda(c, step, float("nan"))
    assert c.interval == 8 and c.events[-1].nonfinite_signal
    step = merge_with_lambda(c, step, 1.0)  # prev is NaN
    assert c.interval == 8 and c.events[-1].nonfinite_signal
    step = merge_with_lambda(c, step, 0.5)  # back to normal
    assert c.interval == 24 and not c.events[-1].zero_signal


def test_state_dict_round_trip():
    rng = random.Random(3)
    a = MergeController(outer_ratio=0.5, cold_start=1)
    step = 0
    for _ in range(150):
        step += 1
        if a.observe(step, rng.uniform(0.5, 3.0)):
            a.next_interval_after_merge(step, rng.uniform(1, 20))
    a.observe(step + 1, 1.0)
    step += 1
    b = MergeController.from_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert b.events == a.events and isinstance(b.events[0], MergeEvent)
    for _ in range(150):
        step += 1
        x = rng.uniform(0.5, 3.0)
        ra, rb = a.observe(step, x), b.observe(step, x)
        assert ra == rb
        if ra:
            l1 = rng.uniform(1, 20)
            assert a.next_interval_after_merge(step, l1) == b.next_interval_after_merge(step, l1)
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize(
    "lams, expected, trend",
    [([1.0, 2.0, 3.0], 4, "rising"), ([3.0, 2.0, 1.0], 16, "falling"), ([1.0, 1.01, 1.0], 8, "balanced")],
)
@pytest.mark.parametrize("method", ["slope", "endpoints"])
def test_paper_variant_trend(lams, expected, trend, method):
    c = MergeController(variant="paper", cold_start=0, window=3, trend_method=method)
    step = 0
    for lam in lams[:-1]:
        step = merge_with_lambda(c, step, lam)
        assert c.interval == 8  # fewer than `window` Lambdas
    step = merge_with_lambda(c, step, lams[-1])
    assert c.interval == expected and c.events[-1].trend == trend


def test_fusion_weights_table():
    assert fusion_weights(2, 70) == (0.5, 0.5)
    assert fusion_weights(2, 71) == (0.4, 0.6)
    assert fusion_weights(1, 70) == (0.6, 0.4)
    assert fusion_weights(0, 128) == (0.5, 0.5)
    assert fusion_weights(1, 10, boundary=5) == (0.5, 0.5)
    c = MergeController(initial_interval=20)
    run_to_merge(c, 0)
    assert c.fusion_weights() == fusion_weights(c.activations, c.interval)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(min_interval=10, max_interval=5), "min_interval"),
        (dict(initial_interval=0), "initial_interval"),
        (dict(initial_interval=-3), "initial_interval"),
        (dict(threshold_factor=0), "threshold_factor"),
        (dict(threshold_factor=-1.0), "threshold_factor"),
        (dict(variant="nope"), "variant"),
        (dict(normalize_by="nope"), "normalize_by"),
        (dict(cold_start=-1), "cold_start"),
        (dict(outer_ratio=-0.5), "outer_ratio"),
        (dict(max_activations=0), "max_activations"),
        (dict(window=1), "window"),
        (dict(gamma_up=0.5), "gamma_up"),
    ],
)
def test_invalid_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MergeController(**kwargs)


def test_controller_module_does_not_import_torch():
    code = "import sys, aimm.merging.controller, aimm.merging; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------- reference (section 4b)
class Ref4b:
    """Literal transcription of the section 4b pseudo-code (mean = sum / len, as the release)."""

    def __init__(self, S0=8, outer0=8, S_min=2, S_max=128, cold_start=3, threshold_factor=2.0, adaptive=True):
        self.S_min, self.S_max, self.cold_start = S_min, S_max, cold_start
        self.threshold_factor, self.adaptive = threshold_factor, adaptive
        self.S = S0; self.ratio = outer0 / S0; self.outer = S0 * self.ratio; self.planned = S0
        self.collected = []; self.threshold = None; self.A = 0; self.lambdas = []; self.last_merge = 0

    def observe(self, step, L):
        if self.threshold is None:
            self.collected.append(L)
            if len(self.collected) == math.floor(2 * self.S / 3) + 1:
                self.threshold = self.threshold_factor * (sum(self.collected) / len(self.collected))
        elif L >= self.threshold:
            self.A += 1
        elif step >= self.planned + self.S:
            self.A += 1
        return (step >= self.planned and self.A >= 1) or self.A >= 3

    def merged(self, step, l1):
        lam = l1 / self.S
        if self.adaptive and len(self.lambdas) > self.cold_start:
            prev = self.lambdas[-1]
            if lam >= prev:
                self.S = max(self.S_min, int(self.S / (lam / prev)))
                if self.S >= 64:
                    self.S = int(self.S / 2)
            else:
                self.S = min(self.S_max, int(self.S * (prev / lam + (1 if self.S < 64 else 0.5))))
            self.outer = int(self.S * self.ratio)
        self.lambdas.append(lam)
        self.planned = step + self.S; self.last_merge = step
        self.collected = []; self.threshold = None; self.A = 0
        return self.S


@pytest.mark.parametrize(
    "seed, S0, outer0, cold_start",
    [(0, 8, 8, 3), (1, 8, 8, 3), (2, 8, 4, 3), (3, 16, 8, 1), (4, 8, 8, 0), (5, 40, 40, 2)],
)
def test_matches_section_4b_reference(seed, S0, outer0, cold_start):
    rng = random.Random(seed)
    ref = Ref4b(S0=S0, outer0=outer0, cold_start=cold_start)
    c = MergeController(initial_interval=S0, outer_ratio=outer0 / S0, cold_start=cold_start)
    merges, intervals = [], []
    for step in range(1, 801):
        L = 3.0 + rng.random() if rng.random() < 0.06 else 1.0 + 0.2 * rng.random()
        r_ref, r_c = ref.observe(step, L), c.observe(step, L)
        assert r_ref == r_c, step
        assert (ref.A, ref.threshold) == (c.activations, c.threshold)
        if r_ref:
            l1 = ref.S * rng.lognormvariate(0.0, 0.8)
            outer_before = int(ref.outer)
            assert c.outer_steps == outer_before
            assert c.fusion_weights() == fusion_weights(ref.A, ref.S)
            s_ref, s_c = ref.merged(step, l1), c.next_interval_after_merge(step, l1)
            assert s_ref == s_c and int(ref.outer) == c.outer_steps
            assert c.events[-1].outer_steps == outer_before
            merges.append(step)
            intervals.append(s_c)
    assert c.lambdas == ref.lambdas
    assert [e.step for e in c.events] == merges
    assert len(merges) >= 8 and len(set(intervals)) >= 3


# ------------------------------------------------------------------- the rules as functions
def test_official_next_interval_rules():
    from aimm.merging import ControllerConfig, official_next_interval

    cfg = ControllerConfig()
    assert official_next_interval(8, 2.0, 1.0, cfg) == (4, False, False)  # rising: 8 / 2
    assert official_next_interval(100, 1.25, 1.0, cfg) == (40, False, False)  # 80 >= 64: halved
    assert official_next_interval(8, 0.5, 1.0, cfg) == (24, False, False)  # falling: 8 * (2 + 1)
    assert official_next_interval(72, 0.5, 1.0, cfg) == (128, False, False)  # 72 * 2.5 -> S_max
    assert official_next_interval(8, 0.0, 1.0, cfg) == (8, True, False)
    assert official_next_interval(8, float("inf"), 1.0, cfg) == (8, False, True)


def test_paper_trend_and_interval():
    from aimm.merging import ControllerConfig, paper_next_interval, paper_trend

    assert paper_trend([1.0, 2.0], window=3) == (None, False, False)
    assert paper_trend([5.0, 1.0, 2.0, 3.0], window=3) == ("rising", False, False)
    assert paper_trend([3.0, 2.0, 1.0], window=3, trend_method="endpoints")[0] == "falling"
    assert paper_trend([0.0, 0.0, 0.0], window=3) == ("balanced", True, False)
    cfg = ControllerConfig(gamma_up=3.0, max_interval=20)
    assert paper_next_interval(8, "rising", cfg) == 4
    assert paper_next_interval(8, "falling", cfg) == 20
    assert paper_next_interval(8, "balanced", cfg) == 8


def test_config_is_frozen_validated_and_the_state_dict_is_its_fields():
    from dataclasses import FrozenInstanceError, asdict

    from aimm.merging import ControllerConfig

    cfg = ControllerConfig(threshold_factor=3, initial_interval=4)
    assert cfg.threshold_factor == 3.0 and isinstance(cfg.threshold_factor, float)
    with pytest.raises(FrozenInstanceError):
        cfg.initial_interval = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="halve_at"):
        ControllerConfig(halve_at=0)
    c = MergeController(cfg)
    assert c.state_dict()["config"] == asdict(cfg)
    assert MergeController(cfg, initial_interval=6).interval == 6


def test_recording_a_merge_that_was_not_asked_for_is_refused():
    c = MergeController(initial_interval=8)
    assert not c.observe(1, 1.0)
    with pytest.raises(ValueError, match="no merge was asked for"):
        c.next_interval_after_merge(1, 1.0)
