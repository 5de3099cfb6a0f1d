"""The order a run's record goes to the store in: what a push cut half-way leaves must resume."""

from __future__ import annotations

from pathlib import Path

from imaging.run import record
from imaging.workspace import Workspace


def test_results_before_notebooks_and_the_chain_and_state_last(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "ir-0123456789ab")
    for name in ("request.json", "commands.jsonl", "notebooks/00-acquire.ipynb", "notebooks/00-acquire.html",
                 "results/00-acquire.json", "verify/serial.log", "audit.json", "state.json", "work/source.raw",
                 ".lock"):  # fmt: skip
        (ws.root / name).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / name).write_text("x")
    names = record._record_files(ws)
    assert names[0] == "results/00-acquire.json" and names[-2:] == ["audit.json", "state.json"]
    assert "work/source.raw" not in names and ".lock" not in names
    assert names.index("notebooks/00-acquire.ipynb") > names.index("results/00-acquire.json")
