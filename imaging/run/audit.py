"""The audit record of a run: an HTML render of every executed notebook, and ``audit.json``, a
hash chain over every executed notebook, its render, ``result.json`` and the artifact, in order.

Each entry holds a file's sha256 and ``hash = sha256(prev + "\\n" + file + "\\n" + sha256)``,
where ``prev`` is the entry before's hash (64 zeros for the first). Changing a recorded file
breaks its entry; editing ``audit.json`` to match breaks the chain from there on unless every
later hash is recomputed too, which the head (the last hash, stored by the service with the
request and sent in the completion mail) then gives away. ``python -m imaging audit RUN``
verifies a run and names the file that changed.
"""

from __future__ import annotations

import hashlib
import json
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


def file_digest(path: Path, like: str) -> str:
    """The digest of ``path`` of the kind ``like`` is: a plain sha256 (hex), or a named one
    (``sha256-1MiB-list:<hex>``, :func:`imaging.sparse.content_digest`)."""
    if like.startswith(sparse.DIGEST_NAME + ":"):
        return sparse.content_digest(path)
    return sparse.sha256(path, desc=None)


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


def record_notebook(ws: Workspace, notebook: Path) -> None:
    """After a stage (completed or failed): its HTML render, then both files onto the chain."""
    html = render_html(notebook)
    append(ws, notebook, "notebook")
    append(ws, html, "html")


def seal(ws: Workspace, summary: dict[str, Any]) -> str:
    """At the end of a run: result.json and the artifact, with the digest stage 40 computed: its
    sha256, or for a raw artifact (sparse) its content digest, which checking costs the data
    only (a sha256 would cost the disk's virtual size every time the chain is verified)."""
    append(ws, ws.result_file, "result")
    if summary.get("path"):
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
    chain = load(root)
    problems: list[str] = []
    prev = GENESIS
    for entry in chain["entries"]:
        name, digest = entry["file"], entry["sha256"]
        if entry["prev"] != prev or entry["hash"] != link(prev, name, digest):
            problems.append(f"audit.json was altered at entry {entry['n']} ({name})")
        prev = entry["hash"]
        path = _path(root, name)
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        actual = file_digest(path, digest)
        if actual != digest:
            problems.append(f"{name} changed since it was recorded (sha256 {actual}, recorded {digest})")
    if chain["head"] != prev:
        problems.append("audit.json was altered: its head does not match its last entry")
    if expected_head is not None and expected_head != chain["head"]:
        problems.append(f"the chain's head {chain['head']} is not the expected {expected_head}")
    return Report(root.name, not problems, len(chain["entries"]), chain["head"], problems)
