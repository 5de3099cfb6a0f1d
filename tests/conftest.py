"""Shared fixtures. Unit tests need no root and no network; integration tests build real images,
run the pipeline through papermill and boot QEMU (root, for loop mounts and the boot tests)."""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# A suite started in the background by a non-interactive shell (`cmd &` in a script, nohup) has
# SIGINT ignored, and so would every CLI the tests start (an ignored signal stays ignored across
# exec): the Ctrl-C tests then failed, the CLI never seeing the interrupt. Ctrl-C as a user's.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs of a test never land in the checkout's runs/; the download cache is shared on purpose.
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path_factory.mktemp("runs")))
    monkeypatch.setenv("IMAGING_PROGRESS", "0")


@pytest.fixture
def data() -> Path:
    return DATA


# Longest first (seconds of one worker in a whole run, measured: Debian on XFS, btrfs and LVM 970,
# real Debian boots 420, every format booted 310, the public clouds 250, ...): `make test`'s two
# workers (pytest-xdist, a file each, taken in this order with --no-loadscope-reorder; xdist's
# own order, most tests first, left the 190 s of test_hosts.py to start 21 minutes in, alone)
# then end close together.
SLOW_FIRST = ("test_fuzz.py", "test_crash.py", "test_service_campaigns.py", "test_real_filesystems.py", "test_real_guests.py", "test_rhel_like.py", "test_ubuntu_like.py", "test_suse_like.py", "test_amazon_like.py", "test_formats.py", "test_public_clouds.py", "test_export.py",
              "test_hosts.py", "test_hostile.py", "test_interrupt.py", "test_service_clouds.py",
              "test_big_ova.py", "test_service.py", "test_web.py", "test_worker.py", "test_xen.py", "test_clouds.py",
              "test_explore.py", "test_openapi.py", "test_report.py", "test_bad_input.py", "test_full_disks.py")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split(os.sep) or "/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)

    def rank(item: pytest.Item) -> int:
        name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order stays


class Databases:
    """A throwaway PostgreSQL cluster (the product's own private-cluster code, fsync off) with a
    template database at this imaging's schema: each test gets a fresh copy in milliseconds."""

    def __init__(self, root: Path) -> None:
        from imaging.service import postgres

        self.cluster = postgres.Cluster(root, durable=False)
        self.cluster.start()
        self.count = itertools.count()
        self._sql("CREATE DATABASE imaging_template")
        from sqlalchemy import create_engine

        from imaging.service import schema

        engine = create_engine(self.url("imaging_template"))
        schema.upgrade(engine)
        engine.dispose()

    def url(self, name: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.cluster.url).set(database=name).render_as_string(hide_password=False)

    def _sql(self, statement: str) -> None:
        import psycopg

        from imaging.service import jobs

        with psycopg.connect(jobs.conninfo(self.cluster.url), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def new(self, schema: bool = True) -> str:
        name = f"test_{next(self.count)}"
        self._sql(f"CREATE DATABASE {name}" + (" TEMPLATE imaging_template" if schema else ""))
        return self.url(name)

    def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self._sql(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)")


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    root = Path(tempfile.mkdtemp(prefix="imaging-test-pg-"))
    dbs = Databases(root)
    try:
        yield dbs
    finally:
        dbs.cluster.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def _shared_database(databases: Databases) -> str:
    return databases.new()


@pytest.fixture
def database(databases: Databases, _shared_database: str) -> str:
    """A database at this imaging's schema with nothing in it, as a SQLAlchemy URL (one for the
    session, emptied before each test: quicker than a new one each time)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(_shared_database)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE users, image_requests, transitions, used_approvals, procrastinate_jobs, "
                          "procrastinate_workers, procrastinate_events, procrastinate_periodic_defers "
                          "RESTART IDENTITY CASCADE"))  # fmt: skip
    engine.dispose()
    return _shared_database
