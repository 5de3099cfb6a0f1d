"""The EBS block reads' AIMD window: halved by a throttle, widened by one per window of
successes, never past its ceiling nor under one; reads beyond it wait."""

from __future__ import annotations

import threading

from imaging.clouds.ec2 import Window


def test_window_halves_on_throttle_and_grows_back_by_one_per_window() -> None:
    w = Window(ceiling=16, start=8)
    w.throttled()
    assert w.size == 4 and w.throttles == 1
    for _ in range(3):
        w.succeeded()
    assert w.size == 4  # a window's worth of successes not yet seen
    w.succeeded()
    assert w.size == 5
    for _ in range(200):
        w.succeeded()
    assert w.size == w.peak == 16  # up to the ceiling, not past it
    for _ in range(10):
        w.throttled()
    assert w.size == 1


def test_reads_beyond_the_window_wait_for_one_to_end() -> None:
    w = Window(ceiling=2, start=2)
    entered = threading.Event()
    with w, w:
        thread = threading.Thread(target=lambda: (w.__enter__(), entered.set(), w.__exit__()))
        thread.start()
        assert not entered.wait(0.2)  # a third read waits while two are in flight
    thread.join(timeout=5)
    assert entered.is_set() and w.in_flight == 0
