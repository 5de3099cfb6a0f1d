"""The database's schema: Alembic migrations (``imaging/service/migrations``), and the check every
command that uses the database makes first.

``python -m imaging db upgrade`` brings a database to this imaging's schema: an empty one is
created, a store made before migrations existed (its tables, no ``alembic_version``) is adopted
as revision 0001 and upgraded, requests kept. ``serve`` and ``worker`` refuse a database at any
other revision than theirs, in one line naming the command that upgrades it (or, for a schema
newer than this imaging, saying to upgrade imaging). The private cluster of a one-machine
``serve`` is upgraded on start: nobody else uses it.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from imaging.errors import StoreError
from imaging.service.settings import Settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
UPGRADE = "python -m imaging db upgrade"
# The tables of the store before migrations (revision 0001's).
_FIRST_TABLES = {"users", "image_requests", "transitions", "used_approvals"}


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    found = ScriptDirectory.from_config(_config()).get_current_head()
    assert found is not None
    return found


def _where(engine: Engine) -> str:
    # unquoted: a private cluster's socket directory is a query parameter (?host=/path)
    return urllib.parse.unquote(engine.url.render_as_string(hide_password=True))


def _unreachable(engine: Engine, e: SQLAlchemyError) -> StoreError:
    reason = " ".join(str(getattr(e, "orig", None) or e).split())
    return StoreError(f"cannot use the database {_where(engine)}: {reason}", 503)


def current(engine: Engine) -> tuple[str | None, bool]:
    """(the database's revision, whether it has tables at all)."""
    if engine.url.get_backend_name() != "postgresql":
        raise StoreError(f"the database must be PostgreSQL, not {engine.url.get_backend_name()}", 503)
    try:
        with engine.connect() as conn:
            revision = MigrationContext.configure(conn).get_current_revision()
            tables = set(inspect(conn).get_table_names())
    except SQLAlchemyError as e:
        raise _unreachable(engine, e) from None
    return revision, bool(tables - {"alembic_version"})


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to this imaging's schema; return (revision before, revision now)."""
    before, has_tables = current(engine)
    cfg = _config()
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            if before is None and has_tables:
                found = set(inspect(conn).get_table_names())
                if not _FIRST_TABLES <= found:
                    raise StoreError(
                        f"the database {_where(engine)} has tables that are not imaging's "
                        f"({', '.join(sorted(found - _FIRST_TABLES)[:5])}): use an empty database",
                        409,
                    )
                command.stamp(cfg, "0001")  # the store made before migrations: revision 0001
                before = "0001"
            command.upgrade(cfg, "head")
    except SQLAlchemyError as e:
        raise _unreachable(engine, e) from None
    return before, head()


def require_current(engine: Engine) -> None:
    """Refuse (StoreError 503, one line) a database whose schema is not this imaging's."""
    revision, has_tables = current(engine)
    wanted = head()
    if revision == wanted:
        return
    where = _where(engine)
    if revision is None and not has_tables:
        raise StoreError(f"the database {where} has no imaging schema yet: create it with: {UPGRADE}", 503)
    if revision is None:
        raise StoreError(
            f"the database {where} was made before schema migrations: upgrade it with: {UPGRADE}", 503
        )
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if revision not in known:
        raise StoreError(
            f"the database {where} has schema revision {revision}, which this imaging does not know "
            f"(it knows up to {wanted}): upgrade imaging on this host",
            503,
        )
    raise StoreError(
        f"the database {where} has schema revision {revision}, this imaging needs {wanted}: "
        f"upgrade it with: {UPGRADE}",
        503,
    )


@contextlib.contextmanager
def database(settings: Settings, *, start: bool = True, stop: bool = False) -> Iterator[str]:
    """The service's database, ready for this imaging, as a SQLAlchemy URL.

    With ``database_url``: checked (:func:`require_current`). Without: the private cluster in
    the state directory, started for the block when ``start`` (and stopped after it if it was
    started here, or always with ``stop``: ``serve``'s own), and upgraded, since nothing else
    uses it; ``start=False`` (a worker beside ``serve``) requires it to be running already.
    """
    if not settings.private_database:
        url = settings.sqlalchemy_url
        _check(url, require_current)
        yield url
        return
    cluster = settings.cluster()
    if not start:
        if not cluster.running():
            raise StoreError(
                f"no database_url is set, and this host's private database ({cluster.root}) is not running: "
                "start `python -m imaging serve` here first, or set database_url", 503)  # fmt: skip
        _check(cluster.url, require_current)
        yield cluster.url
        return
    started = cluster.start()
    try:
        _check(cluster.url, upgrade)
        yield cluster.url
    finally:
        if started or stop:
            cluster.stop()


def _check(url: str, check: Callable[[Engine], object]) -> None:
    engine = create_engine(url)
    try:
        check(engine)
    finally:
        engine.dispose()
