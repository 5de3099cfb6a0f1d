"""The boot check's record: the serial log beside the VM's screen, as a person reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_a_boot_the_host_starved_is_tried_once_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux's timer check fails when a loaded host starves TCG's CPU: that is the emulator's
    failure, not the image's; any other failure, or a second starved boot, stands."""
    from imaging import config
    from imaging.boot import evidence, verify
    from imaging.boot.qemu import Accel

    panics = iter(["Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with apic=debug", ""])

    def fake(
        path: Path, fmt: object, tgt: object, marker: object, timeout: float, where: Path, *_: object
    ) -> verify.Boot:
        fatal = next(panics, "Kernel panic - not syncing: IO-APIC + timer doesn't work!")
        (where / "serial.log").write_text(fatal)
        return verify.Boot(verdict="failed" if fatal else "booted", reason="boot failed" if fatal else "marker",
                           matched=fatal or "IMAGING-SAMPLE-OK", target="kvm", controller="virtio", accel="tcg",
                           seconds=1.0, serial_log=str(where / "serial.log"), image=str(path), format="raw")  # fmt: skip

    monkeypatch.setattr(verify, "_boot", fake)
    tgt = config.load_target("kvm")
    run = lambda: verify._boot_each(tmp_path / "disk.raw", "raw", tgt, None, 60, tmp_path, Accel("tcg", ""),  # noqa: E731
                                    evidence.Expect(), ["bios"], False)  # fmt: skip
    assert run().verdict == "booted"
    assert "IO-APIC" in (tmp_path / "serial.starved.log").read_text()
    assert run().verdict == "failed"  # starved twice: said as it was
