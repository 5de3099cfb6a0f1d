"""Taking a run over from another host: its record is taken only once the old host's run has
put its last files in the store (its state no longer says running), or after SETTLE seconds
when that host is gone altogether."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def _state(*stages: str, state: str = "running") -> bytes:
    history = [{"time": f"2026-12-08T00:0{i}:00+00:00", "state": "running", "stage": s, "error": None}
               for i, s in enumerate(stages)]  # fmt: skip
    return json.dumps({"state": state, "stage": stages[-1], "history": history}).encode()


def test_a_run_that_went_on_while_the_store_was_away_stays_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store holds the state of the run's first stage (and the notebooks pushed once it was
    back); this host's directory went on to the end: it is the run, not the store's copy."""
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path))
    monkeypatch.setattr(takeover, "SETTLE", 0.1)
    run = tmp_path / "ir-0123456789ab"
    (run / "notebooks").mkdir(parents=True)
    (run / "request.json").write_text("{}")
    local = _state("00-acquire", "10-clean", "50-verify", state="error")
    (run / "state.json").write_bytes(local)
    (run / "notebooks" / "00-acquire.ipynb").write_text("{}")

    class Stale:
        def __init__(self, cfg: object) -> None:
            pass

        def names(self, run: str) -> list[str]:
            return ["request.json", "state.json", "notebooks/00-acquire.ipynb"]

        def read(self, run: str, name: str) -> bytes:
            return _state("00-acquire")

        def download(self, run: str, name: str, dest: Path) -> None:
            raise AssertionError(f"took the store's {name} over this host's own, later run")

    monkeypatch.setattr(takeover, "ObjectStore", Stale)
    assert takeover.prepare(None, run.name) == "local"  # type: ignore[arg-type]
    assert (run / "state.json").read_bytes() == local and (run / "notebooks" / "00-acquire.ipynb").exists()


def test_whose_state_is_ahead() -> None:
    first, later = _state("00-acquire"), _state("00-acquire", "10-clean")
    assert takeover._ahead(later, first) and takeover._ahead(first, first)
    assert not takeover._ahead(first, later)  # another host went on from ours
    assert not takeover._ahead(_state("00-acquire", "20-migrate"), later)  # went apart: the record wins
    assert not takeover._ahead(b"not json", first) and not takeover._ahead(first, b"[]")
