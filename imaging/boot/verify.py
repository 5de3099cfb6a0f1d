"""Stage 50-verify: boot the artifact in QEMU on the target's disk controller and NIC, and judge it
the way its user would.

A login prompt is not enough: a machine whose sshd failed or whose network never came up is one
nobody can use. The guest boots with the target's NIC on QEMU's user network (restricted: it
reaches nothing outside QEMU); the console is read for a panic, for the image's marker or a
login prompt, and for every unit or init script that FAILED; the NIC's traffic is captured to
see the DHCP server acknowledge an address; the guest's sshd is asked, on a forwarded loopback
port, for its banner and host keys, which must not be any the source had. What the guest is
expected to do (sshd, DHCP) comes from 20-migrate's look at its configuration; a guest without
sshd says so and is judged on the rest. The verdict is ``booted`` only when everything holds,
``degraded`` with the reasons when it booted but something did not, ``failed`` otherwise.

KVM is used where it works, TCG otherwise (:mod:`imaging.boot.qemu`); either way the boot has a
time limit. The artifact is attached with ``snapshot=on``: booting never changes the file whose
sha256 was recorded. An OVA is not a disk: its disk is taken out of the tar (into the log
directory, removed after the boot) and booted on the SATA AHCI controller and e1000 NIC its
descriptor declares. A GCE image (``disk.raw`` in a gzipped tar) is extracted by GNU tar the
same way. Where QEMU has not got the target's own devices (ENA, VMBus, gVNIC), the target names
the machine the boot check uses instead (``boot:`` in its YAML); the verdict says so.

A disk that boots under more than one firmware is booted under each (``firmware``: bios with
SeaBIOS on QEMU's pc machine, uefi with OVMF on q35, with Secure Boot on and Microsoft's keys
enrolled where the disk claims it), one after the other on a host of few cores, side by side on
one with cores to spare; the verdict is the worst of them, and each is a row of ``boots``. Under
Secure Boot the kernel must say so on the console ("Secure boot enabled").

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging import config, sparse, tools
from imaging.boot import evidence
from imaging.boot.qemu import Accel, choose_accel, option_value
from imaging.disk import images
from imaging.disk.images import check_self_contained, image_info
from imaging.errors import BootFailed, ParameterError
from imaging.formats import gce, ova, vhd
from imaging.records import Record
from imaging.tables import Table
from imaging.workspace import Workspace


def qemu_argv(
    image: Path,
    fmt: str,
    target: config.Target,
    accel: str,
    serial_log: Path,
    qmp: Path | None = None,
    *,
    ssh_port: int | None = None,
    pcap: Path | None = None,
    firmware: Firmware | None = None,
) -> list[str]:
    """The QEMU command line for booting ``image`` like the target would, headless; with ``qmp``,
    a QMP socket there (for the screenshot). The disk controller and NIC are the target's boot
    check machine, attached as parameters/qemu.yaml says; ``firmware`` (None: SeaBIOS)."""
    drive = f"file={option_value(image.resolve())},format={fmt},if=none,id=disk0,snapshot=on"
    # SeaBIOS on the pc machine; OVMF on q35 (with SMM, which its Secure Boot variables need).
    board = "pc" if firmware is None else ("q35,smm=on" if firmware.secure_boot else "q35")
    argv = [
        "qemu-system-x86_64", "-accel", accel, "-M", board, "-m", str(target.memory_mib),
        "-smp", str(target.cpus), "-display", "none", "-vga", "std", "-no-reboot",
        "-serial", f"file:{serial_log}", "-monitor", "none", "-drive", drive,
    ]  # fmt: skip
    if firmware is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={option_value(Path(firmware.code))}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={option_value(firmware.vars)}"]  # fmt: skip
        if firmware.secure_boot:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    machine, devices = target.boot_check, config.load_qemu_devices()
    for device in devices.controllers[machine.controller].devices:
        argv += ["-device", device.format(drive="disk0")]
    # The guest sees the NIC on QEMU's user network with restrict=on: its DHCP server answers,
    # nothing outside QEMU is reachable, and only the forwarded port reaches in (sshd).
    netdev = "user,id=net0,restrict=on"
    if ssh_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
    argv += ["-netdev", netdev]
    for device in devices.nics[machine.nic].devices:
        argv += ["-device", device.format(netdev="net0")]
    if pcap is not None:  # the NIC's traffic, to see the DHCP exchange from outside the guest
        argv += ["-object", f"filter-dump,id=dump0,netdev=net0,file={option_value(pcap)}"]
    return argv


@dataclass(frozen=True)
class Firmware:
    """A UEFI firmware for one boot: OVMF's code and this boot's own copy of its variables."""

    code: str
    vars: Path
    secure_boot: bool


def _ovmf(secure_boot: bool, log_dir: Path) -> Firmware:
    devices = config.load_qemu_devices()
    found = devices.secure_boot if secure_boot else devices.uefi
    if found is None or not Path(found.code).is_file() or not Path(found.vars).is_file():
        raise ParameterError("booting UEFI needs OVMF (apt install ovmf; see uefi: in parameters/qemu.yaml)")
    copy = log_dir / "efivars.fd"
    shutil.copyfile(found.vars, copy)
    return Firmware(found.code, copy, secure_boot)


@dataclass(frozen=True)
class Boot(Record):
    verdict: str  # booted (all checks hold), degraded (it booted, something failed: see reasons), failed
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
    nic: str = ""
    machine_note: str = ""  # why QEMU's machine is not quite the target's (QEMU has no ENA, no VMBus)
    reasons: list[str] = field(default_factory=list)  # why not booted: each failed check, each failed unit
    dhcp: str = ""  # the address the guest was given by DHCP, seen on the wire
    ssh: str = ""  # the banner of the guest's sshd, on the forwarded port
    ssh_host_keys: list[str] = field(default_factory=list)  # "type SHA256:..." the guest's sshd offered
    failed_units: list[str] = field(default_factory=list)
    expected: dict[str, object] = field(default_factory=dict)
    firmware: str = "bios"  # what this boot's machine started with: bios (SeaBIOS) or uefi (OVMF)
    secure_boot: str = ""  # under Secure Boot: what the kernel said of it
    boots: list[dict[str, object]] = field(
        default_factory=list
    )  # a disk booted under several firmware: each

    def checks(self) -> Table:
        """One row per thing a user would look at, and how it went."""
        want = self.expected
        source_keys = want.get("source_host_keys")
        compared = len(source_keys) if isinstance(source_keys, list) else 0
        rows = [
            ("booted into the image", self.reason if self.verdict != "failed" else "no", self.matched),
            ("no unit or init script failed", "yes" if not self.failed_units else "no",
             "; ".join(self.failed_units[:5])),
            ("address by DHCP", self.dhcp or "none", _wanted(want.get("dhcp"))),
            ("sshd answers", self.ssh or "no", _wanted(want.get("ssh"))),
            ("host keys not the source's", ", ".join(k.split()[-1] for k in self.ssh_host_keys) or "-",
             f"{compared} source keys compared"),
        ]  # fmt: skip
        if self.secure_boot:
            rows.append(("Secure Boot on", self.secure_boot, "the kernel's own line on the console"))
        return Table(rows, ["check", "result", "detail"], index="check")

    def firmware_table(self) -> Table:
        """One row per firmware the disk was booted under."""
        rows = [(str(b["firmware"]), str(b["verdict"]), str(b.get("secure_boot") or "-"), f"{b['seconds']} s",
                 str(b["reason"])) for b in self.boots or [self.to_dict()]]  # fmt: skip
        return Table(rows, ["firmware", "verdict", "Secure Boot", "seconds", "reason"])


def _wanted(value: object) -> str:
    return "required" if value is True else "not expected" if value is False else "recorded if seen"


def expectations(ws: Workspace | None) -> evidence.Expect:
    """What the run's own records say the guest should do on its first boot: sshd and DHCP as
    20-migrate found them configured, and the host keys 10-clean removed (which must not come
    back). Nothing known (a ``convert --verify`` run, or no run): everything is recorded, not
    required."""
    if ws is None or not ws.has_result("20-migrate"):
        return evidence.Expect()
    first = ws.result("20-migrate").get("first_boot") or {}
    keys = ws.result("10-clean").get("ssh_host_keys", []) if ws.has_result("10-clean") else []
    return evidence.Expect(
        ssh=first.get("ssh"),
        dhcp=bool(first.get("dhcp")) if "dhcp" in first else None,
        source_host_keys=tuple(keys),
        why={k: str(v) for k, v in (first.get("why") or {}).items()},
    )


def firmware_of(ws: Workspace) -> dict[str, Any]:
    """What the run's disk boots under, as :func:`boot` takes it: 30-bootable's record, or for a
    disk it did not make (``convert --verify``: the user's own) what its partition table says
    (an ESP: UEFI; a BIOS boot partition or an MBR: BIOS), without Secure Boot."""
    if ws.has_result("30-bootable"):
        disk = ws.result("30-bootable").get("disk") or {}
        return {
            "firmware": tuple(disk.get("platforms") or ("bios",)),
            "secure_boot": bool(disk.get("secure_boot")),
        }
    table = images.read_partition_table(ws.disk) if ws.disk.is_file() else None
    kinds = {p.type.upper() for p in table.partitions} if table else set()
    platforms = []
    if table is None or table.label == "dos" or GPT_BIOS_BOOT in kinds:
        platforms.append("bios")
    if kinds & {GPT_ESP, "EF"}:
        platforms.append("uefi")
    return {"firmware": tuple(platforms or ["bios"]), "secure_boot": False}


GPT_BIOS_BOOT, GPT_ESP = "21686148-6449-6E6F-744E-656564454649", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def boot(
    image: str | Path,
    target: str,
    *,
    marker: str = "",
    timeout: float = 240,
    log_dir: Path | None = None,
    prefer_accel: str = "auto",
    expect: evidence.Expect | None = None,
    fmt: str = "",
    firmware: Sequence[str] = ("bios",),
    secure_boot: bool = False,
) -> Boot:
    """Boot ``image`` on ``target``'s hardware and judge it as a user would: it must reach the
    marker or a login prompt, no unit or init script may fail, and (where the guest is set up
    for them) it must get an address by DHCP and its sshd must answer, with a host key that is
    not one of the source's. ``booted`` when all hold, ``degraded`` with the reasons when it
    booted but something did not, ``failed`` otherwise (a panic, a power-off, the time limit).

    ``fmt`` (raw, qcow2, vmdk, vdi, vhd, vhdx, ova) is the artifact's format; when not given,
    qemu-img's guess is taken only after the checks every source gets (no backing file, data
    file or other extents: an image naming /dev/sda would hand the host's disk to the guest).
    Either way QEMU is told the format and never guesses.

    ``firmware``: what the disk boots under (bios, uefi), each booted; ``secure_boot``: the UEFI
    boot with Secure Boot on."""
    expect = expect or evidence.Expect()
    unknown = sorted(set(firmware) - {"bios", "uefi"})
    if unknown or not firmware:
        raise ParameterError(
            f"firmware {', '.join(unknown) or '(none)'}: the boot check boots bios and uefi"
        )
    tools.require_tools(
        "qemu-system-x86_64",
        "qemu-img",
        reason="boot the artifact",
        hint="apt install qemu-system-x86 qemu-utils",
    )
    if expect.ssh is not False:
        tools.require_tools(
            "ssh-keyscan", reason="read the guest's SSH host keys", hint="apt install openssh-client"
        )
    path = Path(image)
    if not path.is_file():
        raise ParameterError(f"no artifact at {path}")
    tgt = config.load_target(target)
    marker_re = re.compile(marker) if marker else None
    accel = choose_accel(prefer_accel)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="imaging-verify-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    image_format = config.check_format(fmt) if fmt else None
    if image_format is config.ImageFormat.ova or (image_format is None and ova.is_ova(path)):
        # Its disk unpacked beside the logs: about the OVA's size (UEFI's variables, 4 MiB, besides).
        sparse.check_space(
            log_dir, sparse.allocated_bytes(path) + (16 << 20), f"unpack the disk of {path.name}"
        )
        extracted = ova.extract_disk(path, log_dir)
        try:
            machine = config.BootCheck(
                controller="ahci", nic="e1000", note="the machine the OVA's descriptor declares"
            )
            appliance = tgt.model_copy(update={"boot": machine})
            result = _boot_each(extracted, "vmdk", appliance, marker_re, timeout, log_dir, accel, expect,
                                firmware, secure_boot)  # fmt: skip
        finally:
            extracted.unlink(missing_ok=True)
        return dataclasses.replace(result, image=str(path), format=f"ova ({result.format} inside)")
    if image_format is config.ImageFormat.gce or (image_format is None and gce.is_gce(path)):
        try:
            extracted = gce.extract(path, log_dir)  # by GNU tar, as a user would
        except gce.GceError as e:
            raise ParameterError(str(e)) from None
        try:
            result = _boot_each(extracted, "raw", tgt, marker_re, timeout, log_dir, accel, expect, firmware,
                                secure_boot)  # fmt: skip
        finally:
            extracted.unlink(missing_ok=True)
        return dataclasses.replace(
            result, image=str(path), format=f"gce ({gce.MEMBER} extracted by GNU tar)"
        )
    qemu_format = image_format.qemu_format if image_format else None
    return _boot_each(
        path, qemu_format, tgt, marker_re, timeout, log_dir, accel, expect, firmware, secure_boot
    )


_RANK = {"booted": 0, "degraded": 1, "failed": 2}


def _boot_each(path: Path, qemu_format: str | None, tgt: config.Target, marker_re: re.Pattern[str] | None,
               timeout: float, log_dir: Path, accel: Accel, expect: evidence.Expect, firmware: Sequence[str],
               secure_boot: bool) -> Boot:  # fmt: skip
    """Boot under each firmware (the first's logs in ``log_dir``, the others' in a directory
    named after it); the result is the first boot's record with the worst verdict of all."""
    dirs = [log_dir if i == 0 else log_dir / name for i, name in enumerate(firmware)]

    def one(name: str, where: Path) -> Boot:
        where.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            ovmf = _ovmf(secure_boot, where) if name == "uefi" else None
            try:
                result = _boot(path, qemu_format, tgt, marker_re, timeout, where, accel, expect, ovmf)
            finally:
                if ovmf is not None:
                    ovmf.vars.unlink(missing_ok=True)
            if attempt == 2 or accel.accel != "tcg" or not _STARVED.search(result.matched):
                return result
            # The emulator, not the image: kept beside the boot that follows it.
            Path(result.serial_log).rename(where / "serial.starved.log")
        raise AssertionError("unreachable")

    # Each TCG boot keeps a host core busy: side by side only where there are cores to spare.
    parallel = len(firmware) > 1 and (os.cpu_count() or 1) >= 2 * len(firmware) * tgt.cpus
    if parallel:
        with ThreadPoolExecutor(len(firmware), thread_name_prefix="boot") as pool:
            boots = list(pool.map(one, firmware, dirs))
    else:
        boots = [one(name, where) for name, where in zip(firmware, dirs, strict=True)]
    if len(boots) == 1:
        return boots[0]
    worst = max(boots, key=lambda b: _RANK[b.verdict])
    rows = [{"firmware": b.firmware, "verdict": b.verdict, "reason": b.reason, "seconds": b.seconds,
             "secure_boot": b.secure_boot, "serial_log": b.serial_log, "screen": b.screen} for b in boots]  # fmt: skip
    first = boots[0]
    if worst is first:
        return dataclasses.replace(first, boots=rows)
    reasons = [*first.reasons, *(f"{worst.firmware}: {r}" for r in worst.reasons or [worst.reason])]
    return dataclasses.replace(first, verdict=worst.verdict, reason=f"{worst.firmware}: {worst.reason}",
                               matched=worst.matched, reasons=reasons, boots=rows)  # fmt: skip


def disk_format(path: Path, fmt: str | None = None) -> str:
    """qemu's name for the disk's format, after the checks every source gets (no backing file,
    data file or other extents). Given ``fmt``, qemu-img reads it as that and nothing else;
    otherwise its guess is taken, except that qemu-img probes a fixed VHD as raw (its footer is
    just a last sector): the footer says it is one, and QEMU is told so."""
    info = image_info(path, fmt)
    check_self_contained(info)
    if fmt is None and info.format == "raw" and vhd.read_footer(path) is not None:
        return "vpc"
    return info.format


# After everything required has been seen, the console is watched a little longer: a unit that
# fails right after sshd started is still caught. Checks that are only recorded (not required)
# get this long after the login prompt.
_SETTLE = 3.0
_OPTIONAL_GRACE = 15.0
_CONSOLE_CAP = 8 << 20  # bytes of console kept for the verdict; a guest flooding it cannot exhaust us


class _Watch:
    """What the boot has shown so far."""

    def __init__(self, serial: Path, pcap: Path, port: int, marker_re: re.Pattern[str] | None) -> None:
        self.serial, self.pcap, self.port, self.marker_re = serial, pcap, port, marker_re
        self._dhcp = evidence.DhcpWatch(pcap)
        self.text = ""
        self._offset = 0
        self.fatal: str = ""
        self.evidence: str = ""
        self.evidence_kind: str = ""
        self.evidence_at: float | None = None
        self.dhcp: str = ""
        self.banner: str = ""
        self._next_ssh = 0.0

    def poll(self, now: float, want_ssh: bool) -> None:
        try:
            with open(self.serial, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(_CONSOLE_CAP)
        except FileNotFoundError:
            chunk = b""
        if chunk:
            self._offset += len(chunk)
            self.text = (self.text + chunk.decode(errors="replace"))[-_CONSOLE_CAP:]
        text = evidence.plain(self.text)
        if not self.fatal and (bad := evidence.FATAL.search(text)):
            self.fatal = bad.group(0).strip()
        if not self.evidence:
            found = self.marker_re.search(text) if self.marker_re else evidence.LOGIN.search(text)
            if found:
                self.evidence, self.evidence_at = found.group(0).strip(), now
                self.evidence_kind = "marker" if self.marker_re else "login prompt"
        if not self.dhcp:
            self.dhcp = self._dhcp.poll() or ""
        if want_ssh and not self.banner and self.evidence and now >= self._next_ssh:
            self._next_ssh = now + 1.0
            self.banner = evidence.ssh_banner(self.port) or ""


def _boot(path: Path, qemu_format: str | None, tgt: config.Target, marker_re: re.Pattern[str] | None,
          timeout: float, log_dir: Path, accel: Accel, expect: evidence.Expect,
          ovmf: Firmware | None = None) -> Boot:  # fmt: skip
    fmt = disk_format(path, qemu_format)
    serial, pcap = log_dir / "serial.log", log_dir / "net.pcap"
    for stale in (serial, pcap, log_dir / "screen.png"):
        stale.unlink(missing_ok=True)
    # A private directory with a short path: a unix socket's path has room for 107 bytes only.
    qmp_dir = Path(tempfile.mkdtemp(prefix="imaging-qmp-"))
    qmp = qmp_dir / "qmp.sock"
    port = evidence.free_port()
    argv = qemu_argv(path, fmt, tgt, accel.accel, serial, qmp, ssh_port=port, pcap=pcap, firmware=ovmf)
    watch = _Watch(serial, pcap, port, marker_re)
    screen = Screen(qmp, log_dir / "screen.png")
    t0 = time.monotonic()
    done_at: float | None = None
    powered_off = False
    with contextlib.ExitStack() as cleanup, tools.spawn(argv) as qemu:
        cleanup.callback(shutil.rmtree, qmp_dir, ignore_errors=True)
        cleanup.callback(screen.close)
        while (now := time.monotonic()) - t0 < timeout:
            watch.poll(now, want_ssh=expect.ssh is not False)
            if watch.fatal:
                break
            required = [
                watch.evidence,
                watch.dhcp or expect.dhcp is not True,
                watch.banner or expect.ssh is not True,
            ]
            optional = [watch.dhcp or expect.dhcp is not None, watch.banner or expect.ssh is not None]
            if all(required) and done_at is None:
                waited = now - (watch.evidence_at or now)
                if all(optional) or waited >= _OPTIONAL_GRACE:
                    done_at = now
            if done_at is not None and now - done_at >= _SETTLE:
                break
            if not qemu.alive():
                powered_off = True
                watch.poll(time.monotonic(), want_ssh=False)
                break
            screen.save_now_and_then()
            time.sleep(0.1)
        seconds = time.monotonic() - t0
        keys = evidence.host_keys(port) if watch.banner and qemu.alive() else []
        if qemu.alive():
            screen.save()
    verdict, reason, reasons = _judge(watch, expect, keys, timeout, powered_off)
    secure = ""
    if ovmf is not None and ovmf.secure_boot:
        said = _SECURE_BOOT.search(evidence.plain(watch.text))
        secure = said.group(0).strip() if said else "not reported by the kernel"
        if verdict != "failed" and not (said and "enabled" in said.group(0).lower()):
            verdict, reasons = (
                "degraded",
                [*reasons, f"Secure Boot: the kernel did not say it was on ({secure})"],
            )
            reason = "; ".join(reasons)[:300]
    return Boot(
        verdict=verdict,
        reason=reason,
        matched=(watch.fatal or watch.evidence)[:200],
        target=tgt.name,
        controller=tgt.boot_check.controller,
        accel=accel.accel,
        seconds=round(seconds, 2),
        serial_log=str(serial),
        image=str(path),
        format=fmt,
        screen=str(screen.png) if screen.saved else "",
        nic=tgt.boot_check.nic,
        machine_note=tgt.boot_check.note,
        reasons=reasons,
        dhcp=watch.dhcp,
        ssh=watch.banner,
        ssh_host_keys=keys,
        failed_units=evidence.failed_units(watch.text),
        expected={
            "ssh": expect.ssh,
            "dhcp": expect.dhcp,
            "source_host_keys": list(expect.source_host_keys),
            **({"why": expect.why} if expect.why else {}),
        },  # fmt: skip
        firmware="uefi" if ovmf is not None else "bios",
        secure_boot=secure,
    )


# A kernel whose timer check ran while the host starved its emulated CPU (TCG on a loaded host):
# the same image boots when it gets the CPU, so its boot is tried once more.
_STARVED = re.compile(r"IO-APIC \+ timer doesn't work")
# What a kernel says of Secure Boot when it starts ("secureboot: Secure boot enabled" since 5.x).
_SECURE_BOOT = re.compile(r"[Ss]ecure ?boot (?:enabled|disabled|could not be determined)[^\n]*")


def _judge(watch: _Watch, expect: evidence.Expect, keys: list[str], timeout: float,
           powered_off: bool) -> tuple[str, str, list[str]]:  # fmt: skip
    """(verdict, reason, reasons): what a user would conclude from what the boot showed."""
    if watch.fatal:
        return "failed", "boot failed", [watch.fatal]
    if not watch.evidence:
        wanted = "the marker" if watch.marker_re else "a login prompt"
        if powered_off:
            return "failed", f"the machine powered off before {wanted}", []
        return "failed", f"no {'marker' if watch.marker_re else 'login prompt'} within {timeout:.0f} s", []
    reasons = [f"failed: {line}" for line in evidence.failed_units(watch.text)]
    if expect.dhcp and not watch.dhcp:
        reasons.append("no address by DHCP: the network did not come up on the target's NIC")
    if expect.ssh and not watch.banner:
        reasons.append("sshd did not answer on port 22")
    if watch.banner and not keys:
        reasons.append("sshd answered but offered no host key")
    reused = sorted({k.split()[-1] for k in keys} & set(expect.source_host_keys))
    if reused:
        reasons.append(f"sshd offers a host key of the source ({', '.join(reused)})")
    if reasons:
        return "degraded", "; ".join(reasons)[:300], reasons
    return "booted", watch.evidence_kind, []


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


class Console:
    """The end of a boot as a person would have seen it: the serial log beside the screen."""

    def __init__(self, boot_result: Boot | dict[str, object], lines: int = 400) -> None:
        record = boot_result.to_dict() if isinstance(boot_result, Boot) else dict(boot_result)
        # GRUB and the guest drive a terminal: their escape sequences are noise on a page.
        self.log = evidence.plain(serial_log(record, lines)) or "(empty)"
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


def require_booted(result: Boot | dict[str, object], *, degraded_ok: bool = True) -> None:
    """Raise BootFailed if the boot failed (or, with ``degraded_ok=False``, was degraded too)."""
    r = result.to_dict() if isinstance(result, Boot) else result
    if r["verdict"] == "failed" or (r["verdict"] == "degraded" and not degraded_ok):
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
