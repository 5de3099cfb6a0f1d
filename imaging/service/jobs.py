"""The job engine: Procrastinate on the service's PostgreSQL, no broker.

One task, :data:`TASK`: run one request. Its job is queued by the store in the same transaction
that approves the request (or queues it again), with the request's id as both its ``lock`` (no
two jobs of one request run at once, whatever happens: a unique index on running jobs) and its
``queueing_lock`` (no two wait at once). Workers take jobs with ``FOR UPDATE SKIP LOCKED``,
send heartbeats, and any worker (or the API) queues again the requests of a worker whose
heartbeats stopped (:meth:`imaging.service.store.Store.recover_stalled`).

What the task does is :class:`imaging.service.worker.RequestRunner`'s: the worker gives it to
Procrastinate as the jobs' context (this module imports nothing of the service, so the store
can queue jobs through it).
"""

from __future__ import annotations

from typing import Any

import procrastinate
from sqlalchemy.engine import make_url

TASK = "imaging.run_request"
QUEUE = "requests"

# The connector is the worker's (see connect); the API and the store only queue jobs, on the
# connection of their own transaction, and never open it.
app = procrastinate.App(connector=procrastinate.PsycopgConnector())


@app.task(name=TASK, queue=QUEUE, pass_context=True)
def run_request(context: procrastinate.JobContext, request_id: str) -> None:
    context.additional_context["runner"].run(context, request_id)


def defer(connection: Any, request_id: str, *, first: bool = False, after: float = 0) -> int:
    """Queue the run of a request on ``connection`` (a psycopg connection inside the caller's
    transaction, committed or rolled back with it); return the job's id. ``first``: before the
    jobs already queued (a request whose worker was lost goes on at the next free worker).
    ``after``: not to be taken for that many seconds (a request no host had room for)."""
    job = run_request.configure(lock=request_id, queueing_lock=request_id, connection=connection,
                                priority=1 if first else 0,
                                schedule_in={"seconds": int(after)} if after else None)  # fmt: skip
    return int(job.defer(request_id=request_id))


def conninfo(sqlalchemy_url: str) -> str:
    """The libpq connection string of a SQLAlchemy URL (``postgresql+psycopg://...``)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(sqlalchemy_url: str, concurrency: int) -> procrastinate.App:
    """The app with a connection pool of its own to the database, for a worker."""
    connector = procrastinate.PsycopgConnector(
        conninfo=conninfo(sqlalchemy_url), min_size=1, max_size=concurrency + 3, timeout=10
    )
    return app.with_connector(connector)
