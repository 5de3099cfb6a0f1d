"""``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``: what an operator's monitoring reads.

The figures are read from the database when scraped (:class:`DatabaseCollector`), not counted
in this process: every host's API gives the same answer, whichever one is scraped and however
often processes restart. Requests by state and stage, stage durations (from the requests'
transitions), boot verdicts and bytes converted (from completed requests' results), the queue
(Procrastinate's jobs: how many wait, the oldest's age), the workers (their heartbeats' age),
requests a worker did not take for want of disk space (their transitions), runs that failed on
the record store (their errors). Failures of this process's own record store checks
(``/readyz``) are counted here.

None of the three routes asks for a token: they say nothing of users, requests or secrets
(no request id, user name, instance, bucket or URL is a label), and a monitoring system
seldom has a user's token. Put them behind the proxy's rules if even counts are private.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from imaging.errors import ImagingError, StoreError
from imaging.run import record
from imaging.service import jobs
from imaging.service.settings import Settings
from imaging.service.store import SPACE_REASON, State, Store

log = logging.getLogger("imaging.service.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# One query per figure, each small; all in one transaction (one consistent snapshot).
_STATES = "SELECT state, count(*) FROM image_requests GROUP BY state"
_RUNNING = "SELECT coalesce(stage, ''), count(*) FROM image_requests WHERE state = 'running' GROUP BY 1"
# A stage's duration: from the transition that moved the request into it to the next one.
_STAGES = """
SELECT stage, count(*), coalesce(sum(seconds), 0) FROM (
  SELECT stage, to_state, EXTRACT(EPOCH FROM lead(time) OVER (PARTITION BY request_id ORDER BY id) - time) AS seconds
    FROM transitions) t
 WHERE to_state = 'running' AND stage IS NOT NULL AND seconds IS NOT NULL
 GROUP BY stage
"""
_VERDICTS = """
SELECT coalesce(CAST(result AS jsonb) -> 'boot' ->> 'verdict', 'none'), count(*),
       coalesce(sum(CAST(coalesce(CAST(result AS jsonb) ->> 'size_bytes', '0') AS numeric)), 0)
  FROM image_requests WHERE state = 'completed' GROUP BY 1
"""
_QUEUE = """
SELECT count(*), coalesce(EXTRACT(EPOCH FROM now() - min(e.at)), 0)
  FROM procrastinate_jobs j
  LEFT JOIN LATERAL (SELECT min(at) AS at FROM procrastinate_events WHERE job_id = j.id AND type = 'deferred') e ON true
 WHERE j.status = 'todo' AND j.queue_name = :queue AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
"""
_LATER = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo' AND queue_name = :queue AND scheduled_at > now()"
_WORKERS = "SELECT id, EXTRACT(EPOCH FROM now() - last_heartbeat) FROM procrastinate_workers ORDER BY id"
_SPACE = "SELECT count(*) FROM transitions WHERE reason LIKE :reason"
# Runs that failed on the record store: a run's error says "the record store ..." (record.py),
# a worker's "cannot bring the run's record to this host" (worker.py).
_STORE_FAILED = """
SELECT count(*) FROM transitions
 WHERE to_state = 'error' AND (reason LIKE '%the record store%' OR reason LIKE '%the run''s record%')
