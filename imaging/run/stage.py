"""What every stage notebook does around its work: open the run, record commands, stop cleanly.

A stage notebook starts with ``ws = stage.open("30-bootable", RUN_DIR)`` and ends with
``stage.record(ws, "30-bootable", result)``. In between, every command lands in the run's command
log, and a SIGTERM (from the pipeline, or sent because the pipeline itself died) becomes an
exception in the running cell, so ``with`` blocks remove partial files and stop tools before the
kernel goes away.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from imaging import tools
from imaging.errors import Interrupted
from imaging.records import Record, plain
from imaging.run import lineage, scraps
from imaging.tables import Table
from imaging.workspace import Workspace

# Time a stage gets to clean up after SIGTERM before the kernel exits regardless.
_CLEANUP_GRACE = 30.0
_stopping = False
_opened = False  # a stage has begun its work in this kernel: there may be something to undo
_exiting = False  # the kernel's atexit hooks run: its cells are over


def _exit_after_cell(*_: Any) -> None:
    # A moment later, not here: the kernel sends the cell's reply (its error) after this hook,
    # and whoever runs the notebook must get it rather than wait for a reply that never comes.
    threading.Timer(0.5, os._exit, (143,)).start()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The first SIGTERM interrupts the running cell: its with-blocks stop tools, unmount and
    # remove partial files; when the cell has ended the kernel exits. Later signals must not
    # interrupt that cleanup.
    global _stopping
    if _stopping:
        return
    _stopping = True
    # A kernel started ahead of its stage, or still starting, has nothing to undo; nor has one
    # already exiting (its atexit hooks running: jupyter_client sends SIGTERM to a kernel slow to
    # exit on a loaded host, and an exception raised in a hook is printed as a traceback).
    if not _opened or _exiting:
        os._exit(128 + signum)
    # A daemon: the backstop must not itself keep a kernel alive whose main thread has ended
    # (an idle kernel, the one started ahead of its stage, ends as the exception leaves its loop).
    backstop = threading.Timer(_CLEANUP_GRACE, os._exit, (128 + signum,))
    backstop.daemon = True
    backstop.start()
    if _in_kernel():
        from IPython import get_ipython

        get_ipython().events.register("post_run_cell", _exit_after_cell)
    raise Interrupted(f"stage stopped by signal {signum}")


def _watch_parent(parent: int) -> None:
    # The kernel's parent is the pipeline, or the zygote it was forked from, which goes when the
    # pipeline goes (zygote.py; OWNER then names the zygote). If it dies (even by SIGKILL) the
    # kernel must not go on working unobserved: turn that into the same SIGTERM path. Checked
    # first thing: the parent may have died while this kernel was starting.
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)


_watching = False


def _note_exit() -> None:
    global _exiting
    _exiting = True
    # The stage's work is over and recorded. What ipykernel prints from here on is its own
    # shutdown racing itself on a loaded host (its control thread flushing to the sockets its
    # atexit close just closed: "ZMQError: Socket operation on non-socket"): not the run's to say
    # on the run's stderr, which the kernel shares.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def guard() -> None:
    """SIGTERM cleans up, and the kernel goes when the pipeline does: run first thing in a stage
    kernel (also when it is started ahead of its stage, before any cell)."""
    global _watching
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Registered after the kernel's own hooks, so run before them (atexit runs the last first).
    atexit.unregister(_note_exit)  # guard runs again as each stage opens: once is enough
    atexit.register(_note_exit)
    if not _watching and os.environ.get("IMAGING_PIPELINE"):
        _watching = True
        # The pid the pipeline gave, not the parent found now: that is init if the pipeline
        # died before this line ran, and a kernel watching init stayed for ever (issue 29).
        parent = int(os.environ.get(lineage.OWNER) or os.getppid())
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


class StageHeader(Record):
    def __init__(self, ws: Workspace, stage: str) -> None:
        self.run = ws.id
        self.stage = stage
        self.directory = str(ws.root)
        self.host = socket.gethostname()
        self.started = datetime.now(UTC).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def open(stage: str, run_dir: str) -> Workspace:  # noqa: A001 - reads as stage.open(...)
    """Open (or create) the run directory for ``stage`` and start recording its commands."""
    global _opened
    ws = Workspace.open(run_dir)
    _opened = True
    tools.set_command_log(ws.commands_log)
    guard()
    return ws


def header(ws: Workspace, stage: str) -> StageHeader:
    return StageHeader(ws, stage)


def commands() -> Table:
    """The commands this stage ran: argv, exit code, duration, last line of stderr."""
    rows = [
        (
            r.command if len(r.command) < 160 else r.command[:157] + "...",
            r.exit_code,
            round(r.duration, 3),
            r.stderr_tail(1)[:120],
        )
        for r in tools.recorded()
    ]
    return Table(rows, ["command", "exit", "seconds", "stderr (last line)"])


def record(ws: Workspace, stage: str, result: Any) -> dict[str, Any]:
    """Save the stage's result for the stages after it and glue it into this notebook."""
    data = result.to_dict() if isinstance(result, Record) else plain(result)
    ws.save_result(stage, data)
    if _in_kernel():
        scraps.glue(stage, data)
    return data


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None
