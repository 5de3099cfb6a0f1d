"""The store against a real PostgreSQL on loopback: the same state-machine tests as on SQLite
(tests/unit/test_store.py), and the claim raced by worker processes."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
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
from .servicekit import free_port


def _bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    assert found, f"PostgreSQL's {tool} is missing: run 'make setup' (apt package postgresql)"
    return found[-1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway cluster owned by the postgres user, listening on 127.0.0.1 only."""
    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="imaging-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()
    as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    subprocess.run(
        [*as_postgres, _bin("initdb"), "-D", root / "data", "-U", "imaging", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run(
        [
            *as_postgres,
            _bin("pg_ctl"),
            "-D",
            root / "data",
            "-o",
            options,
            "-l",
            root / "log",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
    )
    try:
        yield f"postgresql+psycopg://imaging@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, _bin("pg_ctl"), "-D", root / "data", "-m", "immediate", "stop"],
            capture_output=True,
            env=env,
            cwd=root,
        )
        shutil.rmtree(root, ignore_errors=True)


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
