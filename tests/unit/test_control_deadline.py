import pytest

from celery_control import DeadlineExceeded, call_deadline


def test_a_call_without_a_step_deadline_keeps_its_own():
    assert call_deadline(30.0, 0.0, 1000.0) == 30.0


def test_a_call_is_cut_to_what_is_left_of_its_step_and_takes_at_least_a_second():
    assert call_deadline(30.0, 1012.5, 1000.0) == 12.5
    assert call_deadline(30.0, 1100.0, 1000.0) == 30.0
    assert call_deadline(30.0, 1000.2, 1000.0) == 1.0


def test_a_call_after_its_step_s_deadline_is_not_tried():
    with pytest.raises(DeadlineExceeded, match="the step's deadline passed 3.0 s ago"):
        call_deadline(30.0, 997.0, 1000.0)
