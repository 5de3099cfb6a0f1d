"""The audit record of a run: an HTML render of every executed notebook, and ``audit.json``, a
hash chain over every executed notebook, its render, ``result.json`` and the artifact, in order.

Each entry holds a file's sha256 and ``hash = sha256(prev + "\\n" + file + "\\n" + sha256)``,
where ``prev`` is the entry before's hash (64 zeros for the first). Changing a recorded file
breaks its entry; editing ``audit.json`` to match breaks the chain from there on unless every
later hash is recomputed too, which the head (the last hash, stored by the service with the
request and sent in the completion mail) then gives away. ``python -m imaging audit RUN``
verifies a run and names the file that changed.

A run started again from its first stage on another host (its first attempt's disks were not
kept) renames that attempt's notebooks (``00-acquire.ipynb`` -> ``00-acquire.attempt-1.ipynb``)
with a ``moved`` entry each: ``hash = sha256(prev + "\n" + "old -> new" + "\n" + sha256)``; the
entries before it that named the old file are then checked against the file under its new name.

A stage attempt whose process was killed outright is chained by the next start of the run
(``killed.py``): its partial notebook as a failed attempt's, and ``<stage>.killed-K.json``, what
is known of the attempt, as a ``killed`` entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging import sparse
from imaging.records import Record
from imaging.run import pages
from imaging.workspace import Workspace, write_json

GENESIS = "0" * 64


def render_html(notebook: Path) -> Path:
    """``<notebook>.html`` beside the executed notebook (:mod:`imaging.run.html`)."""
    import nbformat

    body = pages.render(nbformat.read(notebook, as_version=4), notebook.stem)
    page = notebook.with_suffix(".html")
    with sparse.atomic_path(page) as part:
        part.write_text(body, encoding="utf-8")
    return page


def _kind(like: str) -> str:
    """A recorded digest's kind: a plain sha256 (hex), or a named one before its colon
    (``sha256-1MiB-list:<hex>``, :func:`imaging.sparse.content_digest`)."""
    return like.partition(":")[0] if ":" in like else "sha256"


def file_digest(path: Path, like: str) -> str:
    """The digest of ``path`` of the kind ``like`` is (see :func:`_kind`)."""
    if _kind(like) == sparse.DIGEST_NAME:
        return sparse.content_digest(path)
    return sparse.sha256(path, desc=None)


def stream_digest(chunks: Iterable[bytes], like: str) -> str:
    """:func:`file_digest` of a file read as a stream (from the record's object store)."""
    return (
        sparse.content_digest_of(chunks) if _kind(like) == sparse.DIGEST_NAME else sparse.sha256_of(chunks)
    )


def link(prev: str, name: str, digest: str) -> str:
    return hashlib.sha256(f"{prev}\n{name}\n{digest}".encode()).hexdigest()


def _name(ws: Workspace, path: Path) -> str:
    """Files of the run by their path inside it; an artifact written elsewhere (--out) in full."""
    path = path.resolve()
    return str(path.relative_to(ws.root)) if path.is_relative_to(ws.root) else str(path)


def _path(root: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else root / name


def load(root: Path) -> dict[str, Any]:
    path = root / "audit.json"
    if not path.exists():
        return {"run": root.name, "algorithm": "sha256", "entries": [], "head": GENESIS}
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def append(ws: Workspace, path: Path, kind: str, digest: str | None = None) -> str:
    """Chain one file onto the run's audit record; return the new head."""
    chain = load(ws.root)
    name = _name(ws, path)
    # What the chain names must be on disk first (a notebook renamed into place, a render).
    sparse.make_durable(path)
    digest = digest or sparse.sha256(path, desc=None)
    head = link(chain["head"], name, digest)
    chain["entries"].append({"n": len(chain["entries"]), "kind": kind, "file": name, "sha256": digest,
                             "prev": chain["head"], "hash": head})  # fmt: skip
    chain["head"] = head
    write_json(ws.root / "audit.json", chain)
    return head


def move(ws: Workspace, old: Path, new: Path) -> str:
    """Rename a recorded file, and chain the rename (see the module); return the new head."""
    chain = load(ws.root)
    digest = sparse.sha256(old, desc=None)
    os.replace(old, new)
    src, dst = _name(ws, old), _name(ws, new)
    head = link(chain["head"], f"{src} -> {dst}", digest)
    chain["entries"].append({"n": len(chain["entries"]), "kind": "moved", "file": dst, "from": src,
                             "sha256": digest, "prev": chain["head"], "hash": head})  # fmt: skip
    chain["head"] = head
    write_json(ws.root / "audit.json", chain)
    return head


def record_notebook(ws: Workspace, notebook: Path) -> None:
    """After a stage (completed or failed): its HTML render, then both files onto the chain."""
    html = render_html(notebook)
    append(ws, notebook, "notebook")
    append(ws, html, "html")


def chained(ws: Workspace, path: Path) -> bool:
    """Whether ``path`` is named on the run's chain."""
    name = _name(ws, path)
    return any(e["file"] == name for e in load(ws.root)["entries"])


def seal(ws: Workspace, summary: dict[str, Any]) -> str:
    """At the end of a run: result.json and the artifact, with the digest stage 40 computed: its
    sha256, or for a raw artifact (sparse) its content digest, which checking costs the data
    only (a sha256 would cost the disk's virtual size every time the chain is verified). What a
    run killed while sealing chained already is not chained twice."""
    if not chained(ws, ws.result_file):
        append(ws, ws.result_file, "result")
    if summary.get("path") and not chained(ws, Path(summary["path"])):
        exported = ws.result("40-export") if ws.has_result("40-export") else {}
        digest = (exported.get("details") or {}).get("content_digest") or summary.get("sha256")
        return append(ws, Path(summary["path"]), "artifact", digest)
    return str(load(ws.root)["head"])


@dataclass
class Report(Record):
    run: str
    ok: bool
    entries: int
    head: str
    problems: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.ok:
            return f"run {self.run}: audit record intact ({self.entries} files, head {self.head})"
        return f"run {self.run}: {self.problems[0]}" + (
            f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        )


def verify(root: Path, expected_head: str | None = None) -> Report:
    """Check the chain's links, every recorded file's sha256, and the head if one is given."""
    if not (root / "audit.json").exists():
        return Report(root.name, False, 0, GENESIS, [f"{root / 'audit.json'} does not exist"])

    def digest(name: str, like: str) -> str | None:
        path = _path(root, name)
        return file_digest(path, like) if path.is_file() else None

    return verify_chain(root.name, load(root), digest, expected_head)


def _where_now(entries: list[dict[str, Any]]) -> list[str]:
    """Each entry's file under the name it has now: a later ``moved`` entry renamed it."""
    renamed: dict[str, str] = {}
    found = []
    for entry in reversed(entries):
        name = entry["file"]
        found.append(renamed.get(name, name))
        if entry.get("kind") == "moved":
            renamed[entry["from"]] = renamed.get(name, name)
            renamed.pop(name, None)
    return found[::-1]


def verify_chain(
    run: str,
    chain: dict[str, Any],
    digest: Callable[[str, str], str | None],
    expected_head: str | None = None,
) -> Report:
    """:func:`verify` over any store: ``digest(name, like)`` is the digest of a file of the run
    as it is now, of the kind the recorded ``like`` is (:func:`file_digest`; None: not there)."""
    problems: list[str] = []
    prev = GENESIS
    entries = chain["entries"]
    hashed: dict[tuple[str, str], str | None] = {}
    for entry, now in zip(entries, _where_now(entries), strict=True):
        name, sha = entry["file"], entry["sha256"]
        linked = f"{entry['from']} -> {name}" if entry.get("kind") == "moved" else name
        if entry["prev"] != prev or entry["hash"] != link(prev, linked, sha):
            problems.append(f"audit.json was altered at entry {entry['n']} ({name})")
        prev = entry["hash"]
        if (now, _kind(sha)) not in hashed:
            hashed[now, _kind(sha)] = digest(now, sha)
        actual = hashed[now, _kind(sha)]
        if actual is None:
            problems.append(f"{now} is missing")
        elif actual != sha:
            problems.append(f"{now} changed since it was recorded (sha256 {actual}, recorded {sha})")
    if chain["head"] != prev:
        problems.append("audit.json was altered: its head does not match its last entry")
    if expected_head is not None and expected_head != chain["head"]:
        problems.append(f"the chain's head {chain['head']} is not the expected {expected_head}")
    return Report(run, not problems, len(entries), chain["head"], problems)
