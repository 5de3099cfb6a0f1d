"""Finished runs removed after the time the service's ``retention:`` keeps them, by the workers.

A completed run's work disks go when the run completes; what stays is its run directory (the
executed notebooks, the artifact, the audit chain), its log in ``<state>/logs/`` and, with a
record store, its record there. Each worker looks every ``retention.every``:

- :func:`sweep_host`: its own runs directory: a finished request's run directory and log go
  once the request has been in that state for its time (``retention.completed``, ...);
- :func:`sweep_store`: the record store: a finished request's record goes after
  ``retention.store``'s time (at least the host's); the request's row stays, with its result,
  its audit head and its history, and a transition says when the record went. Of two workers
  sweeping at once one does each request (``FOR UPDATE SKIP LOCKED``);
- :func:`sweep_taken_over`: a run directory left here by a run another host took over (this
  worker lost it, or this host was down): it goes once the record store holds a later state of
  the run than this directory (``state.json``'s ``updated``: the new host has the record),
  whatever the retention.

Without a record store a run's directory *is* its record (the API reads it): it is kept for the
longer of the two times. Ages are counted from the request's last change (``updated``), which
for a finished request is when it finished.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import select, text

from imaging import config
from imaging.errors import ImagingError
from imaging.run.record import ObjectStore
from imaging.service.settings import Settings
from imaging.service.store import ImageRequest, State, Store, Transition, now

log = logging.getLogger("imaging.service.retention")
FINAL = (State.completed, State.error, State.denied, State.cancelled)
STORE_REMOVED = "retention: record removed from the record store"
_RUN_ID = re.compile(r"^ir-[0-9a-f]{12}$")
_BATCH = 100


def _local_runs() -> list[str]:
    runs = config.runs_dir()
    return sorted(p.name for p in runs.iterdir() if _RUN_ID.fullmatch(p.name)) if runs.is_dir() else []


def _remove_local(settings: Settings, run: str) -> None:
    shutil.rmtree(config.runs_dir() / run, ignore_errors=True)
    (settings.state_dir / "logs" / f"{run}.log").unlink(missing_ok=True)


def _host_seconds(settings: Settings, state: str) -> float | None:
    r = settings.retention
    # No record store: the run directory is the record, kept as long as the store would keep it.
    return r.host_seconds(state) if settings.records.bucket else r.store_seconds(state)


def sweep_host(settings: Settings, store: Store, active: Collection[str] = ()) -> list[str]:
    """Remove this host's run directories (and logs) of requests finished longer ago than their
    state's retention; return their ids. ``active``: runs of this process, never touched."""
    names = [r for r in _local_runs() if r not in active]
    removed = []
    for start in range(0, len(names), _BATCH):
        with store.session() as s:
            rows = s.execute(
                select(ImageRequest.id, ImageRequest.state, ImageRequest.updated).where(
                    ImageRequest.id.in_(names[start : start + _BATCH])
                )
            ).all()
        for run, state, updated in rows:
            seconds = _host_seconds(settings, state)
            if seconds is not None and updated < now() - timedelta(seconds=seconds):
                _remove_local(settings, run)
                log.info(
                    "retention: run %s (%s since %s) removed from this host",
                    run,
                    state,
                    f"{updated:%Y-%m-%d}",
                )
                removed.append(run)
    return removed


def sweep_store(settings: Settings, store: Store) -> list[str]:
    """Remove from the record store the records of requests finished longer ago than the
    store's retention of their state; return their ids."""
    if not settings.records.bucket:
        return []
    objects = ObjectStore(settings.records)
    removed = []
    for state in FINAL:
        seconds = settings.retention.store_seconds(state)
        if seconds is None:
            continue
        while True:
            with store.session() as s:
                ids = list(s.scalars(text(_DUE), {"state": state.value, "seconds": seconds,
                                                  "reason": STORE_REMOVED + "%", "limit": _BATCH}))  # fmt: skip
                for run in ids:
                    names = objects.names(run)  # an ImagingError keeps the rows unchanged (rollback)
                    if names:
                        objects.delete(run, sorted(names))
                    s.add(Transition(request_id=run, time=now(), actor="system", from_state=state.value,
                                     to_state=state.value,
                                     reason=f"{STORE_REMOVED} ({len(names)} objects; {state.value} for over "
                                     f"{seconds / 86400:g} days)"))  # fmt: skip
                    log.info(
                        "retention: record of %s removed from the record store (%d objects)", run, len(names)
                    )
            removed += ids
            if len(ids) < _BATCH:
                break
    return removed


# Finished requests past their time whose record has not been removed yet, locked for this
# transaction (the row's ``updated`` is left as it is: the request did not change).
_DUE = """
SELECT r.id FROM image_requests r
 WHERE r.state = :state AND r.updated < (now() AT TIME ZONE 'UTC') - make_interval(secs => :seconds)
   AND NOT EXISTS (SELECT 1 FROM transitions t WHERE t.request_id = r.id AND t.reason LIKE :reason)
 ORDER BY r.updated LIMIT :limit
   FOR UPDATE OF r SKIP LOCKED
"""


def sweep_taken_over(settings: Settings, store: Store, active: Collection[str] = ()) -> list[str]:
    """Remove run directories whose run another host took over and has recorded since: the
    record store's ``state.json`` is later than this directory's. A request running on a worker
    of this host is left alone (two workers may share a runs directory)."""
    if not settings.records.bucket:
        return []
    objects = ObjectStore(settings.records)
    here = socket.gethostname() + ":"
    removed = []
    for run in _local_runs():
        if run in active:
            continue
        local = config.runs_dir() / run / "state.json"
        with store.session() as s:
            row = s.execute(
                select(ImageRequest.state, ImageRequest.worker).where(ImageRequest.id == run)
            ).one_or_none()
        if row is None or (row.state == State.running and (row.worker or "").startswith(here)):
            continue
        try:
            remote = objects.read(run, "state.json")
        except ImagingError as e:
            log.warning("retention: run %s: %s", run, e)
            continue
        if remote is None or not local.is_file() or not _later(remote, local.read_bytes()):
            continue
        _remove_local(settings, run)
        log.info("retention: run %s was taken over by another host (%s, worker %s): its old directory "
                 "removed from this host", run, row.state, row.worker)  # fmt: skip
        removed.append(run)
    return removed


def _later(remote: bytes, local: bytes) -> bool:
    """Whether the store's state of a run is later than this directory's (``updated``, which
    every change of a run's state sets). Not when this directory is the later one: its run
    ended here and could not put its last state in the store; this is then the fuller record."""
    try:
        theirs, ours = (datetime.fromisoformat(json.loads(b)["updated"]) for b in (remote, local))
    except (ValueError, KeyError, TypeError):
        return False
    return bool(theirs > ours)


def sweep(settings: Settings, store: Store, active: Collection[str] = ()) -> dict[str, list[str]]:
    """All three, each on its own (a store that fails does not stop the host's sweep)."""
    done = {
        "taken_over": sweep_taken_over(settings, store, active),
        "host": sweep_host(settings, store, active),
    }
    try:
        done["store"] = sweep_store(settings, store)
    except ImagingError as e:
        log.warning("retention: %s", e)
        done["store"] = []
    return done
