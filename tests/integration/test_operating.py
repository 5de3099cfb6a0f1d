"""Operating the service with real parts: PostgreSQL, moto's S3 on loopback, worker processes.

``/metrics`` scraped while a worker runs two requests (and a third waits) shows them; retention
removes aged runs from the host and their records from the store, and a taken-over run's old
directory from the host that lost it; a worker whose runs directory (a small tmpfs) cannot hold
a request's source leaves it in the queue, and says so in its log, the request's history and
``/metrics``; ``/readyz`` says 503 when the record store is away.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from imaging import config
from imaging.service import api, retention, settings
from imaging.service.store import Actor, State, Store

from .servicekit import S3_KEY_ID, S3_SECRET, free_port, s3_client, s3_server, wait_for

FIELDS = dict(instance="i-1", name="demo", kind="export", vis=None, shared_with=[], disk_format="qcow2",
              target="kvm", options={})  # fmt: skip


def conf(tmp_path: Path, database: str, **extra: Any) -> dict[str, Any]:
    return {"state_dir": str(tmp_path / "state"), "instances": {"i-1": "sample:kvm"}, "database_url": database,
            "secret_key": "the-test-signing-key",
            "worker": {"heartbeat_seconds": 1, "stalled_seconds": 6, "poll_seconds": 1, "check_seconds": 1},
            **extra}  # fmt: skip


def people(store: Store) -> tuple[Actor, Actor]:
    store.add_user("alice")
    store.add_user("root", admin=True)
    found = {u.name: u for u in store.users()}
    return Actor("alice", "user", found["alice"].id), Actor("root", "admin", found["root"].id)


def scrape(data: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with TestClient(api.create_app(settings.Settings(**data), recover=False)) as client:
        body = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def finished(store: Store, owner: Actor, admin: Actor, days: float) -> str:
    """A request completed ``days`` ago by a worker of another host."""
    worker = Actor("otherhost:1", "worker")
    rid = store.create(owner, **FIELDS).id
    store.transition(rid, "approve", admin)
    store.transition(rid, "claim", worker, worker=worker.name)
    store.transition(rid, "complete", worker, worker=worker.name, result={"audit_head": "sha256:x"})
    with store.session() as s:
        s.execute(text("UPDATE image_requests SET updated = (now() AT TIME ZONE 'UTC') - make_interval(secs => :s) WHERE id = :id"),
                  {"s": days * 86400, "id": rid})  # fmt: skip
    return rid


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    s = Store(database)
    yield s
    s.close()


class Worker:
    """``python -m imaging worker`` with its own settings, state and runs directory."""

    def __init__(self, root: Path, data: dict[str, Any], runs: Path) -> None:
        self.root = root
        self.config_file = root / "service.yaml"
        self.config_file.write_text(yaml.safe_dump(data))
        self.log = root / "worker.log"
        env = {**os.environ, "IMAGING_RUNS": str(runs), "IMAGING_PROGRESS": "0"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "imaging", "worker", "--config", str(self.config_file)],
                                         stdout=log, stderr=log, env=env)  # fmt: skip
        wait_for(
            "the worker", lambda: b"started" in self.log.read_bytes() or self.proc.poll() is not None, 60
        )
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=150)


def test_metrics_while_two_requests_run(
    tmp_path: Path, database: str, store: Store, kvm_sample: Path
) -> None:
    data = conf(tmp_path, database, worker={**conf(tmp_path, database)["worker"], "concurrency": 2})
    alice, root = people(store)
    rids = [store.create(alice, **FIELDS).id for _ in range(3)]
    worker = Worker(tmp_path, data, tmp_path / "runs")
    try:
        for rid in rids:
            store.transition(rid, "approve", root)
        wait_for(
            "two requests running", lambda: sum(store.get(r).state == State.running for r in rids) == 2, 60
        )
        m = scrape(data)
        assert m[("imaging_requests", (("state", "running"),))] == 2
        assert m[("imaging_requests", (("state", "approved"),))] == 1
        assert m[("imaging_queue_jobs", ())] == 1 and m[("imaging_queue_oldest_seconds", ())] > 0
        assert m[("imaging_workers", ())] == 1
        (age,) = [v for k, v in m.items() if k[0] == "imaging_worker_heartbeat_age_seconds"]
        assert 0 <= age < 3  # a heartbeat a second
        assert sum(v for k, v in m.items() if k[0] == "imaging_requests_running") == 2
    finally:
        for rid in rids:
            if store.get(rid).state in (State.approved, State.running):
                store.transition(rid, "cancel", root)
        worker.stop()
    assert all(store.get(r).state == State.cancelled for r in rids)


def test_a_worker_without_room_leaves_the_request(
    tmp_path: Path, database: str, store: Store, kvm_sample: Path
) -> None:
    runs = tmp_path / "small"
    runs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(runs)], check=True)
    try:
        data = conf(tmp_path, database, retention={"completed": "1d"})
        data["worker"]["space_wait_seconds"] = 30
        alice, root = people(store)
        old = finished(store, alice, root, days=2)  # an old run: the worker's retention removes it
        (runs / old / "out").mkdir(parents=True)
        (runs / old / "out" / "demo.qcow2").write_bytes(b"artifact")
        rid = store.create(alice, **FIELDS).id
        worker = Worker(tmp_path, data, runs)
        wait_for("the old run removed by the worker", lambda: not (runs / old).exists(), 30)
        assert f"retention: run {old} (completed since" in worker.log.read_text()
        try:
            store.transition(rid, "approve", root)

            def left() -> bool:
                return any(t.reason.startswith("not enough space") for t in store.get(rid).transitions)

            wait_for("the request left for want of space", left, 60)
            req = store.get(rid)
            assert req.state == State.approved and req.worker is None  # never claimed
            said = req.transitions[-1].reason
            assert re.fullmatch(r"not enough space on \S+ to run it: needs about [\d.]+ MiB in its runs "
                                r"directory, has [\d.]+ MiB; left for another host", said), said  # fmt: skip
            assert f"request {rid}: {said}" in worker.log.read_text()
            m = scrape(data)
            assert m[("imaging_space_refusals_total", ())] >= 1
            assert m[("imaging_queue_delayed_jobs", ())] == 1  # back in 30 s, for any host
            assert list(runs.iterdir()) == []
        finally:
            store.transition(rid, "cancel", root)
            worker.stop()
    finally:
        subprocess.run(["umount", str(runs)], check=True)


def test_retention_on_the_host_and_in_the_store(tmp_path: Path, database: str, store: Store) -> None:
    with s3_server() as s3_url:
        s3 = s3_client(s3_url)
        s3.create_bucket(Bucket="records")
        data = conf(tmp_path, database, retention={"completed": "30d", "store": {"completed": "90d"}},
                    records={"endpoint_url": s3_url, "bucket": "records", "access_key_id": S3_KEY_ID,
                             "secret_access_key": S3_SECRET})  # fmt: skip
        loaded = settings.Settings(**data)
        alice, root = people(store)
        worker = Actor("otherhost:1", "worker")
        rids = {}
        for key, days in (
            ("month", 40),
            ("season", 100),
            ("fresh", 1),
            ("taken", 1),
            ("mine", 1),
            ("ahead", 1),
        ):
            rid = store.create(alice, **FIELDS).id
            store.transition(rid, "approve", root)
            store.transition(rid, "claim", worker, worker=worker.name)
            if key != "mine":
                store.transition(
                    rid, "complete", worker, worker=worker.name, result={"audit_head": "sha256:x"}
                )
            with store.session() as s:
                s.execute(text("UPDATE image_requests SET updated = (now() AT TIME ZONE 'UTC') - make_interval(days => :d) WHERE id = :id"),
                          {"d": days, "id": rid})  # fmt: skip
            rids[key] = rid
            run = config.runs_dir() / rid
            (run / "out").mkdir(parents=True)
            (run / "out" / "demo.qcow2").write_bytes(b"artifact")
            (run / "state.json").write_text(
                json.dumps({"state": "completed", "updated": "2026-12-02T10:00:00+00:00"})
            )
            for name, body in (("request.json", b"{}"), ("state.json", (run / "state.json").read_bytes()),
                               ("out/demo.qcow2", b"artifact")):  # fmt: skip
                s3.put_object(Bucket="records", Key=f"runs/{rid}/{name}", Body=body)
        # Taken over: this host's directory says the run failed here, earlier; the store has the
        # other host's later state. "mine" is running on a worker of this host: left alone.
        # "ahead": this directory is later than the store's (its last push failed): kept.
        with store.session() as s:
            s.execute(text("UPDATE image_requests SET worker = :w WHERE id = :id"),
                      {"w": f"{socket.gethostname()}:99", "id": rids["mine"]})  # fmt: skip
        for key, when in (("taken", "2026-12-01T10:00:00+00:00"), ("mine", "2026-12-01T10:00:00+00:00"),
                          ("ahead", "2026-12-03T10:00:00+00:00")):  # fmt: skip
            (config.runs_dir() / rids[key] / "state.json").write_text(
                json.dumps({"state": "failed", "updated": when})
            )

        done = {k: sorted(v) for k, v in retention.sweep(loaded, store).items()}

        assert done == {"taken_over": [rids["taken"]], "host": sorted([rids["month"], rids["season"]]),
                        "store": [rids["season"]]}  # fmt: skip
        left = {k: (config.runs_dir() / r).exists() for k, r in rids.items()}
        assert left == {
            "month": False,
            "season": False,
            "fresh": True,
            "taken": False,
            "mine": True,
            "ahead": True,
        }

        def stored(rid: str) -> int:
            return int(s3.list_objects_v2(Bucket="records", Prefix=f"runs/{rid}/").get("KeyCount", 0))

        assert {k: stored(r) for k, r in rids.items()} == {
            "month": 3,
            "season": 0,
            "fresh": 3,
            "taken": 3,
            "mine": 3,
            "ahead": 3,
        }
        season = store.get(rids["season"])  # the request stays: its result, audit head, history
        assert season.state == State.completed and (season.result or {}).get("audit_head") == "sha256:x"
        assert season.transitions[-1].reason.startswith(retention.STORE_REMOVED)
        assert retention.sweep(loaded, store) == {"taken_over": [], "host": [], "store": []}  # once


def test_readyz_says_when_the_record_store_is_away(tmp_path: Path, database: str) -> None:
    with s3_server() as s3_url:
        s3_client(s3_url).create_bucket(Bucket="records")
        records = {"endpoint_url": s3_url, "bucket": "records", "access_key_id": S3_KEY_ID,
                   "secret_access_key": S3_SECRET}  # fmt: skip
        up = settings.Settings(**conf(tmp_path, database, records=records))
        with TestClient(api.create_app(up, recover=False)) as client:
            assert client.get("/readyz").status_code == 200
    gone = settings.Settings(
        **conf(tmp_path, database, records={**records, "endpoint_url": f"http://127.0.0.1:{free_port()}"})
    )
    with TestClient(api.create_app(gone, recover=False)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.text.startswith(
            "not ready: the record store s3://records/runs/"
        ), r.text
        assert r.text.count("\n") == 1 and S3_SECRET not in r.text
        assert 'imaging_record_store_failures_total{where="readyz"} 1.0' in client.get("/metrics").text
