"""Stage 25-secrets: what cleaning kept that must not leave in an image, found, shown without
its value, and dealt with by the request's policy.

The scan (:mod:`imaging.guest.secret_scan`) reads the guest as 20-migrate left it, the very
files 30-bootable places. Each finding is a path, a line, a detector and a fingerprint; the
policy decides what an open finding (one not allowed by its fingerprint) does:

- ``fail``: the stage stops with the findings in its one-line error (a public image by default);
  an admin approves again with the fingerprints allowed, or with ``clean``;
- ``warn``: recorded, the run goes on (everything else by default);
- ``clean``: the files holding open findings are removed, on a copy of the instance as 10-clean
  does, then the run goes on;
- ``off``: no scan.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from imaging import config
from imaging.errors import GuestError, ImagingError
from imaging.guest import access, secret_scan
from imaging.guest.secret_scan import Finding
from imaging.records import Record
from imaging.tables import Table
from imaging.workspace import Workspace

KEY_ENV = "IMAGING_FINGERPRINT_KEY"
_SHOWN_IN_ERROR = 10


class SecretsFound(ImagingError):
    """Open findings under the fail policy."""


def fingerprint_key() -> bytes:
    """The key findings' fingerprints are made with: the service's (``IMAGING_FINGERPRINT_KEY``,
    the same on every host, so an allow list holds wherever the run resumes), else this host's,
    made once in the cache directory (mode 0600; the runs directory holds runs only)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = config.cache_dir() / "fingerprint.key"
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".fingerprint.key.{os.getpid()}")
    part.write_bytes(os.urandom(32).hex().encode())
    part.chmod(0o600)
    with contextlib.suppress(FileExistsError):
        os.link(part, path)  # the first host process to get here decides the key
    part.unlink()
    return path.read_bytes()


def policy(asked: str, kind: str, vis: str) -> str:
    """What an open finding does: ``auto`` is fail for a public image, warn for the rest."""
    if asked != "auto":
        return asked
    return "fail" if kind == "image" and vis == "public" else "warn"


def _advice(f: Finding) -> str:
    if "private key" in f.detector:
        return "remove the key (and revoke it if it was ever used), or allow it"
    return "remove the file or the line (and rotate the credential), or allow it"


@dataclass(frozen=True)
class Scan(Record):
    """The scan's findings and figures; ``open`` are those the allow list does not cover."""

    policy: str
    findings: list[Finding] = field(repr=False)
    allowed: list[str] = field(repr=False)
    figures: dict[str, Any] = field(repr=False)
    skipped: list[str] = field(repr=False, default_factory=list)

    @property
    def open(self) -> list[Finding]:
        return [f for f in self.findings if f.fingerprint not in self.allowed]

    @property
    def over(self) -> int:
        """Findings beyond those the record keeps (secret_scan.FINDINGS_KEPT): open, since
        nobody could see them to allow them."""
        return int(self.figures.get("findings_not_kept") or 0)

    def summary(self) -> Table:
        fig = self.figures
        rows = [
            ("policy", self.policy),
            ("findings", f"{len(self.findings)} ({len(self.findings) - len(self.open)} allowed)"),
            ("files", f"{fig.get('files_seen', 0):,} seen, {fig.get('files_read', 0):,} read"),
            ("bytes", f"{fig.get('bytes_read', 0):,} read of {fig.get('bytes_seen', 0):,}"),
            ("package database", fig.get("package_database", "-")),
            ("seconds", fig.get("seconds", 0)),
        ]
        rows += [(f"not scanned: {why}", n) for why, n in sorted((fig.get("not_scanned") or {}).items())]
        return Table(rows, ["", "value"], index="")

    def table(self) -> Table:
        rows = [
            (f.path, f.line or "(file)", f.detector, f.fingerprint,
             "allowed" if f.fingerprint in self.allowed else _advice(f))
            for f in self.findings
        ]  # fmt: skip
        return Table(rows, ["path", "line", "detector", "fingerprint", "what to do"])

    def files(self) -> list[str]:
        """The files that hold open findings, each once."""
        return list(dict.fromkeys(f.path for f in self.open))


def scan(ws: Workspace, policy: str, allow: list[str]) -> Scan:
    """The guest's findings (read-only). With policy ``off``, an empty scan that says so."""
    if policy == "off":
        return Scan(policy, [], list(allow), {"package_database": "-", "seconds": 0})
    with access.reading(ws) as g:
        found = secret_scan.scan(g, secret_scan.Fingerprints(fingerprint_key()))
        skipped = [*found.skipped, *g.skipped]
    return Scan(policy, found.findings, list(allow), secret_scan.describe(found), skipped)


@dataclass(frozen=True)
class Removed(Record):
    files: list[str]
    bytes: int


def remove(ws: Workspace, paths: list[str]) -> Removed:
    """Remove these guest files, on a copy of the instance that replaces it when all are gone
    (explore.ipynb's buttons, and the clean policy)."""
    gone = 0
    with access.editing(ws) as g:
        for path in paths:
            removed = g.remove(path)
            if removed is None:
                raise GuestError(f"{path} is no longer in the guest")
            gone += removed.bytes
    return Removed(list(paths), gone)


def one_line(found: Scan) -> str:
    """The open findings in one line: what the failure mail and the request's error say."""
    shown = [f"{f.path}:{f.line} {f.detector} [{f.fingerprint}]" for f in found.open[:_SHOWN_IN_ERROR]]
    more = len(found.open) + found.over - len(shown)
    return (
        f"{len(found.open) + found.over} secret(s) found in the guest under policy {found.policy}: {'; '.join(shown)}"
        + (f"; and {more} more (see 25-secrets)" if more > 0 else "")
        + ". Remove them from the instance, or approve again allowing their fingerprints or with secrets: clean"
    )


def apply(ws: Workspace, found: Scan) -> dict[str, Any]:
    """The policy's consequence: raise (fail), remove the files (clean), or note (warn); the
    stage's record, which holds fingerprints and never a value."""
    removed: Removed | None = None
    if (found.open or found.over) and found.policy == "fail":
        raise SecretsFound(one_line(found))
    if found.over and found.policy == "clean":
        raise SecretsFound(
            f"{one_line(found)} (more findings than the record keeps: clean the instance first)"
        )
    if found.open and found.policy == "clean":
        removed = remove(ws, found.files())
    return {
        "policy": found.policy,
        "findings": [f.__dict__ for f in found.findings],
        "open": len(found.open),
        "allowed": [f.fingerprint for f in found.findings if f.fingerprint in found.allowed],
        "removed": removed.files if removed else [],
        "warnings": [one_line(found)] if found.open and found.policy == "warn" else [],
        "scan": found.figures,
        "skipped": found.skipped,
    }
