"""A disk that fills during a stage, told in one line: which directory, and how much room the
stage needs there.

The stages check what they can before they write (00-acquire the whole run's work files,
10-clean and 20-migrate the instance's copy, 30-bootable the disk, 40-export the artifact,
50-verify an OVA's disk). A disk can still fill after a check (another run, another user, a
record that grew), anywhere: in a cell (its ``OSError``), in a tool (its stderr), or in the
pipeline itself, saving the executed notebook. Each is turned here into the message a check
would have given, so the run fails as any stage fails: in one line, its state recorded, its
partial files swept, and ``resume`` starts the stage again once there is room.

Recording that failure takes room too (``state.json``, the failed attempt's notebook on the
audit chain): a disk full to its last block would leave the run saying it still runs, and the
next ``resume`` would take it for killed. So each stage starts with a little room set aside in
the run directory (``.room``, as databases keep a ballast file), given back when its disk fills.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from imaging import sparse
from imaging.formats import export
from imaging.workspace import Workspace

# Room a stage's records take in the run directory: its executed notebook (saved as it runs),
# its HTML render, the audit chain, state.json: well under 1 MiB for the samples.
RECORD_ROOM = 8 << 20
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as tools say it too
ROOM = 1 << 20  # state.json, the chain's entries, a failed notebook's summary: a few KiB each


def keep_room(ws: Workspace) -> None:
    """:data:`ROOM` bytes set aside in the run directory, when there are that many free."""
    path = ws.root / ".room"
    if path.exists():
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as e:
        if not is_full(e):
            raise
        return  # a disk this full fails the stage at once, in one line
    try:
        os.posix_fallocate(fd, 0, ROOM)
    except OSError as e:
        path.unlink(missing_ok=True)
        if not is_full(e):
            raise
    finally:
        os.close(fd)


def give_room(ws: Workspace) -> None:
    """The room set aside, free again: for the records of a failure, or once the run is over."""
    (ws.root / ".room").unlink(missing_ok=True)


def is_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def said_full(evalue: str) -> bool:
    """Whether an error's text (a cell's, a tool's stderr tail) is a full disk's."""
    return NO_SPACE in evalue or "Disk quota exceeded" in evalue


def need(ws: Workspace, stage: str, directory: Path, out: Path, data_bytes: int, fmt: str) -> int:
    """Room ``stage`` needs in ``directory`` for a source holding ``data_bytes``."""
    artifact = export.space_needed(data_bytes)
    if _under(directory, out):
        return artifact
    if stage == "00-acquire":
        return 2 * data_bytes + RECORD_ROOM  # the instance, then the bootable disk
    if stage in ("10-clean", "20-migrate", "30-bootable"):
        return data_bytes + RECORD_ROOM  # the instance's copy, the bootable disk
    if stage == "50-verify" and fmt == "ova":
        return data_bytes + RECORD_ROOM  # the OVA's disk unpacked
    if stage == "40-export" and _under(out, ws.root):
        return artifact + RECORD_ROOM
    return RECORD_ROOM


def message(ws: Workspace, stage: str, out: Path, data_bytes: int, fmt: str, path: str | None = None) -> str:
    """The one-line error of ``stage`` finding its disk full, writing ``path`` when known."""
    directory = _directory(ws, stage, out, path)
    free = shutil.disk_usage(directory).free
    room = need(ws, stage, directory, out, data_bytes, fmt)
    what = f"write {Path(path).name}" if path else f"run {stage}"
    return f"{sparse.space_message(directory, room, what, free)}; resume once there is room"


def path_in(evalue: str) -> str | None:
    """The file an OSError's text names (the last one: a copy's destination)."""
    found = re.findall(r"'(/[^']+)'", evalue)
    return found[-1] if found else None


def _directory(ws: Workspace, stage: str, out: Path, path: str | None) -> Path:
    """The directory the file was written in; else the one the stage writes most into."""
    if path:
        parent = Path(path).parent
        while not parent.is_dir() and parent != parent.parent:
            parent = parent.parent
        return parent
    writes = {"40-export": out, "50-verify": ws.verify, "25-secrets": ws.root}  # 25-secrets: records only
    main = writes.get(stage, ws.work)
    # A write's error names no file: of the stage's directory and the run's, the fuller one.
    candidates = [d for d in (main, ws.root) if d.is_dir()]
    return min(candidates, key=lambda d: shutil.disk_usage(d).free, default=ws.root)


def _under(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())
