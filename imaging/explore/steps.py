"""Exploring an image step by step (notebooks/explore.ipynb): the logic behind its panels.

A :class:`Session` is one run, opened the way ``imaging export`` opens it and driven by the
pipeline's own :class:`~imaging.run.pipeline.Runner`, one stage at a time, so its run directory and
executed stage notebooks are the same record an export leaves. Between stages a person looks
inside the instance (read-only mounts: planning changes nothing), sees which profile matched
and why, changes the clean operations and the target while the stages that use them have not
run, and reads the plans the stage notebooks will then apply. The widgets live in
:mod:`imaging.explore.panels`; everything here works, and is tested, without them.
"""

from __future__ import annotations

import contextlib
import posixpath
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from imaging import config
from imaging.disk.files import Guest
from imaging.errors import ImagingError, ParameterError
from imaging.explore import proposal
from imaging.guest import access, clean, migrate, secrets
from imaging.guest.profiles import Detected, RuleCheck, check_rules, resolve
from imaging.run import pipeline
from imaging.run.request import Request
from imaging.workspace import Workspace

MAX_ENTRIES = 1000  # directory entries listed
MAX_VIEW = 256 << 10  # bytes of a file shown
_HEX_BYTES = 512


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    kind: str  # directory, file, symlink, other
    size: int
    mode: str  # as ls -l shows it
    link: str = ""  # a symlink's target, as written in the guest


@dataclass(frozen=True)
class Listing:
    path: str
    entries: list[Entry]
    total: int  # entries in the directory; more than shown when capped


@dataclass(frozen=True)
class FileView:
    path: str
    real: str  # where the path leads inside the guest
    size: int
    text: str  # the file's text, or a hex dump of its start
    note: str  # what is shown, and why not more
    is_dir: bool = False


def guest_path(path: str) -> str:
    """A path typed by a person, as a guest-absolute path (``..`` stops at the guest's root)."""
    return posixpath.normpath("/" + path.strip().lstrip("/")) if path.strip() else "/"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "symlink" if stat.S_ISLNK(mode) else "other"


def list_dir(g: Guest, path: str) -> Listing:
    """A directory of the guest (a symlinked one is followed inside the guest), capped."""
    path = g.realpath(guest_path(path))
    names = g.listdir(path)
    entries = []
    for name in names[:MAX_ENTRIES]:
        full = posixpath.join(path, name)
        st = g.lstat(full)
        if st is None:
            continue
        kind = _kind(st.st_mode)
        entries.append(Entry(name, full, kind, st.st_size, stat.filemode(st.st_mode),
                             g.readlink(full) if kind == "symlink" else ""))  # fmt: skip
    return Listing(path, entries, len(names))


def view_file(g: Guest, path: str, limit: int = MAX_VIEW) -> FileView:
    """A file of the guest as text, or its start as hex when binary; never more than ``limit``
    bytes, never a device or FIFO opened, never a path leaving the guest."""
    path = guest_path(path)
    lst = g.lstat(path)
    if lst is None:
        return FileView(path, path, 0, "", "no such file in the guest")
    real = g.realpath(path)
    st = g.stat(path)
    link = f"a symlink to {g.readlink(path)!r}, " if stat.S_ISLNK(lst.st_mode) else ""
    if st is None:
        return FileView(path, real, 0, "", f"{link}leading nowhere inside the guest")
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket: not opened"
        return FileView(path, real, 0, "", f"{link}{what}", stat.S_ISDIR(st.st_mode))
    try:
        data, size = g.read_head(path, limit)
    except OSError as e:
        return FileView(path, real, st.st_size, "", f"{link}cannot be read: {e.strerror}")
    more = f" (the first {limit:,} of {size:,} bytes)" if size > limit else ""
    if b"\0" in data[:8192]:
        return FileView(path, real, size, _hexdump(data[:_HEX_BYTES]),
                        f"{link}binary, {size:,} bytes: the first {min(size, _HEX_BYTES)} as hex")  # fmt: skip
    return FileView(
        path, real, size, data.decode("utf-8", errors="replace"), f"{link}text, {size:,} bytes{more}"
    )


def _hexdump(data: bytes) -> str:
    rows = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        printable = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"{off:08x}  {chunk.hex(' '):<47}  {printable}")
    return "\n".join(rows)


def clean_words(base: list[str], chosen: list[str]) -> list[str]:
    """The request's clean words that turn the profile's operations ``base`` into ``chosen``."""
    return [n for n in chosen if n not in base] + [f"-{n}" for n in base if n not in chosen]


def stages_to_run(stages: list[str], pending: list[str], until: str) -> list[str]:
    """Which of the pending stages ``RUN_STAGES`` asks for: all, none, or up to a named stage."""
    if until in ("all", ""):
        return pending if until == "all" else []
    if until == "none":
        return []
    if until not in stages:
        raise ParameterError(f"RUN_STAGES is all, none or one of {', '.join(stages)}, not {until!r}")
    return [s for s in pending if stages.index(s) <= stages.index(until)]


