"""Reward-hacking detector: fires on the gold-falls-while-proxy-rises pattern, not on noise or joint decline."""

from __future__ import annotations

import json
import random

import pytest

from rlhfkit.trainers.rl.hacking import RewardHackingDetector


def _hacking_curve() -> list[tuple[int, float, float]]:
    """Gold rises 0..8 (points 0-8) then falls 0.8 per point; the proxy rises 0.5 per point throughout."""
    points = []
    for i in range(16):
        gold = float(i) if i <= 8 else 8.0 - 0.8 * (i - 8)
        points.append((10 * i, 0.5 * i, gold))
    return points


def test_hacking_curve_fires_at_the_right_point():
    det = RewardHackingDetector(window=3, min_drop=0.1, patience=2)
    fired_at = []
    for step, proxy, gold in _hacking_curve():
        if det.update(step, proxy, gold):
            fired_at.append(step)
    # Worked by hand: smoothed gold (window 3) peaks at point 9: (7 + 8 + 7.2) / 3 = 7.4, gain 7.4 over the
    # first point, threshold 0.74. Point 10: 7.2 (drop 0.2); point 11: 6.4 (drop 1.0, streak 1);
    # point 12: 5.6 (drop 1.8, streak 2 = patience) -> fires at step 120.
    assert det.fired and det.fired_step == 120 and fired_at[0] == 120
    assert fired_at == list(range(120, 160, 10))  # stays fired
    assert det.best_step == 80 and det.best_heldout == 8.0  # the raw gold peak: the checkpoint to keep
    assert det.peak_step == 90
    assert "step 90" in det.reason and "best held-out checkpoint: step 80" in det.reason


def test_patience_and_min_drop_delay_firing():
    late = RewardHackingDetector(window=3, min_drop=0.1, patience=3)
    deep = RewardHackingDetector(window=3, min_drop=0.5, patience=2)
    for step, proxy, gold in _hacking_curve():
        late.update(step, proxy, gold)
        deep.update(step, proxy, gold)
    assert late.fired_step == 130
    # min_drop 0.5: needs a smoothed drop > 3.7: point 13 drops 7.4 - 4.8 = 2.6, 14: 3.4, 15: 4.2 -> streak 1
    assert not deep.fired


@pytest.mark.parametrize("seed", range(40))
def test_healthy_noisy_run_never_fires(seed):
    rng = random.Random(seed)
    det = RewardHackingDetector()
    for i in range(60):
        level = min(i / 15, 1.0)  # both rise for 15 points, then plateau at 1.0
        assert not det.update(i, level + rng.gauss(0, 0.03), level + rng.gauss(0, 0.03)), (seed, i, det.reason)


def test_noise_floor_from_standard_errors():
    """A small held-out gain that wanders within its evaluation noise (held-out means over 100 prompts,
    SE 0.1) fires the gain-relative rule alone but not once the standard errors are given; a real fall of
    several standard errors still fires."""
    proxy = [1.0, 1.35, 1.5, 1.6, 1.45, 1.5, 1.6, 1.6, 1.5, 1.6]
    wander = [0.05, 0.26, 0.23, 0.04, 0.18, 0.08, 0.06, 0.02, 0.23, 0.10]
    fall = [0.05, 0.26, 0.23, 0.10, -0.20, -0.40, -0.50, -0.60, -0.60, -0.70]
    for heldout, with_se, fires in ((wander, False, True), (wander, True, False), (fall, True, True)):
        det = RewardHackingDetector(window=3, min_drop=0.1, patience=2, z=2.0)
        for i, (p, h) in enumerate(zip(proxy, heldout)):
            det.update(10 * i, p, h, 0.1 if with_se else None)
        assert det.fired == fires, (heldout, with_se, det.reason)
    # worked by hand for the fall: smoothed peak (0.05+0.26+0.23)/3 = 0.18 at point 2; noise floor
    # 2·sqrt(2·0.01/3) = 0.163; point 4: (0.23+0.10-0.20)/3 = 0.043, drop 0.137 (below the floor);
    # point 5: -0.167, drop 0.347 (streak 1); point 6: -0.367 (streak 2) -> fires at step 60
    assert det.fired_step == 60 and "noise floor 0.163" in det.reason
    with pytest.raises(ValueError, match="heldout_se"):
        RewardHackingDetector().update(0, 1.0, 1.0, -0.1)


