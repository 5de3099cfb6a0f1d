"""What the guest's package database says its packages' files hold: path -> digest, read from the
guest's own records (dpkg's ``info/*.md5sums`` and the conffiles of ``status``; rpm's SQLite
database, ``rpmdb.sqlite``). The secret scan skips a file whose content still has its package's
digest: it is the distribution's, not something a user wrote.

Nothing here runs the guest's or the host's package tools: the records are parsed as data, each
read through the guest's path layer with a size cap, and a record that does not parse is left
out (its files are then scanned, which is slower, never wrong). rpm's older Berkeley DB and ndb
databases (RHEL 7 and before, SUSE before 15.4) are not read: their files are scanned.
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from imaging.disk.files import Guest
from imaging.errors import GuestError

# dpkg's status file of a large server is a few MiB; a database beyond these is not a real one.
_STATUS_LIMIT = 64 << 20
_RPMDB_LIMIT = 512 << 20
_RPMDBS = ("/var/lib/rpm/rpmdb.sqlite", "/usr/lib/sysimage/rpm/rpmdb.sqlite")
# rpm's header tags (rpmtag.h) and digest algorithms (PGPHASHALGO_*).
_DIRINDEXES, _BASENAMES, _DIRNAMES, _FILEDIGESTS, _DIGESTALGO = 1116, 1117, 1118, 1035, 5011
_RPM_ALGOS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512"}


@dataclass(frozen=True)
class Owned:
    """The digests of packaged files, by guest path, and which database they came from."""

    digests: dict[str, tuple[str, str]]  # path -> (hashlib algorithm, hex digest)
    source: str  # "dpkg", "rpm (sqlite)", or "" when the guest has neither

    def matches(self, path: str, algorithm_digest: dict[str, str]) -> bool:
        found = self.digests.get(path)
        return found is not None and algorithm_digest.get(found[0]) == found[1]


def read(g: Guest) -> Owned:
    """The guest's package database, as digests by path (empty if it has none we read)."""
    dpkg = dict(_dpkg(g))
    if dpkg:
        return Owned(dpkg, "dpkg")
    for path in _RPMDBS:
        if g.is_file(path):
            with contextlib.suppress(GuestError, sqlite3.Error, struct.error, ValueError):
                rpm = dict(_rpm(g, path))
                if rpm:
                    return Owned(rpm, "rpm (sqlite)")
    return Owned({}, "")


def _dpkg(g: Guest) -> Iterator[tuple[str, tuple[str, str]]]:
    info = "/var/lib/dpkg/info"
    if not g.is_dir(info):
        return
    for name in g.listdir(info):
        if not name.endswith(".md5sums"):
            continue
        with contextlib.suppress(GuestError):
            for line in (g.read_text(f"{info}/{name}") or "").splitlines():
                digest, _, path = line.partition("  ")
                if len(digest) == 32 and path:
                    yield "/" + path.lstrip("/"), ("md5", digest.lower())
    # Conffiles are not in md5sums: their digest as installed is in status.
    with contextlib.suppress(GuestError):
        status = g.read_bytes("/var/lib/dpkg/status", _STATUS_LIMIT) or b""
        for line in status.decode("utf-8", "replace").splitlines():
            words = line.split()
            if line.startswith(" /") and len(words) >= 2 and len(words[1]) == 32:
                yield words[0], ("md5", words[1].lower())


def _rpm(g: Guest, path: str) -> Iterator[tuple[str, tuple[str, str]]]:
    """Each package's header from the ``Packages`` table, read from a copy of the database and
    its write-ahead log (rpm writes in WAL mode: a guest shut down uncleanly keeps recent
    installs there). SQLite is built to read hostile files; only the copy is ever opened."""
    with tempfile.TemporaryDirectory() as d:
        copy = f"{d}/rpmdb.sqlite"
        for suffix in ("", "-wal"):
            data = g.read_bytes(path + suffix, _RPMDB_LIMIT)
            if data is not None:
                with open(copy + suffix, "wb") as f:
                    f.write(data)
        db = sqlite3.connect(copy)
        try:
            db.execute("PRAGMA trusted_schema = OFF")
            for (blob,) in db.execute("SELECT blob FROM Packages"):
                if isinstance(blob, bytes):
                    yield from _header_files(blob)
        finally:
            db.close()


def _header_files(blob: bytes) -> Iterator[tuple[str, tuple[str, str]]]:
    """(path, digest) of one rpm header: an index of (tag, type, offset, count) entries over a
    data store (rpm's headerImport format, without the magic a header file has)."""
    count, size = struct.unpack_from(">II", blob, 0)
    store = 8 + 16 * count
    if store + size > len(blob):
        raise ValueError("header shorter than its index says")
    tags: dict[int, tuple[int, int, int]] = {}
    for i in range(count):
        tag, kind, offset, n = struct.unpack_from(">IIiI", blob, 8 + 16 * i)
        tags[tag] = (kind, store + offset, n)

    def strings(tag: int) -> list[str]:
        if tag not in tags:
            return []
        _, at, n = tags[tag]
        parts = blob[at : store + size].split(b"\0", n)[:n]
        return [p.decode("utf-8", "replace") for p in parts]

    def ints(tag: int) -> list[int]:
        if tag not in tags:
            return []
        _, at, n = tags[tag]
        return list(struct.unpack_from(f">{n}i", blob, at))

    algorithm = _RPM_ALGOS.get((ints(_DIGESTALGO) or [1])[0])
    if algorithm is None:
        return
    names, dirs, index, digests = (strings(_BASENAMES), strings(_DIRNAMES), ints(_DIRINDEXES),
                                   strings(_FILEDIGESTS))  # fmt: skip
    for name, d, digest in zip(names, index, digests, strict=False):
        if digest and 0 <= d < len(dirs):
            yield dirs[d] + name, (algorithm, digest.lower())
