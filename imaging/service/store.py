"""Image requests, their state machine, and the service's users, in PostgreSQL through SQLAlchemy.

Every change of a request's state goes through :meth:`Store.transition`, which holds the rules
(:data:`RULES`: which action leads from which states to which, and who may take it), makes the
change with one conditional UPDATE (so of two racing workers or admins exactly one wins), and
stores the transition (time, actor, from, to, stage, reason) in the same database transaction.
A request runs as a Procrastinate job in the same database (:mod:`imaging.service.jobs`):
approving it queues its job in that same transaction, cancelling it cancels (or asks to abort)
the job, and a request whose worker was lost is queued again with a new job, so a request is
never approved without a job, nor a job queued for a request that is not approved.

::

    pending --approve--> approved --claim--> running(stage) --complete--> completed
       |                   ^  ^                  |
       |                   |  +----requeue-------+  (its worker lost or stopped: queued again)
       +--deny--> denied   +------approve------ error <--fail--+
    pending | approved | running | error --cancel--> cancelled

The schema is made and upgraded by Alembic (:mod:`imaging.service.schema`), not here.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String, Text, create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator

from imaging.errors import StoreError
from imaging.service import approvals, jobs


class State(StrEnum):
    pending = "pending"
    approved = "approved"
    running = "running"
    completed = "completed"
    error = "error"
    denied = "denied"
    cancelled = "cancelled"


# action: (states it applies to, the state it leads to, who may take it). "owner" is the user who
# made the request; "worker" a conversion host's worker; "system" the service itself (a worker
# whose heartbeat stopped, found by any other worker or the API).
RULES: dict[str, tuple[frozenset[State], State, frozenset[str]]] = {
    "approve": (frozenset({State.pending, State.error}), State.approved, frozenset({"admin"})),
    "deny": (frozenset({State.pending, State.error}), State.denied, frozenset({"admin"})),
    "cancel": (frozenset({State.pending, State.approved, State.running, State.error}), State.cancelled,
               frozenset({"admin", "owner"})),
    "claim": (frozenset({State.approved}), State.running, frozenset({"worker"})),
    "stage": (frozenset({State.running}), State.running, frozenset({"worker"})),
    "complete": (frozenset({State.running}), State.completed, frozenset({"worker"})),
    "fail": (frozenset({State.running}), State.error, frozenset({"worker", "system"})),
    "requeue": (frozenset({State.running}), State.approved, frozenset({"worker", "system"})),
}  # fmt: skip
PAST = {"approve": "approved", "deny": "denied", "cancel": "cancelled", "claim": "claimed",
        "stage": "moved", "complete": "completed", "fail": "failed", "requeue": "queued again"}  # fmt: skip
# How a worker's note begins when it leaves a request for want of disk space (space.py).
SPACE_REASON = "not enough space"
_PEOPLES = frozenset({"approve", "deny", "cancel"})


class _Raced(StoreError):
    """The request changed between reading it and updating it."""


# Actions after which the request has a job queued for it (a new one each time).
_QUEUES = frozenset({"approve", "requeue"})


@dataclass(frozen=True)
class Actor:
    name: str
    role: str  # user | admin | worker | system
    user_id: int | None = None


SYSTEM = Actor("system", "system")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes, kept as UTC without a zone (the first schema's columns)."""

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
    # The lists, newest first: all, a user's own, by state (migration 0003).
    __table_args__ = (
        Index("ix_image_requests_created", "created"),
        Index("ix_image_requests_owner_created", "owner_id", "created"),
        Index("ix_image_requests_state_created", "state", "created"),
    )
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
    job_id: Mapped[int | None] = mapped_column(BigInteger)  # its latest Procrastinate job
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


def _request_id() -> str:
    return "ir-" + secrets.token_hex(6)


