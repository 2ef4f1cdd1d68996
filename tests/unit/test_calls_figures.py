"""The figures of `loom bench functions`, from hand-computed samples."""

from __future__ import annotations

import pytest

from loom.benchmarks.calls_figures import CallsFigures, nearest_rank

# Four calls submitted 0.1 s apart over a 0.4 s submit phase; call 1 never completes.
SUBMITTED_AT_S = [100.0, 100.1, 100.2, 100.3]
COMPLETED_AT_S: list[float | None] = [100.5, None, 100.4, 101.3]


def test_figures_follow_the_definitions_on_hand_computed_samples() -> None:
    figures = CallsFigures.from_times(
        submitted_at_s=SUBMITTED_AT_S, completed_at_s=COMPLETED_AT_S, submit_s=0.4
    )
    # latencies 0.5, 0.2, 1.0 s → sorted 0.2, 0.5, 1.0; nearest rank: p50 is the 2nd
    # (ceil(1.5)), p99 the 3rd (ceil(2.97)); the run is 100.0 → 101.3, 1.3 s.
    assert figures.calls == 4
    assert figures.submitted_per_s == pytest.approx(4 / 0.4)
    assert figures.completed_per_s == pytest.approx(3 / 1.3)
    assert figures.p50_ms == pytest.approx(500.0)
    assert figures.p99_ms == pytest.approx(1000.0)
    assert figures.lost == 1
    assert figures.completed == 3


def test_an_explicit_run_duration_replaces_the_one_the_samples_give() -> None:
    figures = CallsFigures.from_times(
        submitted_at_s=SUBMITTED_AT_S, completed_at_s=COMPLETED_AT_S, submit_s=0.4, run_s=2.0
    )
    assert figures.completed_per_s == pytest.approx(1.5)


def test_no_completed_call_means_everything_lost_and_no_latency() -> None:
    figures = CallsFigures.from_times(
        submitted_at_s=[1.0, 2.0], completed_at_s=[None, None], submit_s=1.0
    )
    assert figures == CallsFigures(
        calls=2, submitted_per_s=2.0, completed_per_s=0.0, p50_ms=None, p99_ms=None, lost=2
    )


def test_nearest_rank_of_one_to_a_hundred_is_the_percent_itself() -> None:
    values = [float(v) for v in range(1, 101)]
    assert nearest_rank(values, 50.0) == 50.0
    assert nearest_rank(values, 99.0) == 99.0
    assert nearest_rank(values, 100.0) == 100.0
    assert nearest_rank([7.0], 1.0) == 7.0


def test_a_completion_before_its_submit_is_a_measuring_bug() -> None:
    with pytest.raises(AssertionError):
        CallsFigures.from_times(submitted_at_s=[5.0], completed_at_s=[4.0], submit_s=1.0)


def test_json_has_the_per_system_fields_of_the_report() -> None:
    figures = CallsFigures(
        calls=10,
        submitted_per_s=1234.5678,
        completed_per_s=999.94,
        p50_ms=1.23456,
        p99_ms=None,
        lost=0,
    )
    assert figures.to_json() == {
        "submitted_per_s": 1234.6,
        "completed_per_s": 999.9,
        "p50_ms": 1.235,
        "p99_ms": None,
        "lost": 0,
    }
