"""Taking a run over from another host: its record is taken only once the old host's run has
put its last files in the store (its state no longer says running), or after SETTLE seconds
when that host is gone altogether."""

from __future__ import annotations

import json
import time

import pytest

from imaging.service import takeover


class Store:
    """``state.json`` as the old host writes it: running for the first ``reads`` reads."""

    def __init__(self, reads: int) -> None:
        self.reads = reads

    def read(self, run: str, name: str) -> bytes:
        assert name == "state.json"
        self.reads -= 1
        state = "running" if self.reads > 0 else "error"
        return json.dumps({"state": state, "stage": "20-migrate"}).encode()


def test_the_old_run_s_last_files_are_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(takeover, "SETTLE", 10.0)
    running = json.dumps({"state": "running"}).encode()
    t0 = time.monotonic()
    state = takeover._settled(Store(reads=3), "ir-0123456789ab", running)  # type: ignore[arg-type]
    assert json.loads(state)["state"] == "error" and 2 <= time.monotonic() - t0 < 5


def test_a_host_gone_altogether_is_waited_for_no_longer_than_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(takeover, "SETTLE", 1.5)
    running = json.dumps({"state": "running"}).encode()
    t0 = time.monotonic()
    state = takeover._settled(Store(reads=100), "ir-0123456789ab", running)  # type: ignore[arg-type]
    assert json.loads(state)["state"] == "running" and time.monotonic() - t0 < 4
    # A state that does not say running is taken at once.
    done = json.dumps({"state": "error"}).encode()
    assert takeover._settled(Store(reads=100), "ir-0123456789ab", done) == done  # type: ignore[arg-type]
