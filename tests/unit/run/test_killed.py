"""A run whose process was killed outright in a stage, then resumed: the killed attempt is in
``state.json``'s history, its partial notebook kept as a failed attempt's, and both on the
audit chain."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat

from imaging.run import audit, killed, pipeline
from imaging.run.request import Request
from imaging.workspace import Workspace, write_json

STARTED = "2026-01-02T03:04:05+00:00"


def killed_in_migrate(partial: bool) -> tuple[Workspace, Request]:
    """A run as ``kill -9`` in 20-migrate leaves it: two stages done, 20-migrate running."""
    ws, request = pipeline.open_run("killed", Request.create(source="/x.img", name="killed"))
    history = []
    for time, stage in (("2026-01-02T03:00:00+00:00", "00-acquire"), ("2026-01-02T03:02:00+00:00", "10-clean"),
                        (STARTED, "20-migrate")):  # fmt: skip
        history.append({"time": time, "state": "running", "stage": stage, "error": None})
        if stage != "20-migrate":
            nbformat.write(nbformat.v4.new_notebook(), ws.notebooks / f"{stage}.ipynb")
            audit.record_notebook(ws, ws.notebooks / f"{stage}.ipynb")
    write_json(ws.state_file, {"state": "running", "stage": "20-migrate", "error": None, "history": history})
    if partial:  # as papermill last saved it: the title, one cell run, the next never reached
        cells = [nbformat.v4.new_markdown_cell("# 20-migrate"),
                 nbformat.v4.new_code_cell("print('consoles')", outputs=[nbformat.v4.new_output(
                     "stream", name="stdout", text="consoles\n")]),
                 nbformat.v4.new_code_cell("migrate.fstab(ws)")]  # fmt: skip
        nbformat.write(nbformat.v4.new_notebook(cells=cells), ws.notebooks / ".20-migrate.part.ipynb")
    return ws, request


def chain(ws: Workspace) -> list[tuple[str, str]]:
    return [(e["kind"], e["file"]) for e in audit.load(ws.root)["entries"]]


def test_a_resumed_run_records_the_attempt_that_was_killed(tmp_path: Path) -> None:
    ws, request = killed_in_migrate(partial=True)
    runner = pipeline.Runner(ws, request)
    with runner.holding():  # what resume does first, before it runs any stage
        pass

    state = json.loads(ws.state_file.read_text())
    assert [(h["state"], h["stage"]) for h in state["history"]] == [
        ("running", "00-acquire"), ("running", "10-clean"), ("running", "20-migrate"), ("killed", "20-migrate"),
    ]  # fmt: skip
    assert state["history"][-1]["error"] == killed.message(STARTED)
    assert f"started {STARTED}" in state["error"] and "without clean-up" in state["error"]

    kept = ws.notebooks / "20-migrate.failed-1.ipynb"
    assert not (ws.notebooks / ".20-migrate.part.ipynb").exists()
    cells = nbformat.read(kept, as_version=4).cells
    assert cells[0].source == "# 20-migrate"
    assert "**This attempt at 20-migrate failed**: killed: the attempt, started" in cells[1].source
    assert cells[2].outputs[0]["text"] == "consoles\n"  # what it did before it was killed

    record = json.loads((ws.notebooks / "20-migrate.killed-1.json").read_text())
    assert (record["stage"], record["started"], record["notebook"]) == ("20-migrate", STARTED, kept.name)
    assert chain(ws)[4:] == [
        ("notebook", "notebooks/20-migrate.failed-1.ipynb"), ("html", "notebooks/20-migrate.failed-1.html"),
        ("killed", "notebooks/20-migrate.killed-1.json"),
    ]  # fmt: skip
    assert audit.verify(ws.root).ok
    assert runner.next_stage() == "20-migrate"  # the stage runs again

    # Recorded once: the next start finds the attempt ended.
    with pipeline.Runner(ws, request).holding():
        pass
    assert len(audit.load(ws.root)["entries"]) == 7
    assert json.loads(ws.state_file.read_text())["history"][-1]["state"] == "killed"


def test_an_attempt_killed_before_its_notebook_was_written_is_recorded_too(tmp_path: Path) -> None:
    ws, request = killed_in_migrate(partial=False)
    with pipeline.Runner(ws, request).holding():
        pass
    assert not list(ws.notebooks.glob("20-migrate.failed-*"))
    assert json.loads((ws.notebooks / "20-migrate.killed-1.json").read_text())["notebook"] is None
    assert chain(ws)[4:] == [("killed", "notebooks/20-migrate.killed-1.json")]
    assert audit.verify(ws.root).ok
    assert json.loads(ws.state_file.read_text())["state"] == "killed"


def test_a_takeover_killed_before_its_transition_does_not_record_the_attempt_twice(tmp_path: Path) -> None:
    # The crash campaign's case: a resume killed after the killed record went onto the chain,
    # before state.json's `killed` transition; the next resume finds 20-migrate running still.
    ws, request = killed_in_migrate(partial=False)
    before = ws.state_file.read_bytes()
    with pipeline.Runner(ws, request).holding():
        pass
    ws.state_file.write_bytes(before)
    with pipeline.Runner(ws, request).holding():
        pass
    assert [p.name for p in ws.notebooks.glob("20-migrate.killed-*")] == ["20-migrate.killed-1.json"]
    assert chain(ws)[4:] == [("killed", "notebooks/20-migrate.killed-1.json")]
    assert audit.verify(ws.root).ok
    history = json.loads(ws.state_file.read_text())["history"]
    assert [h["state"] for h in history].count("killed") == 1


def test_a_run_killed_between_two_stages_has_no_killed_attempt(tmp_path: Path) -> None:
    ws, request = killed_in_migrate(partial=False)
    nbformat.write(nbformat.v4.new_notebook(), ws.notebooks / "20-migrate.ipynb")  # it had completed
    with pipeline.Runner(ws, request).holding():
        pass
    assert not list(ws.notebooks.glob("20-migrate.killed-*"))
    assert json.loads(ws.state_file.read_text())["state"] == "running"


def test_only_a_running_stage_that_never_ended_is_unended() -> None:
    history = [{"time": "t1", "state": "running", "stage": "10-clean"}]
    running = {"state": "running", "stage": "10-clean", "history": history}
    assert killed.unended(running, lambda stage: False) == ("10-clean", "t1")
    assert killed.unended(running, lambda stage: stage == "10-clean") is None
    assert killed.unended({**running, "state": "error"}, lambda stage: False) is None
    assert killed.unended({"state": "new", "history": []}, lambda stage: False) is None
