"""The secret scan's mechanism: which files of the guest are read, and what finds secrets in them.

Files: every regular file under the directories a user or a service writes (:data:`SCOPE`),
walked without following a link, each opened by name in its directory with O_NOFOLLOW (the
guest's links never lead the scan outside it). Not read: empty files, the package managers' own
databases, and a file that still holds what its package installed (its digest in the guest's
package database, :mod:`imaging.guest.package_files`). A file whose first 8 KiB has a NUL byte is
binary and not scanned, but for the token stores a rule reads whole. At most
:data:`files.CONFIG_LIMIT` of a file is read (the first 8 MiB of a larger one, said in the record).

Detectors: detect-secrets' (:mod:`imaging.detectors`), plus the file-shape rules of
:mod:`imaging.guest.secret_rules`.

Nothing here keeps a secret's value: a finding holds its keyed fingerprint only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from imaging.detectors import Detectors, as_config
from imaging.disk.files import CONFIG_LIMIT, MAX_DEPTH, Guest
from imaging.guest import package_files, secret_rules

# Where users and services write. /usr outside /usr/local, /boot and /var/log are the
# distribution's or cleaned by 10-clean; /var/lib holds services' state (databases' configs,
# web apps, Jupyter, Docker's).
SCOPE = ("/root", "/home", "/etc", "/opt", "/srv", "/var/www", "/var/lib", "/var/spool/cron",
         "/var/opt", "/usr/local", "/tmp", "/var/tmp")  # fmt: skip
# Package managers' own databases: package metadata, never a user's secret, and large.
NOT_SCANNED = ("/var/lib/dpkg", "/var/lib/apt", "/var/lib/rpm", "/var/lib/dnf", "/var/lib/yum",
               "/var/lib/zypp", "/var/lib/PackageKit", "/var/lib/ucf", "/etc/ssl/certs",
               "/etc/pki/ca-trust", "/etc/ca-certificates")  # fmt: skip
BINARY_PROBE = 8192
_GENERIC = {"Secret Keyword": 1, "Base64 High Entropy String": 2, "Hex High Entropy String": 2}
SKIPPED_KEPT = 100
# Findings kept in the record: a real guest has a handful; a hostile one with a million files
# that each look like a secret must not make a record of a million rows. The rest are counted.
FINDINGS_KEPT = 10_000


@dataclass(frozen=True)
class Finding:
    path: str
    line: int  # 0: the whole file
    detector: str
    fingerprint: str


@dataclass
class Scanned:
    """What the scan found and what it read."""

    findings: list[Finding] = field(default_factory=list)
    files_seen: int = 0
    files_read: int = 0
    bytes_read: int = 0
    bytes_seen: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # files not scanned, by reason
    skipped: list[str] = field(default_factory=list)  # the first SKIPPED_KEPT, one line each
    package_database: str = ""
    seconds: float = 0.0
    findings_not_kept: int = 0

    def skip(self, path: str, why: str, *, line: bool = True) -> None:
        self.counts[why] += 1
        if line and len(self.skipped) < SKIPPED_KEPT:
            self.skipped.append(f"{path}: {why}")


class Fingerprints:
    """A keyed digest of (path, detector, value): short enough to read and allow, and of no use
    to find a weak password by trying candidates without the key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def of(self, path: str, detector: str, value: str) -> str:
        message = "\0".join((path, detector, value)).encode("utf-8", "surrogateescape")
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()[:16]


