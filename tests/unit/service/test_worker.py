"""The worker's supervision of a run when the database goes away: a short absence changes
nothing, a long one (past the worker's lease: the time after which another host may take the
request over) stops the run and says why; a request no longer the worker's (cancelled, taken
over) stops it at once. How a run ended is recorded once the database answers again."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from imaging.errors import StoreError
from imaging.service import settings
from imaging.service.worker import RequestRunner


class Job:
    id = 7
    worker_id = 3


class Context:
    job = Job()

    def should_abort(self) -> bool:
        return False

    def abort_reason(self) -> None:
        return None


class Store:
    """Answers held_by from a script: True/False, or an exception to raise."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.changes: list[tuple[str, str, dict[str, Any]]] = []

    def _answer(self) -> Any:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def heartbeat(self, worker_id: int) -> None:
        assert worker_id == Job.worker_id
        self._answer()
        self.changes.append(("heartbeat", "", {"at": time.monotonic()}))

    def held_by(self, request_id: str, worker: str, job: int | None = None) -> bool:
        assert job == Job.id
        return bool(self._answer())

    def transition(self, request_id: str, action: str, actor: Any, reason: str = "", **kw: Any) -> Any:
        self._answer()
        self.changes.append((action, reason, kw))
        return Request()


class Request:
    id = "ir-0123456789ab"
    stage = "30-bootable"


def runner(tmp_path: Path, store: Store) -> RequestRunner:
    conf = settings.Settings(state_dir=tmp_path, worker={"check_seconds": 0.2, "heartbeat_seconds": 1,
                                                         "stalled_seconds": 3})  # fmt: skip
    return RequestRunner(conf, store, mailer=Mailer(), name="h:1")  # type: ignore[arg-type]


class Mailer:
    def request_finished(self, req: Any) -> int:
        return 0


def supervise(
    tmp_path: Path, answers: list[Any], seconds: float = 30
) -> tuple[tuple[str | None, str | None], float]:
    runner_ = runner(tmp_path, Store(answers))
    proc = subprocess.Popen(["sleep", str(seconds)])
    t0 = time.monotonic()
    try:
        outcome = runner_._supervise(Context(), Request(), proc, tmp_path)  # type: ignore[arg-type]
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


def test_how_a_run_ended_is_recorded_once_the_database_answers(tmp_path: Path) -> None:
    away = StoreError("the database is unreachable: connection refused", 503)
    store = Store([away, away, True])
    t0 = time.monotonic()
    runner(tmp_path, store).finish(Context(), Request.id, "complete", "completed (booted)")  # type: ignore[arg-type]
    assert time.monotonic() - t0 >= 4  # tried every 2 s until it answered
    assert [(a, r, kw["job"]) for a, r, kw in store.changes] == [("complete", "completed (booted)", Job.id)]
    # Refused (the request moved on: taken over meanwhile): nothing more to do.
    store = Store([StoreError("cannot complete a request that is approved", 409)])
    runner(tmp_path, store).finish(Context(), Request.id, "complete", "completed (booted)")  # type: ignore[arg-type]
    assert store.changes == []


def test_a_stopping_worker_keeps_its_heartbeat_until_its_run_is_recorded(tmp_path: Path) -> None:
    # Procrastinate stops the heartbeat when told to stop; a run cleaning up for longer than
    # stalled_seconds would have its request taken for a lost worker's.
    away = StoreError("the database is unreachable: connection refused", 503)
    store = Store([True, away, True])
    t0 = time.monotonic()
    with runner(tmp_path, store)._beating(Context()):  # type: ignore[arg-type]
        time.sleep(3.5)
    beats = [kw["at"] - t0 for _, _, kw in store.changes]
    assert len(beats) == 3 and beats[0] < 0.5 and 3 <= beats[-1] < 3.5  # one lost to the database
    time.sleep(1.2)
    assert len(store.changes) == 3  # and no more once the run is recorded
