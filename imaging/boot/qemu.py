"""Running QEMU: the accelerator (KVM where it works, TCG otherwise) and QEMU's option syntax.

On hosts where /dev/kvm opens but QEMU with KVM aborts or hangs (as on our CI machines),
``-accel kvm:tcg`` is no help: it only falls back when KVM cannot be opened. So a probe guest
(kvm_probe.S, assembled below) runs under both, once per host boot, each with a time limit, and
KVM is used only where it works and is the faster.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from imaging import config, tools
from imaging.errors import CommandError, ParameterError
from imaging.records import Record

# The probe guest of kvm_probe.S: long mode, 64 MiB of page touches, then exit via isa-debug-exit.
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed88ed0bc007c660f0116007d0f20c06683c8010f22c066ea227c0000080066b810008ed88ec08ed0bf001000"
    "0031c0b9000c0000f3abc7050010000003200000c7050020000003300000c70500300000830000000f20e083c8200f22"
    "e0b8001000000f22d8b9800000c00f320d000100000f300f20c00d000000800f22c0ea897c0000180048c7c700300000"
    "48c7c08300000048c7c1000200004889074805000020004883c708e2f148c7c20200000048c7c70000200048c7c10040"
    "0000880f4881c700100000e2f548ffca75e2b000e6f4f4ebfd0f1f80000000000000000000000000ffff0000009acf00"
    "ffff00000092cf00ffff0000009aaf001f00e07c0000"
)
PROBE_SECTOR = _PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"
_PROBE_TIMEOUT = 5.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _probe(accel: str, sector: Path) -> float | None:
    """Seconds the probe guest took under ``accel``, or None if it failed or hung."""
    t0 = time.monotonic()
    try:
        result = tools.run(
            ["qemu-system-x86_64", "-accel", accel, "-M", "pc", "-m", "128", "-display", "none", "-nodefaults",
             "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
             "-drive", f"file={option_value(sector)},format=raw,if=ide,snapshot=on"],
            ok_codes=range(-64, 256),
            timeout=_PROBE_TIMEOUT,
            record=False,
        )  # fmt: skip
    except CommandError:  # timed out
        return None
    return (
        time.monotonic() - t0 if result.exit_code == 1 else None
    )  # 1 = (0 << 1) | 1: the guest got to the end


def kvm_probe() -> dict[str, object]:
    """Probe KVM against TCG once per host boot (cached): KVM is used only if it is the faster."""
    cache = config.cache_dir() / "kvm-probe.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == _boot_id() and cached.get("version") == 2:
            return dict(cached)
    except (OSError, ValueError):
        pass
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        found: dict[str, object] = {"kvm": False, "reason": "no usable /dev/kvm"}
    else:
        with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
            sector = Path(tmp) / "probe.img"
            sector.write_bytes(PROBE_SECTOR)
            kvm, tcg = _probe("kvm", sector), _probe("tcg", sector)
        if kvm is None:
            reason = "KVM probe failed or hung"
        elif tcg is not None and kvm >= tcg:
            reason = f"KVM probe took {kvm:.2f} s, TCG {tcg:.2f} s: KVM is broken here"
        else:
            reason = f"KVM probe took {kvm:.2f} s" + (f", TCG {tcg:.2f} s" if tcg is not None else "")
        found = {"kvm": kvm is not None and (tcg is None or kvm < tcg), "reason": reason}
    found.update(boot_id=_boot_id(), version=2)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return found


def kvm_works() -> bool:
    return bool(kvm_probe()["kvm"])


@dataclass(frozen=True)
class Accel(Record):
    accel: str
    reason: str


def choose_accel(prefer: str = "auto") -> Accel:
    """KVM where it works (and is faster than TCG), TCG otherwise; ``prefer`` can force either."""
    if prefer == "tcg":
        return Accel("tcg", "asked for TCG")
    probe = kvm_probe()
    if probe["kvm"]:
        return Accel("kvm", str(probe["reason"]))
    if prefer == "kvm":
        raise ParameterError(f"KVM was asked for, but it cannot be used here: {probe['reason']}")
    return Accel("tcg", str(probe["reason"]))


def option_value(path: Path) -> str:
    """``path`` as the value in a QEMU option list (``-drive file=...,``): a comma is doubled, or
    QEMU would end the value there and read the rest as options (``--out /srv/a,b`` failed)."""
    return str(path).replace(",", ",,")