def test_flat_proxy_with_a_falling_heldout_score_is_drift_not_hacking():
    """The β = 2 control of the hacking demo: the held-out score falls well beyond its noise while the proxy
    moves 0.012, inside its own noise (SE 0.05 per evaluation). With the proxy's standard errors the detector
    stays silent; without them any rise counts and it fires. A proxy that climbs beyond its noise still fires."""
    heldout = [0.0, 0.15, 0.21, 0.20, 0.14, 0.08, 0.03, 0.003, 0.0, -0.02]
    flat = [0.500, 0.508, 0.510, 0.515, 0.518, 0.520, 0.521, 0.522, 0.522, 0.522]
    climbing = [0.5 + 0.15 * i for i in range(10)]
    for proxy, proxy_se, fires in ((flat, None, True), (flat, 0.05, False), (climbing, 0.05, True)):
        det = RewardHackingDetector(window=3, min_drop=0.1, patience=2, z=2.0)
        for i, (p, h) in enumerate(zip(proxy, heldout)):
            det.update(10 * i, p, h, 0.02, proxy_se)
        assert det.fired == fires, (proxy, proxy_se, det.reason)
    # the rise the climbing proxy made must clear 2·sqrt(2·0.05²/3) = 0.0816, which 0.15 per point does
    assert "noise floor 0.0816" in det.reason
    with pytest.raises(ValueError, match="proxy_se"):
        RewardHackingDetector().update(0, 1.0, 1.0, 0.1, float("nan"))


def test_both_falling_is_not_hacking():
    det = RewardHackingDetector(window=3, min_drop=0.1, patience=2)
    for i in range(20):
        level = float(i) if i <= 8 else 8.0 - 0.8 * (i - 8)  # proxy and gold rise and fall together
        det.update(i, 0.5 * level, level)
    assert not det.fired and det.best_step == 8


def test_no_gain_means_nothing_to_lose():
    det = RewardHackingDetector()
    for i in range(10):
        det.update(i, float(i), -float(i))  # gold never rose above its first value
    assert not det.fired


def test_a_fall_from_the_start_beyond_its_noise_is_hacking():
    """Seed 4's beta = 0 run of the hacking demo: the held-out score never rose above its start (0.05) and fell
    to -0.78 (SE ~0.06) while the proxy rose from 0.42 to 2.40 (SE ~0.02). With standard errors the fall is
    measured against its noise and fires; the same fall within its noise does not."""
    gold = [0.051, 0.024, -0.406, -0.396, -0.503, -0.304, -0.347, -0.529, -0.611]
    proxy = [0.424, 1.262, 1.713, 1.858, 2.069, 2.101, 2.174, 2.145, 2.191]
    det = RewardHackingDetector()
    for i, (p, g) in enumerate(zip(proxy, gold)):
        det.update(5 * i, p, g, heldout_se=0.1, proxy_se=0.05)
    assert det.fired and det.fired_step == 20 and "never rose above its start" in det.reason
    wander = RewardHackingDetector()
    for i, p in enumerate(proxy):
        wander.update(5 * i, p, 0.05 - 0.01 * (i % 3), heldout_se=0.1, proxy_se=0.05)
    assert not wander.fired


def test_state_round_trip_continues_a_resumed_run():
    points = _hacking_curve()
    full = RewardHackingDetector(window=3, min_drop=0.1, patience=2)
    for p in points:
        full.update(*p)
    first = RewardHackingDetector(window=3, min_drop=0.1, patience=2)
    for p in points[:12]:  # stop after the first suspicious point (streak 1)
        first.update(*p)
    assert first.streak == 1 and not first.fired
    state = json.loads(json.dumps(first.state_dict()))
    resumed = RewardHackingDetector()  # other settings: the state brings its own
    resumed.load_state_dict(state)
    assert (resumed.window, resumed.patience, resumed.streak) == (3, 2, 1)
    for p in points[12:]:
        resumed.update(*p)
    assert (resumed.fired_step, resumed.best_step, resumed.reason) == (full.fired_step, full.best_step, full.reason)
    assert resumed.state_dict() == full.state_dict()


def test_bad_points_raise():
    det = RewardHackingDetector()
    det.update(5, 0.0, 0.0)
    with pytest.raises(ValueError, match="does not come after"):
        det.update(5, 0.1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        det.update(6, float("nan"), 0.1)
    with pytest.raises(ValueError):
        RewardHackingDetector(window=0)
