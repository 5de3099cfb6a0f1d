"""The worker's supervision of a run when the database goes away: a short absence changes
nothing, a long one (past the time after which another host may take the request over) stops
the run and says why; a request no longer the worker's (cancelled, taken over) stops it at once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from imaging.errors import StoreError
from imaging.service import settings
from imaging.service.worker import RequestRunner


class Context:
    def should_abort(self) -> bool:
        return False

    def abort_reason(self) -> None:
        return None


class Store:
    """Answers held_by from a script: True/False, or an exception to raise."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    def held_by(self, request_id: str, worker: str) -> bool:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)


class Request:
    id = "ir-0123456789ab"
    stage = "30-bootable"


def supervise(
    tmp_path: Path, answers: list[Any], seconds: float = 30
) -> tuple[tuple[str | None, str | None], float]:
    conf = settings.Settings(state_dir=tmp_path, worker={"check_seconds": 0.2, "heartbeat_seconds": 1,
                                                         "stalled_seconds": 2})  # fmt: skip
    runner = RequestRunner(conf, Store(answers), mailer=None, name="h:1")  # type: ignore[arg-type]
    proc = subprocess.Popen(["sleep", str(seconds)])
    t0 = time.monotonic()
    try:
        outcome = runner._supervise(Context(), Request(), proc, tmp_path)  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait()
    return outcome, time.monotonic() - t0


def test_a_short_absence_of_the_database_changes_nothing(tmp_path: Path) -> None:
    away = StoreError("the database is unreachable: connection refused", 503)
    outcome, seconds = supervise(tmp_path, [away, away, True], seconds=3)
    assert outcome == ("30-bootable", None) and seconds >= 2.5  # the run ended by itself


def test_a_long_absence_stops_the_run(tmp_path: Path) -> None:
    away = StoreError("the database is unreachable: connection refused", 503)
    outcome, seconds = supervise(tmp_path, [away])
    assert outcome == ("30-bootable", "database") and 2 <= seconds < 6


def test_a_request_no_longer_its_own_stops_the_run_at_once(tmp_path: Path) -> None:
    outcome, seconds = supervise(tmp_path, [False])
    assert outcome == ("30-bootable", "lost") and seconds < 2
