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


def test_a_restart_moves_the_abandoned_attempt_on_the_chain(tmp_path: Path) -> None:
    from imaging.run import pipeline, report

    ws = Workspace.open(tmp_path / "run-2")
    write_json(ws.request_file, {"kind": "export"})
    for stage in ("00-acquire", "10-clean"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"print('{stage}')")])
        nbformat.write(nb, ws.notebooks / f"{stage}.ipynb")
        audit.record_notebook(ws, ws.notebooks / f"{stage}.ipynb")
        ws.save_result(stage, {"done": stage})
    failed = ws.notebooks / "20-migrate.failed-1.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), failed)
    audit.append(ws, failed, "notebook")
    assert pipeline.restart(ws, "the input of 20-migrate was not kept") == 1
    names = sorted(p.name for p in ws.notebooks.glob("*.ipynb"))
    assert names == ["00-acquire.attempt-1.ipynb", "10-clean.attempt-1.ipynb", "20-migrate.failed-1.ipynb"]
    assert not list(ws.results.glob("*.json"))
    state = json.loads(ws.state_file.read_text())
    assert state["state"] == "restarted" and "attempt 1 is kept in the record" in state["error"]
    # The stages run again under their own names: old and new both verify.
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('again')")])
    nbformat.write(nb, ws.notebooks / "00-acquire.ipynb")
    audit.record_notebook(ws, ws.notebooks / "00-acquire.ipynb")
    checked = audit.verify(ws.root)
    assert checked.ok, checked.problems
    moved = [e for e in audit.load(ws.root)["entries"] if e["kind"] == "moved"]
    assert [(e["from"], e["file"]) for e in moved][:2] == [
        ("notebooks/00-acquire.ipynb", "notebooks/00-acquire.attempt-1.ipynb"),
        ("notebooks/00-acquire.html", "notebooks/00-acquire.attempt-1.html"),
    ]
    # Changing the abandoned attempt's notebook is seen under its new name; so is editing a move.
    (ws.notebooks / "10-clean.attempt-1.ipynb").write_text("{}")
    assert "notebooks/10-clean.attempt-1.ipynb changed" in audit.verify(ws.root).problems[0]
    chain = audit.load(ws.root)
    chain["entries"][moved[0]["n"]]["from"] = "notebooks/other.ipynb"
    assert any("altered" in p for p in audit.verify_chain(ws.id, chain, lambda name, like: None).problems)
    # The report lists the abandoned attempt before the stage's run, and says what it was.
    shown = [(stage, tag) for stage, tag, _ in report.stage_notebooks(ws.root)]
    assert shown == [("00-acquire", "attempt-1"), ("00-acquire", None), ("10-clean", "attempt-1"),
                     ("20-migrate", "failed-1")]  # fmt: skip
    assert report._label("attempt-1").startswith("attempt 1 (abandoned")


def test_a_raw_artifact_is_chained_by_its_content_digest_locally_and_in_a_store(tmp_path: Path) -> None:
    # A raw artifact's entry holds its content digest (holes not read); the chain is checked
    # the same way on the run directory and on a stream of its bytes (the object store).
    ws = Workspace.open(tmp_path / "run-1")
    (ws.root / "out").mkdir()
    raw = ws.root / "out" / "demo.raw"
    with open(raw, "wb") as f:
        f.truncate(5 << 20)
        f.seek(3 << 20)
        f.write(b"data" * 1000)
    head = audit.append(ws, raw, "artifact", audit.sparse.content_digest(raw))
    chain = audit.load(ws.root)
    assert chain["entries"][0]["sha256"].startswith("sha256-1MiB-list:")
    assert audit.verify(ws.root, head).ok

    def from_store(name: str, like: str) -> str | None:
        data = (ws.root / name).read_bytes()
        return audit.stream_digest((data[i : i + 65536] for i in range(0, len(data), 65536)), like)

    assert audit.verify_chain(ws.id, chain, from_store, head).ok
    with open(raw, "r+b") as f:  # a byte written into a hole
        f.seek(1 << 20)
        f.write(b"\1")
    assert audit.verify(ws.root).problems[0].startswith("out/demo.raw changed since it was recorded")
    assert not audit.verify_chain(ws.id, chain, from_store).ok