"""


class DatabaseCollector(Collector):
    """The service's figures, read from the shared database at each scrape."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("imaging_database_up", "1 when this scrape could read the database")
        try:
            rows = self._read()
        except StoreError as e:
            log.warning("metrics: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from rows

    def _read(self) -> list[Metric]:
        with self.store.session() as s:

            def q(sql: str, **params: Any) -> list[Any]:
                return list(s.execute(text(sql), params).all())

            by_state = dict(q(_STATES))
            requests = GaugeMetricFamily("imaging_requests", "requests by state", labels=["state"])
            for state in State:
                requests.add_metric([state.value], by_state.get(state.value, 0))
            running = GaugeMetricFamily(
                "imaging_requests_running", "running requests by stage", labels=["stage"]
            )
            for stage, n in q(_RUNNING):
                running.add_metric([stage or "starting"], n)
            stages = SummaryMetricFamily(
                "imaging_stage_duration_seconds",
                "time requests spent in each stage (ended stays)",
                labels=["stage"],
            )
            for stage, n, total in q(_STAGES):
                stages.add_metric([stage], count_value=n, sum_value=float(total))
            verdicts = CounterMetricFamily("imaging_boot_verdicts", "completed requests by boot verdict",
                                           labels=["verdict"])  # fmt: skip
            converted = CounterMetricFamily(
                "imaging_converted_bytes", "bytes of artifacts of completed requests"
            )
            total_bytes = 0.0
            for verdict, n, size in q(_VERDICTS):
                verdicts.add_metric([verdict], n)
                total_bytes += float(size)
            converted.add_metric([], total_bytes)
            ((waiting, oldest),) = q(_QUEUE, queue=jobs.QUEUE)
            ((later,),) = q(_LATER, queue=jobs.QUEUE)
            queue = GaugeMetricFamily("imaging_queue_jobs", "jobs waiting for a worker (ready now)")
            queue.add_metric([], waiting)
            delayed = GaugeMetricFamily("imaging_queue_delayed_jobs", "jobs waiting for a later time "
                                        "(a request left for want of space)")  # fmt: skip
            delayed.add_metric([], later)
            age = GaugeMetricFamily(
                "imaging_queue_oldest_seconds", "age of the oldest job ready to run (0: none)"
            )
            age.add_metric([], float(oldest))
            beats = q(_WORKERS)
            workers = GaugeMetricFamily(
                "imaging_workers", "workers with a row in the database (live or not yet pruned)"
            )
            workers.add_metric([], len(beats))
            heartbeat = GaugeMetricFamily("imaging_worker_heartbeat_age_seconds", "seconds since each worker's "
                                          "last heartbeat", labels=["worker_id"])  # fmt: skip
            for worker_id, seconds in beats:
                heartbeat.add_metric([str(worker_id)], float(seconds))
            ((refused,),) = q(_SPACE, reason=f"{SPACE_REASON}%")
            space = CounterMetricFamily(
                "imaging_space_refusals", "times a worker left a request for want of disk space"
            )
            space.add_metric([], refused)
            ((store_failed,),) = q(_STORE_FAILED)
            runs_failed = CounterMetricFamily("imaging_record_store_failed_runs", "runs that failed on the record "
                                              "store (on any host)")  # fmt: skip
            runs_failed.add_metric([], store_failed)
        return [requests, running, stages, verdicts, converted, queue, delayed, age, workers, heartbeat, space,
                runs_failed]  # fmt: skip


def _check_records(reader: Any) -> str | None:
    """None when the record store answers (a listing of one run name that need not exist)."""
    if isinstance(reader, record.LocalReader):
        return None
    try:
        reader.names("healthcheck")
    except (ImagingError, OSError) as e:
        return str(e)
    return None


def add_monitoring(app: FastAPI, store: Store, settings: Settings, reader: Any) -> None:
    """Add ``/metrics``, ``/healthz`` and ``/readyz`` to the API (no token: see the module)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(store))
    failures = Counter("imaging_record_store_failures", "record store calls that failed in this process",
                       ["where"], registry=registry)  # fmt: skip
    app.state.record_store_failures = failures

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> PlainTextResponse:
        t0 = time.monotonic()
        try:
            with store.session() as s:
                s.execute(text("SELECT 1 FROM procrastinate_workers LIMIT 1"))
        except StoreError as e:
            return PlainTextResponse(f"not ready: {e}\n", status_code=503)
        if settings.records.bucket:
            problem = _check_records(reader)
            if problem is not None:
                failures.labels("readyz").inc()
                return PlainTextResponse(f"not ready: {' '.join(problem.split())}\n", status_code=503)
        return PlainTextResponse(f"ready ({1000 * (time.monotonic() - t0):.0f} ms)\n")
