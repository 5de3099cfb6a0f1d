"""The boot check's record: the serial log beside the VM's screen, as a person reads them."""

from __future__ import annotations

from pathlib import Path

from imaging.boot import verify

EVIL = "<script>alert('x')</script>"


def test_console_shows_the_log_beside_the_screen_escaped(tmp_path: Path) -> None:
    (tmp_path / "serial.log").write_text(f"\x1b[H\x1b[JGNU GRUB\n{EVIL}\nIMAGING-SAMPLE-OK\n")
    (tmp_path / "screen.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    shown = verify.Console(
        {"serial_log": str(tmp_path / "serial.log"), "screen": str(tmp_path / "screen.png")}
    )
    page = shown._repr_html_()
    assert "GNU GRUB" in page and "\x1b" not in page and "<script" not in page and "&lt;script&gt;" in page
    assert "src='data:image/png;base64,iVBORw0KGgo=" in page
    assert (
        "No screenshot"
        in verify.Console({"serial_log": str(tmp_path / "serial.log"), "screen": ""})._repr_html_()
    )
