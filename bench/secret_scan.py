"""The secret scan (25-secrets): how much it reads and how long it takes, on the real Debian guest
(as the stage sees it, its package database in use) and on the real-files tree (this host's
/usr, 1.2 GB, every file in scope, no package database: the worst case), against the floor of
reading the same files, and against detect-secrets' own ``scan_file`` on the same files."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, real_tree  # noqa: E402
from imaging.disk.files import Guest  # noqa: E402
from imaging.guest import package_files, secret_scan  # noqa: E402
from imaging.samples import catalog  # noqa: E402

PRINTS = secret_scan.Fingerprints(b"bench")


def _scan(root: Path, scope: tuple[str, ...] = secret_scan.SCOPE) -> tuple[float, secret_scan.Scanned]:
    t0 = time.monotonic()
    with Guest(root) as g:
        out = secret_scan.scan(g, PRINTS, scope=scope)
    return time.monotonic() - t0, out


def _read_all(root: Path, scope: tuple[str, ...]) -> float:
    """The floor: every regular file in scope read once (page cache warm, like the scan's)."""
    t0 = time.monotonic()
    for top in scope:
        for d, _, files in os.walk(root / top.lstrip("/")):
            for name in files:
                p = os.path.join(d, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass
    return time.monotonic() - t0


def _detect_secrets(root: Path, scope: tuple[str, ...]) -> tuple[float, int]:
    """detect-secrets' own file scan (every plugin, default filters) over the same files."""
    from detect_secrets.core import scan
    from detect_secrets.settings import default_settings

    t0, n = time.monotonic(), 0
    with default_settings():
        for top in scope:
            for d, _, files in os.walk(root / top.lstrip("/")):
                for name in files:
                    p = os.path.join(d, name)
                    if os.path.isfile(p) and not os.path.islink(p):
                        n += 1
                        list(scan.scan_file(p))
    return time.monotonic() - t0, n


def _row(what: str, seconds: float, out: secret_scan.Scanned, used: int) -> tuple[str, str, str]:
    return (what, f"{seconds:.2f} s",
            f"{out.files_read:,} of {out.files_seen:,} files read, {out.bytes_read / 1e6:.1f} MB of "
            f"{used / 1e6:.0f} MB used in the guest; {len(out.findings)} findings")  # fmt: skip


def main() -> list[tuple[str, str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as mnt:
        image = catalog.ensure_sample("debian12")
        subprocess.run(["mount", "-o", "loop,ro,noload", str(image), mnt], check=True)
        try:
            used = int(subprocess.run(["df", "-B1", "--output=used", mnt], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])  # fmt: skip
            _scan(Path(mnt))  # the page cache warm for every measure
            seconds, out = _scan(Path(mnt))
            rows.append(_row("secret scan, real Debian 12 guest (dpkg in use)", seconds, out, used))
            etc = ("/etc",)
            ours, _ = _scan(Path(mnt), etc)
            theirs, n = _detect_secrets(Path(mnt), etc)
            rows.append(("secret scan of the guest's /etc against detect-secrets' scan_file",
                         f"{ours:.2f} s vs {theirs:.2f} s", f"{theirs / ours:.0f}x faster ({n} files)"))  # fmt: skip
            # The same work: every file read and scanned, the package database ignored.
            kept = package_files.read
            package_files.read = lambda g: package_files.Owned({}, "")
            try:
                every, _ = _scan(Path(mnt), etc)
            finally:
                package_files.read = kept
            rows.append(("  the same, every file scanned (package database ignored)", f"{every:.2f} s",
                         f"{theirs / every:.0f}x faster than detect-secrets' scan_file"))  # fmt: skip
        finally:
            subprocess.run(["umount", mnt], check=True)
    tree = real_tree(WORK / "real-usr.tree")
    everything = ("/",)
    floor = _read_all(tree, everything)
    seconds, out = _scan(tree, everything)
    rows.append(_row("secret scan, real-files tree (1.2 GB of /usr, no package database)", seconds, out,
                     out.bytes_seen))  # fmt: skip
    rows.append(("  against reading the same files", f"{floor:.2f} s",
                 f"{seconds / floor:.1f}x the read; {out.bytes_read / 1e6 / seconds:.0f} MB/s"))  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row), flush=True)