class Session:
    """One image being explored: a run whose instance has been acquired."""

    def __init__(self, runner: pipeline.Runner) -> None:
        self.runner = runner

    @classmethod
    def open(cls, source: str = "", *, name: str = "explore", target: str = "kvm", image_format: str = "qcow2",
             run: str = "", err: TextIO = sys.stderr) -> Session:  # fmt: skip
        """A new run for ``source`` (sample:xen, a file), or the existing run ``run``; either
        way 00-acquire has run when this returns, so there is an instance to look at."""
        if run:
            ws, request = pipeline.open_run(run, None)
        else:
            request = Request.create(source=source, name=name, target=target, format=image_format)
            ws, request = pipeline.open_run(None, request)
        session = cls(pipeline.Runner(ws, request, err=err))
        if (
            session.runner.next_stage() == session.runner.stages[0]
            and session.runner.stages[0] == "00-acquire"
        ):
            session.runner.step()
        return session

    @property
    def ws(self) -> Workspace:
        return self.runner.ws

    @property
    def request(self) -> Request:
        return self.runner.request

    @contextlib.contextmanager
    def guest(self) -> Iterator[Guest]:
        """The run's instance, mounted read-only for as long as the block lasts."""
        if not self.ws.instance.exists():
            raise ImagingError(
                f"run {self.ws.id} has no instance to look at: not acquired yet, or the run completed "
                "and its work files went (keep_work keeps them)"
            )
        with access.reading(self.ws) as g:
            yield g

    def list_dir(self, path: str) -> Listing:
        with self.guest() as g:
            return list_dir(g, path)

    def view_file(self, path: str) -> FileView:
        with self.guest() as g:
            return view_file(g, path)

    def detected(self) -> tuple[Detected, list[RuleCheck]]:
        """The profile the stages will use, why, and every profile's rules checked."""
        with self.guest() as g:
            return resolve(g, self.request.profile), check_rules(g)

    def proposal(self) -> str:
        with self.guest() as g:
            return proposal.propose(g)

    def clean_operations(self) -> tuple[list[str], list[str]]:
        """(the profile's default operations, those the request now chooses)."""
        with self.guest() as g:
            profile = resolve(g, self.request.profile).profile
        base = clean.select(profile.clean)
        return base, clean.select([*profile.clean, *self.request.clean])

    def choose_clean(self, chosen: list[str]) -> list[str]:
        """Make ``chosen`` the operations 10-clean runs; return the request's clean words."""
        base, _ = self.clean_operations()
        words = clean_words(base, clean.select(["none", *chosen]))
        self.runner.amend(clean=words)
        return words

    def clean_plan(self) -> clean.CleanPlan:
        r = self.request
        return clean.plan(
            self.ws, r.clean, profile=r.profile, platforms=r.platforms, remove_users=r.remove_users
        )

    def choose_target(self, target: str) -> None:
        self.runner.amend(target=config.load_target(target).name)

    def migration_options(self) -> migrate.MigrateOptions:
        fields = self.request.model_dump()
        return migrate.MigrateOptions(**{k: fields[k] for k in migrate.MigrateOptions.model_fields})

    def migration_plan(self) -> migrate.MigrationPlan:
        return migrate.plan(self.ws, self.request.target, self.migration_options())

    def secret_scan(self) -> secrets.Scan:
        """25-secrets' findings on the instance as it is now (before 10-clean has run, cleaning
        will still remove some), under the request's policy and allow list."""
        r = self.request
        return secrets.scan(self.ws, secrets.policy(r.secrets, r.kind, r.vis), r.secrets_allow)

    def remove_secret_file(self, path: str) -> secrets.Removed:
        """Remove one file that holds a finding from the instance (before 25-secrets has run)."""
        if self.runner.done("25-secrets"):
            raise ImagingError(f"25-secrets has run in {self.ws.id}: the disk is made from what it scanned")
        return secrets.remove(self.ws, [path])

    def allow_secret(self, fingerprint: str) -> None:
        """Allow a finding by its fingerprint (the request's allow list)."""
        self.runner.amend(secrets_allow=[*self.request.secrets_allow, fingerprint])

    def status(self) -> list[dict[str, Any]]:
        """Each stage: done, next or waiting, its time, and its executed notebook."""
        nxt = self.runner.next_stage()
        rows = []
        for stage in self.runner.stages:
            done = self.runner.done(stage)
            timing = self.runner.timings.get(stage, {})
            rows.append({
                "stage": stage,
                "status": "done" if done else "next" if stage == nxt else "waiting",
                "seconds": timing.get("seconds"),
                "notebook": str(self.ws.notebooks / f"{stage}.ipynb") if done else "",
            })  # fmt: skip
        return rows

    def run_next(self) -> str:
        """Run the next stage through the pipeline; return its name."""
        return self.runner.step()

    def run_stages(self, until: str = "all") -> list[str]:
        """Run the pending stages ``until`` asks for, one at a time (see :func:`stages_to_run`)."""
        pending = [s for s in self.runner.stages if not self.runner.done(s)]
        wanted = stages_to_run(self.runner.stages, pending, until)
        return [self.runner.step() for _ in wanted]

    def finish(self) -> dict[str, Any] | None:
        """The run's result once every stage is done (result.json, audit chain); else None."""
        return None if self.runner.next_stage() else self.runner.finish()
