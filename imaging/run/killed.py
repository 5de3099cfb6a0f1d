"""A stage attempt whose run's process was killed outright, recorded by the next one to hold the run.

A process that dies by SIGKILL (``kill -9``, the OOM killer, its host lost) cannot say how its
stage ended: ``state.json`` still says the stage is running, its executed notebook lies at its
partial name (the next attempt would write over it), and nothing of the attempt is on the audit
chain. The next process to hold the run's lock knows the first one is gone, and records the
attempt as the first would have recorded a failure (pipeline.Runner): its partial notebook kept
as ``<stage>.failed-N.ipynb`` and chained, a ``killed`` transition in ``state.json``'s history,
and ``notebooks/<stage>.killed-K.json`` on the chain, as a ``killed`` entry: what is known of
the attempt, whether or not it got as far as a notebook (papermill saves one before the first
cell runs; a process killed while its kernel started left none).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imaging.run import audit
from imaging.workspace import Workspace, write_json


def unended(state: dict[str, Any], done: Callable[[str], bool]) -> tuple[str, str | None] | None:
    """(stage, when it started) of the attempt ``state`` (``state.json``'s data) says is running,
    if it never ended; None if none is. A stage whose notebook has its final name (``done``)
    ended: the process died after it, before the next one began."""
    stage = state.get("stage")
    if state.get("state") != "running" or not stage or done(str(stage)):
        return None
    started = next(
        (h.get("time") for h in reversed(state.get("history", []))
         if h.get("state") == "running" and h.get("stage") == stage),
        None,
    )  # fmt: skip
    return str(stage), started


def message(started: str | None) -> str:
    """The attempt's error, as ``state.json`` and its notebook's summary give it."""
    when = f", started {started}," if started else ""
    return (f"killed: the attempt{when} ended without clean-up (its process was killed, "
            "or its host lost); resume runs the stage again")  # fmt: skip


def record(ws: Workspace, stage: str, started: str | None, notebook: Path | None, ended: list[str]) -> Path:
    """``notebooks/<stage>.killed-K.json`` written and chained (kind ``killed``); returns it.
    ``ended``: the attempt's processes that were still running, ended before this. An attempt
    recorded already is not recorded again: a takeover killed after its record, before its
    ``killed`` transition, leaves the attempt running in ``state.json`` for the next one (which
    chained the record, pipeline._chain_left)."""
    known = sorted(ws.notebooks.glob(f"{stage}.killed-*.json"))
    for path in known:
        with contextlib.suppress(OSError, ValueError):
            if started is not None and json.loads(path.read_text()).get("started") == started:
                return path
    n = 1 + len(known)
    path = ws.notebooks / f"{stage}.killed-{n}.json"
    write_json(path, {
        "stage": stage,
        "started": started,
        "found": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "ended": "without clean-up: the run's process was killed, or its host lost",
        "notebook": notebook.name if notebook is not None else None,
        "processes_left": ended,
    })  # fmt: skip
    audit.append(ws, path, "killed")
    return path
