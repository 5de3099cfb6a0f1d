"""Stage 50-verify: boot the artifact in QEMU on the target's disk controller and read the serial log.

KVM is used where it works; on hosts where /dev/kvm opens but QEMU with KVM aborts or hangs (as
on our CI machines), a short probe fails and the boot runs under TCG. ``-accel kvm:tcg`` is no
help there: it only falls back when KVM cannot be opened. Either way the boot has a time limit.
The artifact is attached with ``snapshot=on``: booting never changes the file whose sha256 was
recorded. An OVA is not a disk: its disk is taken out of the tar (into the log directory, removed
after the boot) and booted on the SATA AHCI controller and e1000 NIC its descriptor declares.

The VM's screen is saved as ``screen.png`` beside the serial log (QEMU's QMP ``screendump`` in
PNG, on a socket in a private directory): every second during the boot and once more when it has
a verdict, so a pass, a panic, the time limit and a machine that powered off all leave the last
screen QEMU showed.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging import config, tools
from imaging.boot.qemu import Accel, choose_accel, option_value
from imaging.disk.images import image_info
from imaging.errors import BootFailed, ParameterError
from imaging.formats import ova
from imaging.records import Record

LOGIN = re.compile(r"^\S*\s*login:\s*$|\blogin:\s*$", re.MULTILINE)
FAILURES = re.compile(r"Kernel panic - not syncing.*|initrd: .*not found.*|VFS: Unable to mount root fs.*|IMAGING-SAMPLE-FAILED.*|"
                      r"No bootable device.*|error: no such device.*|error: file .* not found.*")  # fmt: skip


def qemu_argv(
    image: Path, fmt: str, target: config.Target, accel: str, serial_log: Path, qmp: Path | None = None
) -> list[str]:
    """The QEMU command line for booting ``image`` like the target would, headless; with ``qmp``,
    a QMP socket there (for the screenshot)."""
    drive = f"file={option_value(image.resolve())},format={fmt},if=none,id=disk0,snapshot=on"
    argv = [
        "qemu-system-x86_64", "-accel", accel, "-M", "pc", "-m", str(target.memory_mib),
        "-smp", str(target.cpus), "-display", "none", "-vga", "std", "-no-reboot",
        "-serial", f"file:{serial_log}", "-monitor", "none", "-drive", drive,
    ]  # fmt: skip
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if target.disk_controller == "ahci":
        argv += ["-device", "ahci,id=ahci0", "-device", "ide-hd,drive=disk0,bus=ahci0.0"]
    elif target.disk_controller == "ide":
        argv += ["-device", "ide-hd,drive=disk0,bus=ide.0"]
    else:
        argv += ["-device", "virtio-blk-pci,drive=disk0"]
    # The guest sees the target's NIC, but user networking with restrict=on reaches nothing.
    argv += ["-nic", f"user,model={target.nic},restrict=on"]
    return argv


@dataclass(frozen=True)
class Boot(Record):
    verdict: str  # "booted" or "failed"
    reason: str
    matched: str
    target: str
    controller: str
    accel: str
    seconds: float
    serial_log: str
    image: str
    format: str
    screen: str = ""  # screen.png at the end of the boot; empty if QEMU never showed one


def boot(
    image: str | Path,
    target: str,
    *,
    marker: str = "",
    timeout: float = 240,
    log_dir: Path | None = None,
    prefer_accel: str = "auto",
) -> Boot:
    """Boot ``image`` on ``target``'s hardware until the marker or a login prompt shows on the
    serial console (pass), or a panic, a power-off or the time limit comes first (fail)."""
    tools.require_tools(
        "qemu-system-x86_64",
        "qemu-img",
        reason="boot the artifact",
        hint="apt install qemu-system-x86 qemu-utils",
    )
    path = Path(image)
    if not path.is_file():
        raise ParameterError(f"no artifact at {path}")
    tgt = config.load_target(target)
    marker_re = re.compile(marker) if marker else None
    accel = choose_accel(prefer_accel)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="imaging-verify-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if ova.is_ova(path):
        extracted = ova.extract_disk(path, log_dir)
        try:
            appliance = tgt.model_copy(update={"disk_controller": "ahci", "nic": "e1000"})
            result = _boot(extracted, appliance, marker_re, timeout, log_dir, accel)
        finally:
            extracted.unlink(missing_ok=True)
        return dataclasses.replace(result, image=str(path), format=f"ova ({result.format} inside)")
    return _boot(path, tgt, marker_re, timeout, log_dir, accel)


def _boot(path: Path, tgt: config.Target, marker_re: re.Pattern[str] | None, timeout: float, log_dir: Path,
          accel: Accel) -> Boot:  # fmt: skip
    fmt = image_info(path).format
    serial = log_dir / "serial.log"
    serial.unlink(missing_ok=True)
    (log_dir / "screen.png").unlink(missing_ok=True)
    # A private directory with a short path: a unix socket's path has room for 107 bytes only.
    qmp_dir = Path(tempfile.mkdtemp(prefix="imaging-qmp-"))
    qmp = qmp_dir / "qmp.sock"
    argv = qemu_argv(path, fmt, tgt, accel.accel, serial, qmp)
    t0 = time.monotonic()
    verdict, reason, matched = "failed", f"no marker or login prompt within {timeout:.0f} s", ""
    screen = Screen(qmp, log_dir / "screen.png")
    with contextlib.ExitStack() as cleanup, tools.spawn(argv) as qemu:
        cleanup.callback(shutil.rmtree, qmp_dir, ignore_errors=True)
        cleanup.callback(screen.close)
        while time.monotonic() - t0 < timeout:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            found = (marker_re.search(text) if marker_re else None) or LOGIN.search(text)
            if found:
                verdict, reason, matched = (
                    "booted",
                    "marker" if marker_re and marker_re.search(text) else "login prompt",
                    found.group(0).strip(),
                )
                break
            bad = FAILURES.search(text)
            if bad:
                reason, matched = "boot failed", bad.group(0).strip()
                break
            if not qemu.alive():
                reason = "the machine powered off before the marker or a login prompt"
                break
            screen.save_now_and_then()
            time.sleep(0.1)
        seconds = time.monotonic() - t0
        if qemu.alive():
            screen.save()
    result = Boot(
        verdict=verdict,
        reason=reason,
        matched=matched[:200],
        target=tgt.name,
        controller=tgt.disk_controller,
        accel=accel.accel,
        seconds=round(seconds, 2),
        serial_log=str(serial),
        image=str(path),
        format=fmt,
        screen=str(screen.png) if screen.saved else "",
    )
    return result


_QMP_TIMEOUT = 10.0
# How often the screen is saved during a boot: a guest that powers off right after its marker
# (the samples do) leaves the last of these.
_SCREEN_EVERY = 1.0


class Screen:
    """The VM's screen, saved as PNG through QEMU's QMP socket (``screendump``).

    QEMU writes the file itself, under a hidden name that is renamed when QEMU says it is done.
    Failures (QEMU not listening yet, or gone) are not errors: the boot's verdict comes from the
    serial log; the screen only shows what a person would have seen.
    """

    def __init__(self, qmp: Path, png: Path) -> None:
        self.qmp = qmp
        self.png = png
        self.saved = False
        self._sock: socket.socket | None = None
        self._io: Any = None
        self._last = 0.0

    def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        self._io.write(json.dumps(command) + "\n")
        self._io.flush()
        return _qmp_reply(self._io)

    def _connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_QMP_TIMEOUT)
            sock.connect(str(self.qmp))
            self._sock, self._io = sock, sock.makefile("rw", encoding="utf-8")
            _qmp_reply(self._io)  # the greeting
            self._command({"execute": "qmp_capabilities"})
        except (OSError, ValueError):
            self.close()
            sock.close()
            raise

    def save(self) -> bool:
        """Save the screen now; False if QEMU could not."""
        self._last = time.monotonic()
        part = self.png.with_name(f".{self.png.name}.part")
        try:
            self._connect()
            reply = self._command(
                {"execute": "screendump", "arguments": {"filename": str(part), "format": "png"}}
            )
            if "error" in reply:
                return False
            os.replace(part, self.png)
            self.saved = True
            return True
        except (OSError, ValueError):  # QEMU not listening yet, gone meanwhile, or answering nonsense
            self.close()
            return False
        finally:
            part.unlink(missing_ok=True)

    def save_now_and_then(self) -> None:
        if time.monotonic() - self._last >= _SCREEN_EVERY:
            self.save()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = self._io = None


def _qmp_reply(replies: Any) -> dict[str, Any]:
    """The next greeting, return or error, skipping the events QEMU sends in between."""
    while True:
        line = replies.readline()
        if not line:
            raise ValueError("QMP connection closed")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("QMP sent something that is not an object")
        if "event" not in message:
            return message


_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")


class Console:
    """The end of a boot as a person would have seen it: the serial log beside the screen."""

    def __init__(self, boot_result: Boot | dict[str, object], lines: int = 400) -> None:
        record = boot_result.to_dict() if isinstance(boot_result, Boot) else dict(boot_result)
        # GRUB and the guest drive a terminal: their escape sequences are noise on a page.
        self.log = _ESCAPES.sub("", serial_log(record, lines)) or "(empty)"
        self.screen = Path(str(record.get("screen") or ""))
        self.has_screen = bool(record.get("screen")) and self.screen.is_file()

    def __repr__(self) -> str:
        shown = f"screen: {self.screen}" if self.has_screen else "screen: none"
        return f"{self.log}\n\n{shown}"

    def _repr_html_(self) -> str:
        log = f"<pre style='white-space: pre-wrap; margin: 0'>{html.escape(self.log)}</pre>"
        if self.has_screen:
            data = base64.b64encode(self.screen.read_bytes()).decode("ascii")
            screen = f"<img alt='the VM screen at the end of the boot' src='data:image/png;base64,{data}' style='max-width: 100%'>"
        else:
            screen = "<p>No screenshot: QEMU showed no screen.</p>"
        return (
            "<div style='display: flex; gap: 1em; align-items: flex-start'>"
            f"<div style='flex: 1 1 50%; min-width: 0; max-height: 40em; overflow: auto'><b>Serial console</b>{log}</div>"
            f"<div style='flex: 1 1 50%; min-width: 0'><b>Screen</b><br>{screen}</div></div>"
        )


def require_booted(result: Boot | dict[str, object]) -> None:
    """Raise BootFailed unless the boot reached its marker or a login prompt."""
    r = result.to_dict() if isinstance(result, Boot) else result
    if r["verdict"] != "booted":
        detail = f": {r['matched']}" if r.get("matched") else ""
        raise BootFailed(
            f"{Path(str(r['image'])).name} did not boot on {r['target']} ({r['controller']}, {r['accel']}): "
            f"{r['reason']}{detail}"
        )


def serial_log(boot_result: Boot | dict[str, object], lines: int = 400) -> str:
    """The serial console output of a boot (the tail, if long)."""
    path = Path(str(boot_result.serial_log if isinstance(boot_result, Boot) else boot_result["serial_log"]))
    text = path.read_text(errors="replace") if path.exists() else ""
    all_lines = text.splitlines()
    return "\n".join(all_lines[-lines:])
