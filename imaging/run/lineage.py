"""No process of a run outlives the run's own process, however that one ends.

A run's process starts its stage kernels (each in a session of its own, out of reach of the
terminal's Ctrl-C, so a kill of the CLI's process group does not reach them either), the
source's digest, and through the kernels every tool. A run killed outright (``kill -9``, the
OOM killer) cannot stop them; three things do:

- PR_SET_PDEATHSIG, asked for between fork and exec (:func:`die_with_parent`): the kernel gets
  SIGTERM, and cleans up as on any SIGTERM, the moment its parent dies. Linux sends it when the
  *thread* that forked the child ends, not the process: it is only asked for where that thread
  lives as long as the process does.
- The kernel watches its parent too (``stage.guard``), against the pid the run gave it in
  OWNER (a kernel forked by the run's zygote watches the zygote, which watches the run:
  zygote.py): a kernel whose parent died while it was still starting found init as its parent, and
  watched init for ever (issue 29: 4 of 7 runs killed by ``kill -9`` left one, 50-63 MiB each,
  there an hour later).
- Every process of the run carries MARK, the run's directory, in its environment (the tools
  inherit it from their kernel). The next process to hold the run, and the service's worker
  once a run's process has exited, end whatever still carries it (:func:`end`): a tool's own
  children, in sessions of their own, that no parent-death signal reaches.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

MARK = "IMAGING_RUN_DIR"
OWNER = "IMAGING_RUN_PID"

# Looked up now, not in the child: between fork and exec a lookup (dlsym) could wait for a lock
# another thread of ours held when we forked.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``signum`` when the thread forking it ends."""
    parent = os.getpid()

    def prepare() -> None:
        _prctl(_PR_SET_PDEATHSIG, signum)
        # The parent may have died between the fork and the prctl: nobody would send it then.
        # _exit, not a signal to ourselves: until exec we still have the parent's handlers.
        if os.getppid() != parent:
            os._exit(128 + signum)

    return prepare


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command's name may hold spaces and ')'
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """A zombie is gone for our purposes: it holds nothing but its entry in the process table."""
    found = _stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def _marked(pid: int, mark: bytes) -> bool:
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return False


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        found = _stat(pid)
        if found is None:
            return False
        pid = found[1]
    return False


def leftovers(run_dir: Path) -> list[int]:
    """The processes marked as the run's that this process did not start, nor started it.

    What this process started is its own to stop; what started it (a CLI run from a stage's
    tool, say) must never be taken for a leftover.
    """
    mark = f"{MARK}={run_dir}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me or not _marked(pid, mark) or not alive(pid):
            continue
        if _descends(pid, me) or _descends(me, pid):
            continue
        found.append(pid)
    return sorted(found)


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return argv.replace(b"\0", b" ").decode(errors="replace").strip()


def end(run_dir: Path, grace: float) -> list[str]:
    """SIGTERM to every leftover of the run, ``grace`` seconds for them to clean up (a stage
    kernel unmounts and removes its partial files), then SIGKILL; returns ``pid command`` of
    each one that was found."""
    mark = f"{MARK}={run_dir}".encode()
    found = {pid: _command(pid) for pid in leftovers(run_dir)}
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in found) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in found:
        # Marked still: a pid that was let go and taken by another process is not killed.
        if alive(pid) and _marked(pid, mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return [f"{pid} {command}".strip() for pid, command in found.items()]
