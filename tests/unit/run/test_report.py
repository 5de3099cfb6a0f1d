"""The run's HTML report and the index of runs: stages in order, failed attempts marked, the
audit chain's verdict, and nothing from a request or an image turned into markup."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from imaging import cli
from imaging.run import audit, report, summary
from imaging.workspace import Workspace, write_json

EVIL = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def notebook(path: Path, title: str, output: str, summary_text: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "imaging", "display_name": "Python (imaging)", "language": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}"))
    nb.cells.append(nbformat.v4.new_code_cell("print(name)"))
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    nbformat.write(nb, path)
    summary.insert(path, summary_text)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path))
    ws = Workspace.open("demo-1")
    write_json(ws.request_file, {"kind": "export", "name": "demo", "source": f"/images/{EVIL}.img"})
    notebook(ws.notebooks / "00-acquire.ipynb", "00-acquire", f"file from the guest: {EVIL}",
             summary.completed("00-acquire", {"source": EVIL}))  # fmt: skip
    notebook(
        ws.notebooks / "10-clean.failed-1.ipynb", "10-clean", "first try", summary.failed("10-clean", EVIL)
    )
    notebook(ws.notebooks / "10-clean.ipynb", "10-clean", "second try", "## Summary\n\n**Cleaned** it")
    for name in ("00-acquire.ipynb", "10-clean.failed-1.ipynb", "10-clean.ipynb"):
        audit.append(ws, ws.notebooks / name, "notebook")
    write_json(ws.state_file, {"state": "error", "stage": "20-migrate", "error": EVIL, "updated": "2026-11-26",
                               "history": [{"time": "t", "state": "error", "stage": "20-migrate", "error": EVIL}]})  # fmt: skip
    return ws.root


def test_stages_in_order_failed_attempts_marked(run: Path) -> None:
    page = report.render(run)
    headings = re.findall(r"<h1 id=.(stage-[^'\"]+)", page)
    assert headings == ["stage-00-acquire", "stage-10-clean-failed-1", "stage-10-clean"]
    assert "failed attempt 1" in page
    assert page.index("first try") < page.index("second try")
    assert "<b>Cleaned</b>" in page or "<strong>Cleaned</strong>" in page  # summaries shown first, rendered


def test_nothing_from_a_request_or_an_image_becomes_markup(run: Path) -> None:
    page = report.render(run)
    assert "<script" not in page and "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;" in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?https?:", page)  # nothing fetched


def test_the_audit_verdict_is_checked_on_the_spot(run: Path) -> None:
    assert "intact" in report.render(run)
    (run / "notebooks" / "10-clean.ipynb").write_text("{}")
    page = report.render(run)
    assert "BROKEN" in page and "notebooks/10-clean.ipynb changed since it was recorded" in page


def test_index_lists_runs_and_links_reports(run: Path, tmp_path: Path) -> None:
    report.write(run)
    index = report.write_index(tmp_path).read_text()
    assert "href='demo-1/report.html'" in index and "error" in index
    assert "<script" not in index
    write_json(
        run / "result.json",
        {"path": f"/out/{EVIL}.qcow2", "sha256": "ab" * 32, "boot": {"verdict": "booted"}},
    )
    index = report.write_index(tmp_path).read_text()
    assert "<script" not in index and "<img" not in index and "ab" * 32 in index and "booted" in index


def test_cli_writes_the_report_and_the_index(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "demo-1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reports"] == [str(run / "report.html")] and Path(out["index"]).is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report"], "name one or more runs, or --all"),
        (["report", "nosuch"], "no run at"),
        (["report", "bad name!"], "bad name!"),
        (["report", "demo-1", "--all"], "name one or more runs, or --all"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    run: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imaging: error: ") and message in err and err.count("\n") == 1


def test_cli_refuses_a_directory_that_is_not_a_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(run / "notebooks")]) == 2
    assert "is not a run: it has no request.json" in capsys.readouterr().err