class Store:
    """The requests and users in a PostgreSQL database whose schema is current (the commands
    check it first: :func:`imaging.service.schema.require_current`)."""

    def __init__(self, url: str) -> None:
        if make_url(url).get_backend_name() != "postgresql":
            raise StoreError(f"the database must be PostgreSQL, not {make_url(url).get_backend_name()}", 503)
        # connect_timeout: a host cut off from the database learns it in seconds, not minutes.
        self.engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except (OperationalError, InterfaceError) as e:  # the database went away: one line, a 503
            reason = " ".join(str(e.orig or e).split())
            raise StoreError(f"the database is unreachable: {reason}", 503) from None

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
        job: int | None = None,
        stage: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        approval: approvals.Approval | None = None,
        allow: list[str] | None = None,
        secrets: str | None = None,
    ) -> ImageRequest:
        """Take ``action`` on a request, or refuse (StoreError 403/404/409; 503 when the
        database is away). The only place where a request's state changes. ``worker`` names the
        worker that must still hold the request (all but claim), or that claims it; ``job``, the
        Procrastinate job it runs the request for, which must still be the request's (a worker
        restarted under the same name, or a job that was queued again, cannot act on another
        job's run)."""
        # A person's action races the worker's stage moves (each bumps the version): taken again on
        # the request as it now is, its rules checked anew. The worker's own actions are not.
        tries = 3 if action in _PEOPLES else 1
        for attempt in range(tries):
            try:
                with self.session() as s:
                    req = s.get(ImageRequest, request_id)
                    if req is None or not _may_see(actor, req):
                        raise StoreError(f"no image request {request_id}", 404)
                    _transition(s, req, action, actor, reason, worker=worker, job=job, stage=stage, error=error,
                                result=result, approval=approval, allow=allow, secrets=secrets)  # fmt: skip
                break
            except _Raced:
                if attempt == tries - 1:
                    raise
        return self.get(request_id)

    # the job engine's side

    def held_by(self, request_id: str, worker: str, job: int | None = None) -> bool:
        """Whether ``worker`` still runs the request (for ``job``, if given): not cancelled,
        nor taken over."""
        with self.session() as s:
            row = s.execute(
                select(ImageRequest.state, ImageRequest.worker, ImageRequest.job_id).where(
                    ImageRequest.id == request_id
                )
            ).one_or_none()
        return row is not None and tuple(row[:2]) == (State.running, worker) and job in (None, row[2])

    def leave_for_space(self, request_id: str, job: int, actor: Actor, reason: str, after: float) -> bool:
        """A worker that cannot hold a request's run puts it back in the queue unclaimed, not
        to be taken for ``after`` seconds (imaging/service/space.py); the transition says why.
        False when the request moved on meanwhile (cancelled, or queued again with another job)."""
        with self.session() as s:
            req = s.get(ImageRequest, request_id, with_for_update={"of": ImageRequest})
            if req is None or req.state != State.approved or req.job_id != job:
                return False
            # Its new job waits behind the one running now (the same lock), which ends at once.
            req.job_id = jobs.defer(s.connection().connection.driver_connection, req.id, after=after)
            last = req.transitions[-1] if req.transitions else None
            if last is not None and last.actor == actor.name and last.reason.startswith(SPACE_REASON):
                # The same host again, a minute later: its latest figures, not one more line a minute.
                last.time, last.reason = now(), reason
            else:
                s.add(Transition(request_id=req.id, time=now(), actor=actor.name, from_state=req.state,
                                 to_state=req.state, stage=req.stage, reason=reason))  # fmt: skip
        return True

    def heartbeat(self, worker_id: int) -> None:
        """A Procrastinate worker's heartbeat, written for it (see ``RequestRunner._beating``)."""
        with self.session() as s:
            s.execute(text("SELECT procrastinate_update_heartbeat_v1(:id)"), {"id": worker_id})

    def recover_stalled(self, seconds: float, max_lost: int) -> list[ImageRequest]:
        """Requests whose worker stopped its heartbeats ``seconds`` ago (killed, its host gone):
        each is queued again with a new job (its old job failed), to resume on any host; after
        ``max_lost`` such losses in a row it goes to error instead. Jobs and requests change in
        one transaction; of two hosts recovering at once, one does it (SKIP LOCKED)."""
        changed = []
        with self.session() as s:
            stalled = s.execute(text(_STALLED), {"task": jobs.TASK, "seconds": seconds}).all()
            for job_id, request_id, worker_id in stalled:
                s.execute(text("SELECT procrastinate_finish_job_v1(:id, 'failed', false)"), {"id": job_id})
                req = s.get(ImageRequest, request_id)
                if req is not None and req.state == State.approved and req.job_id == job_id:
                    # Its worker was lost before it could record the claim: the request waits
                    # for a job again, first in line.
                    req.job_id = jobs.defer(s.connection().connection.driver_connection, req.id, first=True)
                    s.add(Transition(request_id=req.id, time=now(), actor=SYSTEM.name, from_state=req.state,
                                     to_state=req.state, stage=req.stage,
                                     reason=f"the worker of job {job_id} was lost before it claimed the "
                                     "request; queued again"))  # fmt: skip
                    changed.append(request_id)
                    continue
                if req is None or req.state != State.running or req.job_id != job_id:
                    continue  # the job of a request that moved on (cancelled): only the job ends
                lost = 1 + _lost_in_a_row(req)
                who = (
                    f"worker {req.worker} (Procrastinate worker {worker_id})"
                    if worker_id
                    else f"worker {req.worker}"
                )
                if lost > max_lost:
                    _transition(s, req, "fail", SYSTEM, f"{who} lost: no heartbeat for {seconds:g} s, "
                                f"the {lost}th time in a row; approve again to resume",
                                error=f"its worker was lost {lost} times in a row (killed, or its host gone)")  # fmt: skip
                else:
                    _transition(s, req, "requeue", SYSTEM,
                                f"{who} lost: no heartbeat for {seconds:g} s; queued again")  # fmt: skip
                changed.append(request_id)
        return [self.get(r) for r in changed]


