"""Operating the service: ``/metrics`` read from the database at scrape time, ``/healthz`` and
``/readyz`` (503 with a reason when the database is away), ``retention:`` parsed and applied to
a host's runs directory, a request left for want of space, the log as JSON lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from imaging import config
from imaging.errors import ParameterError
from imaging.service import api, logs, retention, settings
from imaging.service.store import Actor, State, Store

from .test_store import WORKER, in_state, users


def make_settings(tmp_path: Path, database: str, **extra: Any) -> settings.Settings:
    return settings.Settings(**{"state_dir": tmp_path, "instances": {"i-1": "sample:kvm"}, "database_url": database,
                                "secret_key": "the-test-signing-key", **extra})  # fmt: skip


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def taken(store: Store) -> None:
    """The jobs of requests claimed here by hand marked as a worker would have them."""
    with store.session() as s:
        s.execute(text("UPDATE procrastinate_jobs j SET status = 'doing' FROM image_requests r "
                       "WHERE r.job_id = j.id AND r.state = 'running'"))  # fmt: skip
        s.execute(text("UPDATE procrastinate_jobs j SET status = 'succeeded' FROM image_requests r "
                       "WHERE r.job_id = j.id AND r.state IN ('completed', 'error')"))  # fmt: skip


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    s = Store(database)
    yield s
    s.close()


def test_metrics_read_from_the_database(tmp_path: Path, database: str, store: Store) -> None:
    alice, _, root = users(store)
    running = [in_state(store, alice, root, State.running) for _ in range(2)]
    waiting = in_state(store, alice, root, State.approved)
    in_state(store, alice, root, State.pending)
    done = in_state(store, alice, root, State.completed)
    store.transition(running[0], "stage", WORKER, worker="w1", stage="00-acquire")
    with store.session() as s:  # a completed run's result, as the worker records it
        s.execute(text("UPDATE image_requests SET result = :r WHERE id = :id"),
                  {"r": json.dumps({"size_bytes": 12345, "boot": {"verdict": "booted"}}), "id": done})  # fmt: skip
        s.execute(text("INSERT INTO procrastinate_workers DEFAULT VALUES"))
    taken(store)
    with TestClient(api.create_app(make_settings(tmp_path, database), recover=False)) as client:
        m = scrape(client)
        assert client.get("/healthz").text == "ok\n"
        assert client.get("/readyz").status_code == 200
    assert m[("imaging_database_up", ())] == 1
    assert m[("imaging_requests", (("state", "running"),))] == 2
    assert m[("imaging_requests", (("state", "approved"),))] == 1
    assert m[("imaging_requests", (("state", "pending"),))] == 1
    assert m[("imaging_requests", (("state", "denied"),))] == 0
    assert m[("imaging_requests_running", (("stage", "00-acquire"),))] == 1
    assert m[("imaging_requests_running", (("stage", "starting"),))] == 1
    assert m[("imaging_queue_jobs", ())] == 1  # the approved request's job
    assert m[("imaging_queue_oldest_seconds", ())] >= 0
    assert m[("imaging_workers", ())] == 1
    assert [k for k in m if k[0] == "imaging_worker_heartbeat_age_seconds"] == [
        ("imaging_worker_heartbeat_age_seconds", (("worker_id", "1"),))
    ]
    assert m[("imaging_boot_verdicts_total", (("verdict", "booted"),))] == 1
    assert m[("imaging_converted_bytes_total", ())] == 12345
    # Only ended stays in a stage count: 00-acquire goes on; a claim (no stage) is not one.
    assert ("imaging_stage_duration_seconds_count", (("stage", "00-acquire"),)) not in m
    # No id, user or instance in any label.
    assert waiting not in str(m) and "alice" not in str(m) and "i-1" not in str(m)


def test_stage_durations_and_space_refusals(tmp_path: Path, database: str, store: Store) -> None:
    alice, _, root = users(store)
    rid = in_state(store, alice, root, State.running)
    for stage in ("00-acquire", "10-clean"):
        store.transition(rid, "stage", WORKER, worker="w1", stage=stage)
    failed = in_state(store, alice, root, State.running)
    store.transition(
        failed, "fail", WORKER, "the record store s3://records/runs/: cannot store ...", worker="w1"
    )
    waiting = in_state(store, alice, root, State.approved)
    taken(store)
    job = store.get(waiting).job_id
    assert job is not None
    with store.session() as s:  # a worker took its job, and found no room for the run
        s.execute(text("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = :id"), {"id": job})
    assert store.leave_for_space(waiting, job, Actor("w2", "worker"), "not enough space on w2: ...", 60)
    assert not store.leave_for_space(waiting, job, Actor("w2", "worker"), "stale job", 60)  # its job changed
    again = store.get(waiting).job_id
    assert again is not None
    with store.session() as s:  # w2 takes it again a minute later: still no room
        s.execute(text("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = :id"), {"id": job})
        s.execute(text("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = :id"), {"id": again})
    assert store.leave_for_space(waiting, again, Actor("w2", "worker"), "not enough space on w2: less", 60)
    req = store.get(waiting)
    assert [t.reason for t in req.transitions][-1:] == [
        "not enough space on w2: less"
    ]  # replaced, not added
    assert len(req.transitions) == 3  # requested, approved, the note
    assert req.state == State.approved and req.job_id != job
    assert req.transitions[-1].reason.startswith("not enough space")
    with TestClient(api.create_app(make_settings(tmp_path, database), recover=False)) as client:
        m = scrape(client)
    assert m[("imaging_stage_duration_seconds_count", (("stage", "00-acquire"),))] == 1
    assert ("imaging_stage_duration_seconds_count", (("stage", "10-clean"),)) not in m  # still in it
    assert m[("imaging_space_refusals_total", ())] == 1
    assert m[("imaging_record_store_failed_runs_total", ())] == 1  # the run failed above
    # Its new job waits 60 s: not ready yet.
    assert m[("imaging_queue_delayed_jobs", ())] == 1 and m[("imaging_queue_jobs", ())] == 0


def test_readyz_says_why_when_the_database_is_away(tmp_path: Path, databases: Any) -> None:
    url = databases.new()
    client = TestClient(api.create_app(make_settings(tmp_path, url), recover=False))
    with client:
        assert client.get("/readyz").status_code == 200
        databases.drop(url)
        r = client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.text.startswith("not ready: the database is unreachable") and r.text.count("\n") == 1
        assert client.get("/healthz").status_code == 200  # the process still answers
        m = scrape(client)  # the scrape itself works, and says the database is down
        assert m[("imaging_database_up", ())] == 0


def test_retention_settings() -> None:
    r = settings.Retention(
        completed="30d", error="14d", denied="7d", cancelled="12h", store={"completed": "365d"}
    )
    assert r.host_seconds("completed") == 30 * 86400 and r.host_seconds("cancelled") == 12 * 3600
    assert r.store_seconds("completed") == 365 * 86400
    assert r.store_seconds("error") == 14 * 86400  # not named for the store: as on the host
    assert r.host_seconds("running") is None and settings.Retention().store_seconds("completed") is None
    with pytest.raises(ValueError, match="shorter than retention.completed"):
        settings.Retention(completed="30d", store={"completed": "7d"})
    with pytest.raises(ValueError, match="not a duration"):
        settings.Retention(completed="30 days")
    with pytest.raises(ParameterError, match="retention.error"):
        settings.load(environ={"IMAGING_RETENTION__ERROR": "-1d", "IMAGING_STATE": "/tmp/x"})
    loaded = settings.load(environ={"IMAGING_RETENTION__ERROR": "2h", "IMAGING_LOG_FORMAT": "json",
                                    "IMAGING_STATE": "/tmp/x"})  # fmt: skip
    assert loaded.retention.error == 7200 and loaded.log_format == "json"


def test_retention_removes_old_finished_runs_from_this_host(
    tmp_path: Path, database: str, store: Store
) -> None:
    alice, _, root = users(store)
    conf = make_settings(tmp_path, database, retention={"completed": "30d", "error": "14d"})
    rids = {
        state: in_state(store, alice, root, state)
        for state in (State.completed, State.error, State.cancelled)
    }
    fresh = in_state(store, alice, root, State.completed)
    for rid in [*rids.values(), fresh]:
        (config.runs_dir() / rid / "out").mkdir(parents=True)
        (config.runs_dir() / rid / "out" / "disk.qcow2").write_bytes(b"x")
        (tmp_path / "logs").mkdir(exist_ok=True)
        (tmp_path / "logs" / f"{rid}.log").write_text("log\n")
    with store.session() as s:  # aged: completed 31 days ago, error 13 days, cancelled a year
        for rid, days in (
            (rids[State.completed], 31),
            (rids[State.error], 13),
            (rids[State.cancelled], 365),
        ):
            s.execute(text("UPDATE image_requests SET updated = updated - make_interval(days => :d) WHERE id = :id"),
                      {"d": days, "id": rid})  # fmt: skip
    assert retention.sweep_host(conf, store, active={fresh}) == [rids[State.completed]]
    assert not (config.runs_dir() / rids[State.completed]).exists()
    assert not (tmp_path / "logs" / f"{rids[State.completed]}.log").exists()
    for rid in (rids[State.error], rids[State.cancelled], fresh):  # too young; kept forever; young
        assert (config.runs_dir() / rid / "out" / "disk.qcow2").exists()
    req = store.get(rids[State.completed])  # the request stays, with its history
    assert req.state == State.completed and len(req.transitions) == 4
    assert retention.sweep(conf, store) == {"taken_over": [], "host": [], "store": []}


def test_log_as_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")
    try:
        logging.getLogger("imaging.test").warning('request %s: a "quoted" name', "ir-1")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        got = json.loads(line)
        assert (got["level"], got["logger"], got["message"]) == (
            "warning",
            "imaging.test",
            'request ir-1: a "quoted" name',
        )
        assert got["time"].endswith("+00:00")
    finally:
        logs.configure("text")
