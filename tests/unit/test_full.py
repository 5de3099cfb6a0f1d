"""A full disk told in one line (imaging/run/full.py): the file a failure names, the room a
stage needs, and the room set aside for the records of a failure."""

from __future__ import annotations

from pathlib import Path

from imaging.run import full
from imaging.workspace import Workspace

MiB = 1 << 20


def test_the_file_a_copy_failed_to_write_is_its_destination() -> None:
    text = "[Errno 28] No space left on device: '/usr/share/OVMF/OVMF_VARS_4M.fd' -> '/runs/r/verify/efivars.fd'"
    assert full.said_full(text)
    assert full.path_in(text) == "/runs/r/verify/efivars.fd"
    assert full.path_in("[Errno 28] No space left on device") is None
    assert not full.said_full("[Errno 2] No such file or directory: '/x'")


def test_the_room_each_stage_needs(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    need = {stage: full.need(ws, stage, ws.work, out, 40 * MiB, "qcow2") for stage in
            ("00-acquire", "10-clean", "25-secrets", "30-bootable", "40-export", "50-verify")}  # fmt: skip
    assert need["00-acquire"] == 80 * MiB + full.RECORD_ROOM
    assert need["10-clean"] == need["30-bootable"] == 40 * MiB + full.RECORD_ROOM
    assert need["25-secrets"] == need["40-export"] == need["50-verify"] == full.RECORD_ROOM
    assert full.need(ws, "50-verify", ws.verify, out, 40 * MiB, "ova") == 40 * MiB + full.RECORD_ROOM
    assert full.need(ws, "40-export", out, out, 40 * MiB, "qcow2") > 40 * MiB


def test_room_is_set_aside_once_and_given_back(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "run")
    full.keep_room(ws)
    full.keep_room(ws)
    room = ws.root / ".room"
    assert room.stat().st_size == full.ROOM and room.stat().st_blocks * 512 >= full.ROOM
    line = full.message(ws, "25-secrets", tmp_path / "out", 40 * MiB, "qcow2", str(ws.notebooks / "x.ipynb"))
    assert line.startswith(
        f"not enough free space in {ws.notebooks} to write x.ipynb: need about 8.0 MiB, have "
    )
    full.give_room(ws)
    assert not room.exists()
