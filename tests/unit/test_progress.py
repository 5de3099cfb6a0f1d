"""Progress: a bar in place in a terminal, one clean line in a stage notebook the pipeline runs."""

from __future__ import annotations

import pytest

from imaging import progress


def copy(total: int, desc: str | None) -> None:
    with progress.bytes_bar(total, desc) as bar:
        for _ in range(4):
            bar.update(total // 4)


def test_in_a_pipeline_stage_the_notebook_gets_one_final_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "_kernel", lambda: object())
    monkeypatch.setenv("IMAGING_PIPELINE", "1")
    monkeypatch.setenv("IMAGING_PROGRESS", "1")
    copy(64 << 20, "copy instance")
    out = capsys.readouterr()
    assert "\r" not in out.out and out.out.count("\n") == 1 and out.err == ""
    assert out.out.startswith("copy instance: 64.0 MiB in ") and out.out.rstrip().endswith("/s")


def test_the_final_line_stays_with_bars_off_and_small_copies(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "_kernel", lambda: object())
    monkeypatch.setenv("IMAGING_PIPELINE", "1")
    copy(4 << 20, "place filesystem")
    assert capsys.readouterr().out.startswith("place filesystem: 4.0 MiB in ")
    with progress.percent_bar("convert to qcow2") as bar:
        bar.update(100)
    assert capsys.readouterr().out.startswith("convert to qcow2: done in ")


def test_in_a_terminal_a_bar_with_bytes_rate_and_time_left(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGING_PROGRESS", "1")
    copy(64 << 20, "copy instance")
    err = capsys.readouterr().err
    assert "copy instance: 100%" in err and "64.0M/64.0M" in err and "B/s]" in err


def test_work_beside_other_work_shows_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGING_PROGRESS", "1")
    monkeypatch.setattr(progress, "_kernel", lambda: object())
    monkeypatch.setenv("IMAGING_PIPELINE", "1")
    copy(64 << 20, None)
    assert capsys.readouterr() == ("", "")