# Jobs running for a worker whose heartbeat is older than :seconds (or whose worker row was
# pruned): Procrastinate's own select_stalled_jobs_by_heartbeat, locked for this transaction.
_STALLED = """
SELECT job.id, job.args->>'request_id', job.worker_id
  FROM procrastinate_jobs job
  LEFT JOIN procrastinate_workers w ON w.id = job.worker_id
 WHERE job.status = 'doing' AND job.task_name = :task
   AND (job.worker_id IS NULL OR w.last_heartbeat < now() - make_interval(secs => :seconds))
   FOR UPDATE OF job SKIP LOCKED
"""


def _lost_in_a_row(req: ImageRequest) -> int:
    """How many times in a row the request's worker was lost (since it was last approved)."""
    count = 0
    for t in reversed(req.transitions):
        if t.actor == SYSTEM.name and t.to_state == State.approved:
            count += 1
        elif t.to_state == State.approved:
            break
    return count


def _transition(
    s: Session,
    req: ImageRequest,
    action: str,
    actor: Actor,
    reason: str = "",
    *,
    worker: str | None = None,
    job: int | None = None,
    stage: str | None = None,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    approval: approvals.Approval | None = None,
    allow: list[str] | None = None,
    secrets: str | None = None,
) -> None:
    sources, target, who = RULES[action]
    if not _may(actor, req, who):
        raise StoreError(f"only {' or '.join(sorted(who))}s may {action} a request", 403)
    if approval is not None:  # a used or stale link says so, whatever the state
        _use_approval(s, req, approval)
    if req.state not in sources:
        raise StoreError(f"cannot {action} a request that is {req.state}", 409)
    values: dict[str, Any] = {"state": target, "version": ImageRequest.version + 1, "updated": now()}
    if action in ("claim", "stage"):
        # A claim starts with no stage: the run says where it goes on (resumed, or from the start).
        values["stage"] = stage
    elif action == "requeue" and stage is not None:
        # Where the run was stopped, as it says: a stage of half a second may never have reached
        # the database through the worker's heartbeat.
        values["stage"] = stage
    if action == "claim":
        values.update(worker=worker, error=None)
    if action in ("fail", "complete", "cancel", "deny"):
        values["error"] = error
    if result is not None:
        values["result"] = result
    if allow or secrets:  # the admin's answer to the secret scan, kept with who gave it
        options = dict(req.options or {})
        given = [f for f in allow or [] if f not in options.get("secrets_allow", [])]
        options["secrets_allow"] = [*options.get("secrets_allow", []), *given]
        said = [f"allowed secret findings {', '.join(given)}"] if given else []
        if secrets:
            options["secrets"] = secrets
            said.append(f"secrets: {secrets}")
        values["options"] = options
        reason = "; ".join([reason or PAST[action], *said])
    if action in _QUEUES:  # its job, in this same transaction (one still queued is stale: it goes)
        s.execute(text("SELECT procrastinate_cancel_job_v1(id, false, false) FROM procrastinate_jobs "
                       "WHERE queueing_lock = :r AND status = 'todo'"), {"r": req.id})  # fmt: skip
        values["job_id"] = jobs.defer(s.connection().connection.driver_connection, req.id,
                                      first=action == "requeue")  # fmt: skip
    elif action == "cancel" and req.job_id is not None:
        # A queued job is cancelled; a running one is asked to abort (its worker also sees the
        # request cancelled, and stops the run).
        s.execute(text("SELECT procrastinate_cancel_job_v1(:id, true, false)"), {"id": req.job_id})
    before, before_stage = req.state, req.stage
    condition = [ImageRequest.id == req.id, ImageRequest.state == req.state,
                 ImageRequest.version == req.version]  # fmt: skip
    if worker is not None and action != "claim":
        condition.append(ImageRequest.worker == worker)
    if job is not None:
        condition.append(ImageRequest.job_id == job)
    done = s.execute(update(ImageRequest).where(*condition).values(**values))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise _Raced(f"request {req.id} changed meanwhile; {action} not done", 409)
    s.add(Transition(request_id=req.id, time=now(), actor=actor.name, from_state=before, to_state=target,
                     stage=values.get("stage", before_stage), reason=reason or PAST[action]))  # fmt: skip
    s.expire(req)


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