def scan(g: Guest, prints: Fingerprints, *, scope: tuple[str, ...] = SCOPE) -> Scanned:
    """Every finding under ``scope`` in the guest, and what was read to find them."""
    began = time.monotonic()
    out = Scanned()
    owned = package_files.read(g)
    out.package_database = owned.source or "none found: every file is scanned"
    detectors = Detectors()
    try:
        seen_dirs: set[tuple[int, int]] = set()
        for top in scope:
            try:
                fd = g.open_dir(top)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                out.skip(top, f"not opened ({e.strerror})")
                continue
            with contextlib.closing(_Fd(fd)):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen_dirs:
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                for dir_fd, name, path, st in _walk(fd, top, out):
                    _file(dir_fd, name, path, st, out, owned, detectors, prints)
    finally:
        detectors.close()
    out.seconds = round(time.monotonic() - began, 2)
    return out


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _walk(top_fd: int, top: str, out: Scanned) -> Iterator[tuple[int, str, str, os.stat_result]]:
    """(dir fd, name, guest path, lstat) of every regular file under ``top``; directories the
    scan does not read, and trees deeper than MAX_DEPTH, are left out with a line each."""
    stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = [(top_fd, top, iter(os.scandir(top_fd)))]
    try:
        while stack:
            fd, where, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                if fd != top_fd:
                    os.close(fd)
                continue
            path = f"{where.rstrip('/')}/{entry.name}"
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.files_seen += 1
                out.bytes_seen += st.st_size
                yield fd, entry.name, path, st
            elif stat.S_ISDIR(st.st_mode):
                if path in NOT_SCANNED:
                    out.skip(path, "a package manager's database or public certificates: not scanned")
                    continue
                if len(stack) >= MAX_DEPTH:
                    out.skip(path, f"more than {MAX_DEPTH} directories deep: not scanned")
                    continue
                try:
                    child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as e:
                    out.skip(path, f"directory not opened ({e.strerror})")
                    continue
                stack.append((child, path, iter(os.scandir(child))))
    finally:
        for fd, _, _ in stack:
            if fd != top_fd:
                os.close(fd)


def _file(
    dir_fd: int,
    name: str,
    path: str,
    st: os.stat_result,
    out: Scanned,
    owned: package_files.Owned,
    detectors: Detectors,
    prints: Fingerprints,
) -> None:
    if st.st_size == 0:
        out.skip(path, "empty", line=False)
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        out.skip(path, f"not opened ({e.strerror})")
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # changed under us
            return
        data = _read(fd, CONFIG_LIMIT)
    finally:
        os.close(fd)
    out.files_read += 1
    out.bytes_read += len(data)
    if path in owned.digests and len(data) == st.st_size:
        algorithm = owned.digests[path][0]
        if owned.matches(path, {algorithm: hashlib.new(algorithm, data).hexdigest()}):
            out.skip(path, "its package's own content (digest as installed)", line=False)
            return
    rules = secret_rules.by_path(path)
    if b"\0" in data[:BINARY_PROBE] and not secret_rules.reads_binary(path):
        out.skip(path, "binary (a NUL byte in its first 8 KiB)", line=False)
        return
    if st.st_size > len(data):
        out.skip(path, f"only its first {CONFIG_LIMIT >> 20} MiB scanned (of {st.st_size:,} bytes)")
    hits: dict[tuple[int, str], str] = {}
    for rule in rules:
        for hit in rule(data):
            hits.setdefault((hit.line, hit.detector), hit.value)
    keys = {(h.line, h.detector): h.value for h in secret_rules.private_keys(data)}
    key_lines = {line for line, _ in keys}
    hits.update(keys)
    if b"\0" not in data[:BINARY_PROBE]:
        for line, detector, value in detectors.scan(as_config(path), data):
            if detector == "Private Key" and line in key_lines:
                continue  # the rule's finding says more (whether it has a passphrase)
            hits.setdefault((line, detector), value)
    # One finding a line: the most specific detector's (a provider's token over the keyword
    # that names it, over the entropy of the same string).
    best: dict[int, tuple[int, str, str]] = {}
    for (line, detector), value in hits.items():
        rank = _GENERIC.get(detector, 0)
        if line not in best or (rank, detector) < best[line][:2]:
            best[line] = (rank, detector, value)
    for line, (_, detector, value) in sorted(best.items()):
        if len(out.findings) >= FINDINGS_KEPT:
            out.findings_not_kept += 1
            continue
        out.findings.append(Finding(path, line, detector, prints.of(path, detector, value)))


def _read(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(1 << 20, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def describe(out: Scanned) -> dict[str, Any]:
    """The scan's figures, for the record."""
    return {
        "files_seen": out.files_seen,
        "files_read": out.files_read,
        "bytes_seen": out.bytes_seen,
        "bytes_read": out.bytes_read,
        "seconds": out.seconds,
        "findings_not_kept": out.findings_not_kept,
        "package_database": out.package_database,
        "not_scanned": dict(out.counts),
    }
