"""The audit chain: built in order, verified, and it names the file that changed."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat

from imaging.run import audit
from imaging.workspace import Workspace, write_json


def run(tmp_path: Path) -> Workspace:
    ws = Workspace.open(tmp_path / "run-1")
    for stage in ("00-acquire", "30-bootable"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hi')")])
        nbformat.write(nb, ws.notebooks / f"{stage}.ipynb")
        audit.record_notebook(ws, ws.notebooks / f"{stage}.ipynb")
    (ws.root / "out").mkdir()
    artifact = ws.root / "out" / "demo.qcow2"
    artifact.write_bytes(b"disk" * 1000)
    summary = {"path": str(artifact), "sha256": audit.sparse.sha256(artifact, desc=None)}
    write_json(ws.result_file, summary)
    audit.seal(ws, summary)
    return ws


def test_chain_in_order_and_intact(tmp_path: Path) -> None:
    ws = run(tmp_path)
    chain = json.loads((ws.root / "audit.json").read_text())
    assert [(e["kind"], e["file"]) for e in chain["entries"]] == [
        ("notebook", "notebooks/00-acquire.ipynb"), ("html", "notebooks/00-acquire.html"),
        ("notebook", "notebooks/30-bootable.ipynb"), ("html", "notebooks/30-bootable.html"),
        ("result", "result.json"), ("artifact", "out/demo.qcow2"),
    ]  # fmt: skip
    assert "<html" in (ws.notebooks / "00-acquire.html").read_text()
    report = audit.verify(ws.root, chain["head"])
    assert report.ok and report.entries == 6 and report.head == chain["head"]
    assert "intact" in report.message


def test_a_changed_file_is_named(tmp_path: Path) -> None:
    ws = run(tmp_path)
    nb = ws.notebooks / "30-bootable.ipynb"
    nb.write_text(nb.read_text().replace("hi", "ho"))
    report = audit.verify(ws.root)
    assert not report.ok
    assert report.problems == [
        f"notebooks/30-bootable.ipynb changed since it was recorded (sha256 "
        f"{audit.sparse.sha256(nb, desc=None)}, recorded {report_digest(ws, 2)})"
    ]


def report_digest(ws: Workspace, n: int) -> str:
    return str(json.loads((ws.root / "audit.json").read_text())["entries"][n]["sha256"])


def test_an_edited_chain_is_caught(tmp_path: Path) -> None:
    ws = run(tmp_path)
    head = json.loads((ws.root / "audit.json").read_text())["head"]
    # Someone changes the artifact and patches its digest into audit.json.
    artifact = ws.root / "out" / "demo.qcow2"
    artifact.write_bytes(b"evil" * 1000)
    chain = json.loads((ws.root / "audit.json").read_text())
    chain["entries"][-1]["sha256"] = audit.sparse.sha256(artifact, desc=None)
    (ws.root / "audit.json").write_text(json.dumps(chain))
    assert audit.verify(ws.root).problems == ["audit.json was altered at entry 5 (out/demo.qcow2)"]
    # Recomputing the whole chain makes it consistent again, but not with the head given out.
    prev = chain["entries"][-1]["prev"]
    chain["entries"][-1]["hash"] = chain["head"] = audit.link(
        prev, "out/demo.qcow2", chain["entries"][-1]["sha256"]
    )
    (ws.root / "audit.json").write_text(json.dumps(chain))
    assert audit.verify(ws.root).ok
    assert "is not the expected" in audit.verify(ws.root, head).message


def test_a_missing_file_and_a_missing_record(tmp_path: Path) -> None:
    ws = run(tmp_path)
    (ws.notebooks / "00-acquire.html").unlink()
    assert audit.verify(ws.root).problems == ["notebooks/00-acquire.html is missing"]
    assert "does not exist" in audit.verify(tmp_path).message
