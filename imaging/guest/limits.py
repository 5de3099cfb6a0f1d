"""Memory, process and time limits for the guest's own tools (see sandbox.py).

A tool from the image may try to take the host down with it: allocate until the host swaps or
the OOM killer picks a host process, fork until the host's process table is full, or never end.
Each sandboxed command therefore runs in a control group of its own, made for it and removed
after it, with a memory limit (no swap) and a process limit; the command's time limit is
:func:`imaging.tools.run`'s. Where the host's cgroups are:

- cgroup v1 (memory and pids hierarchies): a child of this process's own group in each, so
  whatever limits the caller lives under still hold;
- cgroup v2 under systemd: a transient scope (``systemd-run --scope``) with MemoryMax,
  MemorySwapMax=0 and TasksMax;
- cgroup v2 without systemd, where the root group hands out memory and pids: a child of it;
- none of these (a container without its cgroups): per-process limits only (address space),
  and the record says so.

The process limit also holds as RLIMIT_NPROC, set on the sandbox's first process once it is in
its own user namespace: there it counts the sandbox's processes only (as root outside a user
namespace the kernel would not enforce it).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from imaging import tools
from imaging.records import human_bytes

CGROUP = Path("/sys/fs/cgroup")
_NAME = "imaging-sandbox"
_counter = itertools.count(1)


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes, the tool and all its children together, page cache included
    processes: int
    seconds: float  # wall-clock time

    def describe(self) -> str:
        return f"memory {human_bytes(self.memory)}, {self.processes} processes, {self.seconds:.0f} s"


def _own_group(controller: str) -> str:
    """This process's group in a v1 hierarchy ("/" for the root)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return "/"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path, key: str | None = None) -> int:
    """A number from a cgroup file: the whole file, or the line ``key N``."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    if key is None:
        return int(text.split()[0]) if text.split() else 0
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == key:
            return int(words[1])
    return 0


class Box:
    """One command's limits: ``prefix`` goes before its argv, ``join`` runs in the child before
    it starts, ``contain(pid)`` once its first process is in its user namespace; ``why_killed``
    tells after the fact which limit stopped it. Removed on exit, whatever the command did."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.name = f"{_NAME}-{os.getpid()}-{next(_counter)}"
        self.kind = "rlimits"
        self.groups: list[Path] = []
        self.prefix: list[str] = []

    def __enter__(self) -> Box:
        try:
            self._make()
        except OSError:
            self._remove()
            self.groups, self.kind = [], "rlimits"
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _make(self) -> None:
        lim = self.limits
        if (CGROUP / "memory" / "memory.limit_in_bytes").exists() and (CGROUP / "pids").is_dir():
            memory = CGROUP / "memory" / _own_group("memory").lstrip("/") / self.name
            pids = CGROUP / "pids" / _own_group("pids").lstrip("/") / self.name
            for group in (memory, pids):
                group.mkdir()
                self.groups.append(group)
            _write(memory / "memory.limit_in_bytes", str(lim.memory))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(lim.memory))
            _write(pids / "pids.max", str(lim.processes))
            self.kind = "cgroup v1"
        elif (
            (CGROUP / "cgroup.controllers").exists()
            and Path("/run/systemd/system").is_dir()
            and tools.which("systemd-run")
        ):
            self.prefix = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={self.name}",
                           f"--property=MemoryMax={lim.memory}", "--property=MemorySwapMax=0",
                           f"--property=TasksMax={lim.processes}", "--"]  # fmt: skip
            self.kind = "systemd scope (cgroup v2)"
        elif {"memory", "pids"} <= set((CGROUP / "cgroup.subtree_control").read_text().split()):
            group = CGROUP / self.name
            group.mkdir()
            self.groups.append(group)
            _write(group / "memory.max", str(lim.memory))
            with contextlib.suppress(OSError):
                _write(group / "memory.swap.max", "0")
            _write(group / "pids.max", str(lim.processes))
            self.kind = "cgroup v2"

    def join(self) -> None:
        """In the child, before exec: into the groups; no core dumps into the guest; and where
        no group holds the memory, each process's address space at most the limit."""
        for group in self.groups:
            _write(group / "cgroup.procs", str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.kind == "rlimits":
            resource.setrlimit(resource.RLIMIT_AS, (self.limits.memory, self.limits.memory))

    def contain(self, pid: int) -> None:
        """The sandbox's first process, in its own user namespace: RLIMIT_NPROC counts only the
        processes of that namespace there, so the process limit holds even without a group."""
        n = self.limits.processes
        resource.prlimit(pid, resource.RLIMIT_NPROC, (n, n))

    def why_killed(self) -> str:
        """Which limit the command ran into, in words ('' if none that we can tell)."""
        lim = self.limits
        said = []
        for group in self.groups:
            # v1 and v2 name the OOM kills in different files; both count refused forks alike.
            if _read_int(group / "memory.oom_control", "oom_kill") or _read_int(
                group / "memory.events", "oom_kill"
            ):
                said.append(f"it went over its memory limit of {human_bytes(lim.memory)}")
            if _read_int(group / "pids.events", "max"):
                said.append(f"it ran into its limit of {lim.processes} processes")
        return "; ".join(dict.fromkeys(said))

    def peak_memory(self) -> int | None:
        """The most memory the group has held (its processes, and the page cache they filled),
        where the kernel keeps count."""
        for group in self.groups:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                if (group / name).exists():
                    return _read_int(group / name)
        return None

    def _remove(self) -> None:
        for group in reversed(self.groups):
            _empty(group)
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes still leaving (a PID namespace's teardown)
                    time.sleep(0.02)
                    _empty(group)

    def describe(self) -> str:
        return f"{self.kind}: {self.limits.describe()}"


def _empty(group: Path) -> None:
    """Kill whatever is still in ``group``."""
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def release_leftovers() -> list[str]:
    """Groups of sandboxes whose process is gone (killed with SIGKILL, it could not remove
    them): emptied and removed. The pipeline calls this after every failed stage."""
    removed = []
    parents = [CGROUP]
    for controller in ("memory", "pids"):
        with contextlib.suppress(OSError):
            parents.append(CGROUP / controller / _own_group(controller).lstrip("/"))
    for parent in parents:
        with contextlib.suppress(OSError):
            for group in parent.glob(f"{_NAME}-*-*"):
                owner = group.name.split("-")[-2]
                if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                    _empty(group)
                    with contextlib.suppress(OSError):
                        group.rmdir()
                        removed.append(str(group))
    return removed
