"""A request's run going on on this host: its run directory made the record's latest state first.

Hosts share the database and the record store (``imaging/run/record.py``), nothing else. Before
a worker runs a request whose record exists, :func:`prepare` brings the record here: nothing to
do when this host made its latest state; otherwise the record's files come from the store
(results rewritten from the other host's run directory to this one's), and the run resumes at
the stage it was in when that stage's input disk is in the store (the artifact always is once
made; work disks with ``records.keep_inputs``), or else starts again from its first stage, the
abandoned attempt's notebooks kept in the record and on its audit chain.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from imaging import config, sparse
from imaging.errors import ImagingError
from imaging.run import pipeline
from imaging.run.record import PUSHED, ZST, ObjectStore, Pusher, StoreConfig
from imaging.workspace import Workspace, write_json

# How long a run's last host may take to put its last files in the store (see _settled).
SETTLE = 30.0


def prepare(cfg: StoreConfig, run: str) -> str:
    """Returns ``new`` (no record anywhere: a new run), ``local`` (this host made the latest
    state, or a later one than the store holds: its directory, work disks included, goes on as
    it is), ``resume`` (the record came from the store, with the disk the next stage needs), or
    ``restart`` (that disk was not kept: the run starts again from its first stage)."""
    store = ObjectStore(cfg)
    root = config.runs_dir() / run
    remote = store.names(run)
    if "request.json" not in remote:
        return "new" if not (root / "request.json").exists() else "local"
    state = store.read(run, "state.json") or b"{}"
    if (root / "state.json").is_file() and _ahead((root / "state.json").read_bytes(), state):
        return "local"
    state = _settled(store, run, state)
    if root.exists():
        shutil.rmtree(root)
    ws = Workspace.open(root)
    pushed: dict[str, list[int]] = {}
    for name in remote:
        if name.split("/")[0] in ("work", "out"):
            continue
        store.download(run, name, root / name)
        st = (root / name).stat()
        pushed[name] = [st.st_size, st.st_mtime_ns]
    _relocate(root, str(json.loads(state).get("root") or ""))
    for name in pushed:  # rewritten here: pushed again
        if name.startswith("results/"):
            pushed[name] = [-1, -1]
    write_json(root / PUSHED, pushed)
    stages = config.pipeline_stages(str(ws.request().get("kind") or "export"))
    left = [s for s in stages if not (ws.notebooks / f"{s}.ipynb").exists()]
    if not left or left[0] == stages[0]:
        return "resume"
    had_esp = ws.has_result("00-acquire") and bool(ws.result("00-acquire").get("esp"))
    needs = [n for n in config.stage_inputs(left[0]) if n != "work/esp.raw" or had_esp]
    wanted = {need: _stored_name(ws, need) for need in needs}
    missing = [need for need, stored in wanted.items() if stored is None or stored not in remote]
    if not missing:
        for need, stored in wanted.items():
            assert stored is not None
            target = root / stored.removesuffix(ZST)
            store.download(run, stored, target)
            if need.startswith("work/"):
                _check(store, run, need, target)
        return "resume"
    pipeline.restart(ws, f"the input of {left[0]} ({', '.join(missing)}) was not kept in the record store")
    with contextlib.suppress(ImagingError):
        Pusher(ws, cfg).push()
    return "restart"


def _ahead(local: bytes, remote: bytes) -> bool:
    """Whether this host's state of the run is the record's or later: the same, or its history
    goes on from the record's. A store that was away while the run went on holds an older
    state (and some of the files that came after it, pushed once it was back): taking that
    record would throw the run's own directory away for a worse one that cannot resume."""
    if local == remote:
        return True
    try:
        mine, theirs = json.loads(local).get("history"), json.loads(remote).get("history")
    except (ValueError, AttributeError):
        return False
    return isinstance(mine, list) and isinstance(theirs, list) and mine[: len(theirs)] == theirs


def _settled(store: ObjectStore, run: str, state: bytes) -> bytes:
    """The record's ``state.json`` once the host that last ran the run is done with it. A run
    whose worker was lost gets SIGTERM and puts its last files in the store as it stops (its
    interrupted notebook, audit chain, then its state); taking the record while it still says
    ``running`` would take half of that. Waited for up to SETTLE seconds: a host that is gone
    altogether never writes again."""
    deadline = time.monotonic() + SETTLE
    while _state_of(state) == "running" and time.monotonic() < deadline:
        time.sleep(1)
        state = store.read(run, "state.json") or b"{}"
    return state


def _state_of(state: bytes) -> str:
    try:
        return str(json.loads(state).get("state") or "")
    except ValueError:
        return ""


def _stored_name(ws: Workspace, need: str) -> str | None:
    """Where an input lies in the store: a work disk compressed, the artifact as it is (its
    name in the run directory, from 40-export's result)."""
    if need != "artifact":
        return need + ZST
    if not ws.has_result("40-export"):
        return None
    path = Path(str(ws.result("40-export").get("path") or ""))
    return str(path.relative_to(ws.root)) if path.is_relative_to(ws.root) else None


def _check(store: ObjectStore, run: str, name: str, path: Path) -> None:
    sums = (store.read(run, name + ".sha256") or b"").decode().split()
    if not sums or sparse.sha256(path, desc=None) != sums[0]:
        path.unlink(missing_ok=True)
        raise ImagingError(f"the record store's copy of {run}/{name} does not match its sha256")


def _relocate(root: Path, old: str) -> None:
    """Stage results name files by absolute path (the artifact's): from the other host's run
    directory to this one's. (result.json is on the audit chain: it stays as it was made.)"""
    if not old or old == str(root):
        return

    def move(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return str(root) + value[len(old) :]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    for path in (root / "results").glob("*.json"):
        write_json(path, move(json.loads(path.read_text())))
