"""Image requests, their state machine, and the service's users, in SQL through SQLAlchemy.

SQLite in the state directory by default, PostgreSQL by URL, with the same code. Every change
of a request's state goes through :meth:`Store.transition`, which holds the rules (:data:`RULES`:
which action leads from which states to which, and who may take it), makes the change with one
conditional UPDATE (so of two racing workers or admins exactly one wins), and stores the
transition (time, actor, from, to, stage, reason) in the same database transaction.

::

    pending --approve--> approved --claim--> running(stage) --complete--> completed
       |                    ^                   |
       +--deny--> denied    +------approve------+--fail/lease expired--> error
    pending | approved | running | error --cancel--> cancelled
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text, create_engine, event, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator

from imaging.errors import StoreError
from imaging.service import approvals


class State(StrEnum):
    pending = "pending"
    approved = "approved"
    running = "running"
    completed = "completed"
    error = "error"
    denied = "denied"
    cancelled = "cancelled"


# action: (states it applies to, the state it leads to, who may take it). "owner" is the user who
# made the request; "worker" a scheduler; "system" the service itself (an expired lease).
RULES: dict[str, tuple[frozenset[State], State, frozenset[str]]] = {
    "approve": (frozenset({State.pending, State.error}), State.approved, frozenset({"admin"})),
    "deny": (frozenset({State.pending, State.error}), State.denied, frozenset({"admin"})),
    "cancel": (frozenset({State.pending, State.approved, State.running, State.error}), State.cancelled,
               frozenset({"admin", "owner"})),
    "claim": (frozenset({State.approved}), State.running, frozenset({"worker"})),
    "stage": (frozenset({State.running}), State.running, frozenset({"worker"})),
    "complete": (frozenset({State.running}), State.completed, frozenset({"worker"})),
    "fail": (frozenset({State.running}), State.error, frozenset({"worker", "system"})),
}  # fmt: skip
PAST = {"approve": "approved", "deny": "denied", "cancel": "cancelled", "claim": "claimed",
        "stage": "moved", "complete": "completed", "fail": "failed"}  # fmt: skip


@dataclass(frozen=True)
class Actor:
    name: str
    role: str  # user | admin | worker | system
    user_id: int | None = None


SYSTEM = Actor("system", "system")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no time zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime)


class ImageRequest(Base):
    __tablename__ = "image_requests"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    owner: Mapped[User] = relationship(lazy="joined")
    instance: Mapped[str] = mapped_column(String(80))
    name: Mapped[str] = mapped_column(String(255))  # as the user wrote it (config.check_display_name)
    kind: Mapped[str] = mapped_column(String(16))  # image | export
    vis: Mapped[str | None] = mapped_column(String(16))
    shared_with: Mapped[list[str]] = mapped_column(JSON, default=list)
    disk_format: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(40))
    # What else the run is asked to do (profile, clean, packages, layout, destination), as the
    # CLI's options: validated by the run's own Request model when the request is made.
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(80))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(120))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(default=0)  # transitions so far; approval links name it
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    transitions: Mapped[list[Transition]] = relationship(order_by="Transition.id", lazy="selectin")


class Transition(Base):
    __tablename__ = "transitions"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("image_requests.id"), index=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(120))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(80))
    reason: Mapped[str] = mapped_column(Text, default="")


class UsedApproval(Base):
    """Nonces of approval links already used: a link works once."""

    __tablename__ = "used_approvals"
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(32))
    used: Mapped[datetime] = mapped_column(UTCDateTime)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi: Any, record: Any) -> None:
        # pysqlite's own BEGIN is deferred: a reader that later writes can fail at once with
        # "database is locked". BEGIN IMMEDIATE (below) waits for the lock instead.
        dbapi.isolation_level = None
        dbapi.execute("PRAGMA journal_mode=WAL")
        dbapi.execute("PRAGMA foreign_keys=ON")
        dbapi.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _request_id() -> str:
    return "ir-" + secrets.token_hex(6)


class Store:
    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(url)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as e:
            where = parsed.render_as_string(hide_password=True)
            reason = " ".join(str(getattr(e, "orig", None) or e).split())
            raise StoreError(f"cannot use the database {where}: {reason}", 503) from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # users

    def add_user(self, name: str, *, admin: bool = False, email: str | None = None) -> str:
        """Make a user; return their bearer token (shown once: only its hash is kept)."""
        token = approvals.new_token()
        role = "admin" if admin else "user"
        try:
            with self.session() as s:
                s.add(User(name=name, email=email, role=role, token_hash=approvals.hash_token(token),
                           created=now()))  # fmt: skip
        except IntegrityError:
            raise StoreError(f"user {name!r} exists already", 409) from None
        return token

    def new_token(self, name: str) -> str:
        token = approvals.new_token()
        with self.session() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise StoreError(f"no user {name!r}", 404)
            user.token_hash = approvals.hash_token(token)
        return token

    def user_by_token(self, token: str) -> User | None:
        with self.session() as s:
            return s.scalar(select(User).where(User.token_hash == approvals.hash_token(token)))

    def users(self, names: list[str] | None = None, role: str | None = None) -> list[User]:
        query = select(User).order_by(User.name)
        if names is not None:
            query = query.where(User.name.in_(names))
        if role is not None:
            query = query.where(User.role == role)
        with self.session() as s:
            return list(s.scalars(query))

    # requests

    def create(self, owner: Actor, **fields: Any) -> ImageRequest:
        with self.session() as s:
            t = now()
            req = ImageRequest(id=_request_id(), owner_id=owner.user_id, state=State.pending, version=1,
                               created=t, updated=t, **fields)  # fmt: skip
            s.add(req)
            s.add(Transition(request_id=req.id, time=t, actor=owner.name, from_state=None,
                             to_state=State.pending, reason="requested"))  # fmt: skip
        return self.get(req.id)

    def get(self, request_id: str, actor: Actor | None = None) -> ImageRequest:
        """One request, with its owner and history; 404 when it does not exist or is not
        ``actor``'s to see (a user sees their own, an admin all)."""
        with self.session() as s:
            req = s.get(ImageRequest, request_id)
            if req is None or (actor is not None and not _may_see(actor, req)):
                raise StoreError(f"no image request {request_id}", 404)
            return req

    def list_requests(
        self, actor: Actor, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ImageRequest]:
        query = select(ImageRequest).order_by(ImageRequest.created.desc(), ImageRequest.id)
        if actor.role != "admin":
            query = query.where(ImageRequest.owner_id == actor.user_id)
        if state is not None:
            query = query.where(ImageRequest.state == state)
        with self.session() as s:
            return list(s.scalars(query.limit(limit).offset(offset)))

    def transition(
        self,
        request_id: str,
        action: str,
        actor: Actor,
        reason: str = "",
        *,
        worker: str | None = None,
        stage: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        approval: approvals.Approval | None = None,
        lease_seconds: float | None = None,
    ) -> ImageRequest:
        """Take ``action`` on a request, or refuse (StoreError 403/404/409). The only place
        where a request's state changes."""
        sources, target, who = RULES[action]
        with self.session() as s:
            req = s.get(ImageRequest, request_id)
            if req is None or not _may_see(actor, req):
                raise StoreError(f"no image request {request_id}", 404)
            if not _may(actor, req, who):
                raise StoreError(f"only {' or '.join(sorted(who))}s may {action} a request", 403)
            if approval is not None:  # a used or stale link says so, whatever the state
                _use_approval(s, req, approval)
            if req.state not in sources:
                raise StoreError(f"cannot {action} a request that is {req.state}", 409)
            values: dict[str, Any] = {"state": target, "version": ImageRequest.version + 1, "updated": now()}
            if action in ("claim", "stage"):
                values["stage"] = stage
            if action == "claim":
                values.update(
                    worker=worker, error=None, lease_until=now() + timedelta(seconds=lease_seconds or 60)
                )
            if action in ("fail", "complete", "cancel", "deny"):
                values.update(error=error, lease_until=None)
            if result is not None:
                values["result"] = result
            before, before_stage = req.state, req.stage  # the UPDATE below refreshes req
            condition = [ImageRequest.id == request_id, ImageRequest.state == req.state,
                         ImageRequest.version == req.version]  # fmt: skip
            if worker is not None and action != "claim":
                condition.append(ImageRequest.worker == worker)
            done = s.execute(update(ImageRequest).where(*condition).values(**values))
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise StoreError(f"request {request_id} changed meanwhile; {action} not done", 409)
            s.add(Transition(request_id=request_id, time=now(), actor=actor.name, from_state=before,
                             to_state=target, stage=stage if action in ("claim", "stage") else before_stage,
                             reason=reason or PAST[action]))  # fmt: skip
        return self.get(request_id)

    # scheduling

    def claim(self, worker: str, lease_seconds: float) -> ImageRequest | None:
        """The oldest approved request, now running for ``worker``; None when there is none.
        The conditional UPDATE in :meth:`transition` makes it atomic: two workers never both win."""
        with self.session() as s:
            ids = list(s.scalars(select(ImageRequest.id).where(ImageRequest.state == State.approved)
                                 .order_by(ImageRequest.updated).limit(8)))  # fmt: skip
        for request_id in ids:
            try:
                return self.transition(request_id, "claim", Actor(worker, "worker"), worker=worker,
                                       lease_seconds=lease_seconds)  # fmt: skip
            except StoreError:
                continue  # another worker won this one
        return None

    def heartbeat(self, request_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend ``worker``'s lease on a running request; False when the request is no longer
        running for it (cancelled, or its lease expired and it went to error)."""
        with self.session() as s:
            done = s.execute(
                update(ImageRequest)
                .where(
                    ImageRequest.id == request_id,
                    ImageRequest.worker == worker,
                    ImageRequest.state == State.running,
                )  # fmt: skip
                .values(lease_until=now() + timedelta(seconds=lease_seconds))
            )
            return bool(done.rowcount == 1)  # type: ignore[attr-defined]

    def expire_leases(self) -> list[str]:
        """Running requests whose worker stopped renewing its lease go to error."""
        with self.session() as s:
            stale = list(s.scalars(select(ImageRequest.id).where(
                ImageRequest.state == State.running, ImageRequest.lease_until < now())))  # fmt: skip
        expired = []
        for request_id in stale:
            try:
                self.transition(
                    request_id,
                    "fail",
                    SYSTEM,
                    "worker lost (its lease expired); approve again to resume",
                    error="the worker running this request stopped",
                )
            except StoreError:
                continue
            expired.append(request_id)
        return expired


def _may_see(actor: Actor, req: ImageRequest) -> bool:
    return actor.role in ("admin", "worker", "system") or req.owner_id == actor.user_id


def _may(actor: Actor, req: ImageRequest, who: frozenset[str]) -> bool:
    return actor.role in who or ("owner" in who and actor.role == "user" and req.owner_id == actor.user_id)


def _use_approval(s: Session, req: ImageRequest, approval: approvals.Approval) -> None:
    if s.get(UsedApproval, approval.nonce) is not None:
        raise approvals.ApprovalRefused("this approval link was used already", 409)
    if approval.version != req.version:
        raise approvals.ApprovalRefused(
            f"this approval link is out of date: the request is {req.state} now", 409
        )
    s.add(UsedApproval(nonce=approval.nonce, request_id=req.id, used=now()))
