"""The snapshot a cloud copy made, noted in the run's work directory as soon as it exists, so that
a copy cut mid-way (or a process killed) resumes from the same point in time instead of making a
new snapshot, and nothing made for a copy is ever lost track of. The note goes once the copy
completes or fails for good (and the snapshot with it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from imaging.clouds.resume import Cut
from imaging.sparse import atomic_path

NOTE = "source.snapshot.json"
# The failures after which resume.py keeps what arrived: the snapshot it is of stays with it.
KEEP = (Cut, OSError, TimeoutError, EOFError, KeyboardInterrupt)
# EC2 snapshot ids and Glance image ids (UUIDs): anything else in the note is not ours.
_ID = re.compile(r"^(snap-[0-9a-f]{8,17}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def find_snapshot(work: Path, source: str) -> str | None:
    """The snapshot noted for ``source`` in ``work``; None when there is none, or for another
    source, or the note is unreadable (then a new snapshot is made, as for a first copy)."""
    try:
        note = json.loads((work / NOTE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("source") != source:
        return None
    snapshot = note.get("snapshot")
    return snapshot if isinstance(snapshot, str) and _ID.match(snapshot) else None


def note_snapshot(work: Path, source: str, snapshot: str) -> None:
    with atomic_path(work / NOTE, durable=True) as part:
        part.write_text(json.dumps({"source": source, "snapshot": snapshot}) + "\n", encoding="utf-8")


def forget_snapshot(work: Path) -> None:
    (work / NOTE).unlink(missing_ok=True)
