"""Stage 10-clean: the clean operations of :mod:`imaging.guest.clean_ops` (virt-sysprep's style),
chosen, planned, then applied.

Each operation has a name, a one-line heading, whether it runs by default, and a ``find`` that
returns what it would do as :class:`Action` rows (path, remove/truncate/edit, bytes, diff): that
list *is* the dry run. Applying runs the same actions on a copy of the instance, which replaces
the instance only when every action succeeded. Nothing outside the actions is touched.

Which operations run: the profile's list, changed by the request's, in virt-sysprep's words:
``defaults``, ``all``, ``none``, ``name`` (add), ``-name`` (remove).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from imaging.disk.files import Guest
from imaging.errors import GuestError, ParameterError
from imaging.guest import access, clean_ops, firstboot
from imaging.guest.clean_ops import Action, Context
from imaging.guest.profiles import load_platform, resolve
from imaging.records import Record, human_bytes
from imaging.tables import Table
from imaging.workspace import Workspace


def operations_table() -> Table:
    """Every operation, ``*`` when it runs by default (like ``virt-sysprep --list-operations``)."""
    rows = [
        (o.name, "*" if o.default else "", o.heading)
        for o in sorted(clean_ops.REGISTRY.values(), key=lambda o: o.name)
    ]
    return Table(rows, ["operation", "default", "heading"])


def select(spec: list[str]) -> list[str]:
    """Resolve ``[defaults, -ssh-hostkeys, cloud-init]`` into operation names, in run order."""
    ops = clean_ops.REGISTRY
    chosen: set[str] = set()
    for word in spec:
        word = word.strip()
        if word == "defaults":
            chosen |= {n for n, o in ops.items() if o.default}
        elif word == "all":
            chosen |= set(ops)
        elif word == "none":
            chosen = set()
        elif word.startswith("-") and word[1:] in ops:
            chosen.discard(word[1:])
        elif word in ops:
            chosen.add(word)
        else:
            raise ParameterError(f"unknown clean operation {word!r} (known: {', '.join(sorted(ops))})")
    return sorted(chosen, key=lambda n: (ops[n].order, n))


@dataclass(frozen=True)
class CleanPlan(Record):
    profile: str
    profile_reason: str
    operations: list[str]
    platforms: list[str]
    actions: list[Action] = field(repr=False)
    # The source's SSH host keys (SHA256 fingerprints): 50-verify checks none comes back.
    ssh_host_keys: list[str] = field(default_factory=list)
    # Paths the guest's own links make unreachable (a symlink loop): left alone, said here.
    skipped: list[str] = field(default_factory=list)
    # What detection took for granted (a version or distro the profile was not written for).
    profile_assumed: str = ""

    def table(self) -> Table:
        rows = [(a["op"], a["path"], a["action"], a["bytes"]) for a in folded(self.actions)]
        return Table(rows, ["operation", "path", "action", "bytes"])

    def diff(self) -> str:
        return "".join(a.diff for a in self.actions if a.diff)

    def summary(self) -> Table:
        return Record.table(self)

    def to_dict(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "profile_reason": self.profile_reason,
            "profile_assumed": self.profile_assumed,
            "operations": self.operations,
            "platforms": self.platforms,
            "actions": folded(self.actions),
            "removed_bytes": sum(a.bytes for a in self.actions if a.action != "edit"),
            "ssh_host_keys": self.ssh_host_keys,
            "skipped": self.skipped,
        }


# A directory with more actions of one kind than this (a /var/log of 100 000 files) is one row
# in the record: the files are named by their directory, counted, and their bytes summed.
FOLD = 100


def folded(actions: list[Action]) -> list[dict[str, object]]:
    """The actions as the record lists them: one row each, or one per directory where a
    directory holds more than FOLD of one operation's kind (``count`` says how many)."""
    groups: dict[tuple[str, str, str], list[Action]] = {}
    for a in actions:
        groups.setdefault((a.op, a.action, posixpath.dirname(a.path)), []).append(a)
    rows: list[dict[str, object]] = []
    done: set[tuple[str, str, str]] = set()
    for a in actions:
        key = (a.op, a.action, posixpath.dirname(a.path))
        group = groups[key]
        if len(group) <= FOLD:
            rows.append({"op": a.op, "path": a.path, "action": a.action, "bytes": a.bytes, "diff": a.diff})
        elif key not in done:
            done.add(key)
            rows.append({"op": a.op, "path": f"{key[2].rstrip('/')}/* ({len(group)} files)", "action": a.action,
                         "bytes": sum(g.bytes for g in group), "diff": "", "count": len(group)})  # fmt: skip
    return rows


def _plan(
    guest: Guest, spec: list[str], profile: str, platforms: list[str], remove_users: list[str]
) -> CleanPlan:
    detected = resolve(guest, profile)
    # The profile picks the defaults; the request's words add to and remove from them.
    names = select([*detected.profile.clean, *spec])
    ctx = Context(guest, detected.profile, [load_platform(p) for p in platforms], remove_users)
    actions: list[Action] = []
    ops = clean_ops.REGISTRY
    for name in names:
        actions += ops[name].find(ctx)
    # What lies inside a directory another operation removes needs no action of its own.
    gone = [a.path + "/" for a in actions if a.action == "remove"]
    actions = [a for a in actions if not any(a.path.startswith(g) for g in gone)]
    keys = firstboot.host_key_fingerprints(guest)
    return CleanPlan(
        detected.profile.name,
        detected.reason,
        names,
        platforms,
        actions,
        keys,
        list(guest.skipped),
        detected.assumed,
    )


def plan(ws: Workspace, spec: list[str], *, profile: str = "auto", platforms: list[str] | None = None,
         remove_users: list[str] | None = None) -> CleanPlan:  # fmt: skip
    """The dry run: what cleaning would remove, empty or edit, and nothing changed."""
    with access.reading(ws) as g:
        return _plan(g, spec, profile, platforms or [], remove_users or [])


@dataclass(frozen=True)
class CleanReport(Record):
    profile: str
    operations: int
    actions: int
    removed: int
    truncated: int
    edited: int
    bytes_freed: int

    @classmethod
    def of(cls, plan: CleanPlan) -> CleanReport:
        count = {k: sum(a.action == k for a in plan.actions) for k in ("remove", "truncate", "edit")}
        freed = sum(a.bytes for a in plan.actions if a.action != "edit")
        return cls(plan.profile, len(plan.operations), len(plan.actions), count["remove"], count["truncate"],
                   count["edit"], freed)  # fmt: skip

    def __str__(self) -> str:
        return f"{self.actions} actions, {human_bytes(self.bytes_freed)} freed"


def apply(ws: Workspace, spec: list[str], *, profile: str = "auto", platforms: list[str] | None = None,
          remove_users: list[str] | None = None) -> CleanPlan:  # fmt: skip
    """Clean a copy of the instance and put it in the instance's place; return what was done."""
    with access.editing(ws) as g:
        done = _plan(g, spec, profile, platforms or [], remove_users or [])
        for action in done.actions:
            _apply(g, action)
    return done


def _apply(g: Guest, action: Action) -> None:
    if action.action == "remove":
        g.remove(action.path)
    elif action.action == "truncate":
        g.truncate(action.path)
    else:
        if action.new_text is None:
            raise GuestError(f"edit of {action.path} has no new text")
        g.write_text(action.path, action.new_text)
