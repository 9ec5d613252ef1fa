"""The r-driven loss schedule on scripted loss sequences."""

from __future__ import annotations

import math

from cdkd.distill.schedule import LossSchedule


def _feed(s: LossSchedule, pairs) -> list[str]:
    return [m for t, st in pairs if (m := s.update(t, st))]


def test_stages_follow_r() -> None:
    s = LossSchedule(ema_decay=0.5, warmup=3)
    assert s.weights == (0.2, 0.4, 0.4) and s.stage_name == "early"
    assert _feed(s, [(1.0, 1.0)] * 10) == []  # r = 1: stays early
    events = _feed(s, [(0.7, 1.0)] * 10)  # teacher reconstructs better: r -> 0.7 < 0.85
    assert len(events) == 1 and "early -> middle" in events[0]
    assert s.weights == (0.6, 0.2, 0.2)
    assert _feed(s, [(0.85, 1.0)] * 10) == []  # 0.85 <= r < 0.95: stays middle
    events = _feed(s, [(1.0, 1.0)] * 10)
    assert len(events) == 1 and "middle -> late" in events[0]
    assert s.weights == (0.7, 0.15, 0.15)
    assert _feed(s, [(0.5, 1.0)] * 10) == []  # stages never go back


def test_late_needs_middle_first() -> None:
    s = LossSchedule(ema_decay=0.5, warmup=0)
    _feed(s, [(1.2, 1.0)] * 20)  # r >= 0.95 from the start is not enough
    assert s.stage_name == "early"


def test_ema_ignores_single_noisy_batches() -> None:
    s = LossSchedule(ema_decay=0.9, warmup=5)
    _feed(s, [(1.0, 1.0)] * 30)
    assert s.update(0.1, 1.0) is None  # one outlier batch: r_ema ~ 0.91
    assert s.stage_name == "early"
    assert 0.85 < s.ratio < 1.0


def test_warmup_blocks_early_transitions() -> None:
    s = LossSchedule(ema_decay=0.0, warmup=5)
    assert _feed(s, [(0.1, 1.0)] * 5) == []
    assert len(_feed(s, [(0.1, 1.0)])) == 1


def test_non_finite_losses_are_ignored_and_ratio_nan_before_data() -> None:
    s = LossSchedule()
    assert math.isnan(s.ratio)
    s.update(float("nan"), 1.0)
    assert s.updates == 0


def test_fixed_schedule_and_state_round_trip() -> None:
    f = LossSchedule("fixed", (0.5, 0.25, 0.25), warmup=0)
    _feed(f, [(0.1, 1.0)] * 10)
    assert f.weights == (0.5, 0.25, 0.25) and f.stage_name == "fixed"
    a = LossSchedule(ema_decay=0.8, warmup=2)
    _feed(a, [(0.6, 1.0)] * 6)
    b = LossSchedule(ema_decay=0.8, warmup=2)
    b.load_state_dict(a.state_dict())
    seq = [(0.9, 1.0), (1.0, 0.9)] * 5
    assert _feed(a, seq) == _feed(b, seq)
    assert a.ratio == b.ratio and a.stage == b.stage
