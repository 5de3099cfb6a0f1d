"""The store against a real PostgreSQL on loopback: the same state-machine tests as on SQLite
(tests/unit/test_store.py), and the claim raced by worker processes."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imaging.service.store import Store

from ..unit.service.test_store import (  # noqa: F401 - collected here again, with the PostgreSQL store
    in_state,
    test_a_stale_worker_cannot_finish_a_request_it_lost,
    test_claim_is_atomic,
    test_every_action_from_every_state,
    test_history_records_every_transition,
    test_leases_expire_into_error_and_approve_resumes,
    test_user_tokens_are_stored_hashed,
    test_users_see_their_own_admins_all,
    test_who_may_do_what,
    users,
)
from .conftest import leftovers
from .servicekit import free_port


def _bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    assert found, f"PostgreSQL's {tool} is missing: run 'make setup' (apt package postgresql)"
    return found[-1]


class Cluster:
    """A throwaway cluster owned by the postgres user, listening on 127.0.0.1 only; it can be
    stopped and started again (a database restart, as workers meet it)."""

    def __init__(self) -> None:
        user = pwd.getpwnam("postgres")
        self.root = Path(tempfile.mkdtemp(prefix="imaging-pg-"))
        os.chown(self.root, user.pw_uid, user.pw_gid)
        port = free_port()
        self.as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        self.env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        self._pg(_bin("initdb"), "-D", self.root / "data", "-U", "imaging", "-A", "trust", "--no-sync")
        self.options = (
            f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        )
        self.url = f"postgresql+psycopg://imaging@127.0.0.1:{port}/postgres"
        self.start()

    def _pg(self, *argv: object, check: bool = True) -> None:
        subprocess.run([*self.as_postgres, *map(str, argv)], check=check, capture_output=True, env=self.env,
                       cwd=self.root)  # fmt: skip

    def start(self) -> None:
        self._pg(
            _bin("pg_ctl"),
            "-D",
            self.root / "data",
            "-o",
            self.options,
            "-l",
            self.root / "log",
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg(_bin("pg_ctl"), "-D", self.root / "data", "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.remove()


@pytest.fixture(scope="module")
def postgres(cluster: Cluster) -> str:
    return cluster.url


@pytest.fixture
def store(postgres: str) -> Iterator[Store]:
    s = Store(postgres)
    yield s
    from imaging.service.store import Base

    Base.metadata.drop_all(s.engine)
    s.close()


CLAIMER = """
import sys
from imaging.service.store import Store
store = Store(sys.argv[1])
while (req := store.claim(sys.argv[2], 60)) is not None:
    print(req.id, flush=True)
"""


def test_claim_raced_by_processes(store: Store, postgres: str) -> None:
    alice, _, root = users(store)
    from imaging.service.store import State

    ids = {in_state(store, alice, root, State.approved) for _ in range(20)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, postgres, f"p{i}"], stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    claimed = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert sorted(claimed) == sorted(ids)  # every request once, none twice
    assert len({h.actor for i in ids for h in store.get(i).transitions if h.reason == "claimed"}) >= 1


def test_a_worker_outlives_database_restarts(cluster: Cluster, tmp_path: Path) -> None:
    """The database goes away while a worker runs a request. Shorter than the lease: the worker
    supervises on and the request completes. Longer: the worker stops the run (the request is
    no longer its own), the lease expires into error when the database is back, and the same
    worker, still claiming, resumes the run once it is approved again."""
    from .servicekit import Service, wait_for
    from .test_worker import URL, stage_is

    config = {"instances": {"i-sample": "sample:kvm"}, "database_url": cluster.url,
              "worker": {"embedded": False, "poll_seconds": 0.5, "lease_seconds": 8}}  # fmt: skip
    service = Service(tmp_path, tmp_path / "runs", config)
    service.add_user("alice")
    service.add_user("root", admin=True)
    service.start()
    root = service.client("root")
    worker = service.worker()
    try:
        rid = service.client("alice").post(
            URL, json={"instance": "i-sample", "name": "db", "disk_format": "raw"}
        )
        rid = rid.json()["id"]
        root.patch(URL + rid, json={"status": "approve"})
        state = service.runs / rid / "state.json"
        wait_for("stage 10-clean", lambda: stage_is(root, rid, "10-clean"), 180)

        cluster.stop()  # longer than the lease
        wait_for(
            "the run to be stopped", lambda: json.loads(state.read_text())["error"] == "interrupted", 120
        )
        assert worker.poll() is None
        cluster.start()
        body = service.wait_state("root", rid, {"error"}, timeout=60)
        assert "lease expired" in body["history"][-1]["reason"]

        root.patch(URL + rid, json={"status": "approve"})
        wait_for("the run to resume", lambda: json.loads(state.read_text())["state"] == "running", 120)
        cluster.stop()  # shorter than the lease
        time.sleep(3)
        cluster.start()
        done = service.wait_state("root", rid, {"completed", "error"})
        assert done["state"] == "completed", done["error"]
        claims = [h["actor"] for h in done["history"] if h["reason"] == "claimed"]
        assert len(claims) == 2 and len(set(claims)) == 1  # the same worker, both times
        assert worker.poll() is None and leftovers(tmp_path) == []
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
        service.stop()
        from imaging.service.store import Base

        s = Store(cluster.url)
        Base.metadata.drop_all(s.engine)
        s.close()
