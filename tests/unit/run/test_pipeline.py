"""The pipeline's own process: what an interrupt does while a stage kernel is being launched."""

from __future__ import annotations

import os
import signal

import pytest

from imaging.run import pipeline


def test_an_interrupt_while_a_kernel_is_launched_waits_for_the_end_of_the_launch() -> None:
    with pipeline._signals_held() as held:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: noted, not raised here
        os.kill(os.getpid(), signal.SIGTERM)
        reached = True
    assert reached and held == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # delivered as it would have been (Kernel does this)
        signal.raise_signal(held[0])
