"""The progress bar's figures: rates and ETAs over answered items only, in named units."""

from __future__ import annotations

import pytest

from llava_local.progress import RunProgress


def test_failed_and_skipped_items_count_but_make_no_rate() -> None:
    """Items that failed move the count, skipped ones shrink the total; neither is a rate."""
    bar = RunProgress("captioning", total=10, unit="picture", enabled=False)
    bar.failed()
    bar.failed()
    bar.skip()
    assert (bar.completed, bar.total) == (2, 9)
    assert bar.rate is None
    assert bar.eta_s is None
    assert bar.rate_text() == "-- s/picture"
    assert bar.eta_text() == "ETA -:--:--"
    assert bar.count_text() == "2/9 pictures"


def test_rate_and_eta_come_from_the_answers_and_their_seconds() -> None:
    """Two answers of 2 s and 4 s after two broken files: 3 s per picture, and the
    five left take 15 s."""
    bar = RunProgress("captioning", total=9, unit="picture", enabled=False)
    bar.failed()
    bar.failed()
    bar.answered(2.0)
    bar.answered(4.0)
    assert bar.rate == pytest.approx(1 / 3)
    assert bar.eta_s == pytest.approx(15.0)
    assert (bar.rate_text(), bar.eta_text()) == ("3.0 s/picture", "ETA 0:00:15")
    assert bar.count_text() == "4/9 pictures"


def test_a_fast_rate_reads_per_second_in_its_unit() -> None:
    """Faster than one a second, the rate is given per second in the unit counted."""
    bar = RunProgress("digits", total=4, unit="answer", enabled=False)
    bar.answered(0.25)
    bar.answered(0.25)
    assert bar.rate_text() == "4.00 answers/s"
    assert bar.eta_s == pytest.approx(0.5)
    bar.answered(0.25)
    bar.answered(0.25)
    assert (bar.eta_s, bar.eta_text()) == (0.0, "ETA 0:00:00")
