"""The explorer's logic on a directory standing in for a guest: browsing stays inside it and
stays small, the clean words and stage choices, and the parameters a step-by-step run may change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imaging import config
from imaging.disk.files import Guest
from imaging.errors import ParameterError
from imaging.explore import steps
from imaging.run import pipeline
from imaging.run.request import Request
from imaging.workspace import Workspace


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    root = tmp_path / "guest"
    (root / "etc" / "rc.d").mkdir(parents=True)
    (root / "etc" / "rc.d" / "rc.local").write_text("touch /var/lock/subsys/local\n")
    (root / "etc" / "rc.local").symlink_to("rc.d/rc.local")
    (root / "etc" / "shadow").write_text("root:guest-hash:1::::::\n")
    (root / "etc" / "escape").symlink_to("/../../../etc/shadow")  # the guest's, not the host's
    (root / "etc" / "dangling").symlink_to("/nowhere")
    (root / "big.log").write_text("x" * (steps.MAX_VIEW + 100))
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"\x7fELF\0\0\0binary")
    os.mkfifo(root / "fifo")
    return Guest(root)


def test_listing_marks_kinds_and_links(guest: Guest) -> None:
    listing = steps.list_dir(guest, "/etc/../../etc")
    assert listing.path == "/etc" and listing.total == 5
    kinds = {e.name: (e.kind, e.link) for e in listing.entries}
    assert kinds["rc.local"] == ("symlink", "rc.d/rc.local")
    assert kinds["rc.d"] == ("directory", "")
    assert steps.list_dir(guest, "/").path == "/"


def test_files_are_shown_safely(guest: Guest) -> None:
    v = steps.view_file(guest, "/etc/escape")
    assert v.text == "root:guest-hash:1::::::\n" and v.real == "/etc/shadow"
    v = steps.view_file(guest, "etc/rc.local")
    assert v.real == "/etc/rc.d/rc.local" and "symlink to 'rc.d/rc.local'" in v.note
    v = steps.view_file(guest, "/big.log")
    assert len(v.text) == steps.MAX_VIEW and "the first" in v.note
    v = steps.view_file(guest, "/bin/tool")
    assert v.note.startswith("binary") and v.text.startswith("00000000  7f 45 4c 46")
    assert "not opened" in steps.view_file(guest, "/fifo").note  # a FIFO would block a reader
    assert "leading nowhere" in steps.view_file(guest, "/etc/dangling").note
    assert steps.view_file(guest, "/etc").is_dir
    assert steps.view_file(guest, "/missing").note == "no such file in the guest"


def test_guest_paths_stop_at_the_root() -> None:
    assert steps.guest_path("../../etc/./passwd") == "/etc/passwd"
    assert steps.guest_path("") == "/"


def test_clean_words_say_the_difference_from_the_profile() -> None:
    base = ["logfiles", "machine-id", "tmp-files"]
    assert steps.clean_words(base, ["machine-id", "tmp-files", "package-cache"]) == [
        "package-cache",
        "-logfiles",
    ]
    assert steps.clean_words(base, base) == []


def test_which_stages_run() -> None:
    stages = ["00-acquire", "10-clean", "20-migrate", "30-bootable"]
    pending = stages[1:]
    assert steps.stages_to_run(stages, pending, "all") == pending
    assert steps.stages_to_run(stages, pending, "none") == []
    assert steps.stages_to_run(stages, pending, "20-migrate") == ["10-clean", "20-migrate"]
    with pytest.raises(ParameterError, match="RUN_STAGES"):
        steps.stages_to_run(stages, pending, "99-nothing")


def test_only_parameters_no_completed_stage_used_can_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("IMAGING_MOUNT_LEDGER", "")  # the runner sets these; the test restores them
    monkeypatch.setenv("IMAGING_PIPELINE", "")
    request = Request.create(source="/dev/null", name="amend", target="kvm", format="vmdk")
    ws, request = pipeline.open_run(None, request)
    runner = pipeline.Runner(ws, request)
    assert runner.next_stage() == "00-acquire"
    (ws.notebooks / "00-acquire.ipynb").write_text("{}")
    (ws.notebooks / "10-clean.ipynb").write_text("{}")
    assert runner.next_stage() == "20-migrate"
    with pytest.raises(ParameterError, match="clean: already used"):
        runner.amend(clean=["-logfiles"])
    runner.amend(target="virtualbox")
    assert runner.request.target == "virtualbox"
    assert Workspace.open(ws.root).request()["target"] == "virtualbox"  # request.json follows
    assert pipeline.open_run(ws.id, None)[1] == runner.request


def test_runs_asked_for_in_the_same_second_get_their_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path / "runs"))
    request = Request.create(source="/dev/null", name="n" * 80)
    ids = [pipeline.open_run(None, request)[0].id for _ in range(3)]
    assert len(set(ids)) == 3 and all(
        len(i) <= 80 and i.startswith(config.slug("n" * 80) + "-") for i in ids
    )
    assert all((tmp_path / "runs" / i / "request.json").is_file() for i in ids)
