"""The one chokepoint for external commands.

Every tool runs through :func:`run` (or :func:`spawn` for QEMU): arguments are lists, never shell
strings; the environment pins ``LANG=C.UTF-8`` so output stays parseable; each command leaves one
JSON line (argv, exit code, duration, stderr tail) in the run's command log, which the notebooks
show; failures raise :class:`~imaging.errors.CommandError` with a one-line message.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imaging.errors import CommandError, ImagingError, ToolMissing

Arg = str | os.PathLike[str] | int

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    started: str
    duration: float

    def stderr_tail(self, lines: int = 3) -> str:
        text = [line for line in self.stderr.splitlines() if line.strip()]
        return "\n".join(text[-lines:])

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass
class _Log:
    path: Path | None
    results: list[CommandResult] = field(default_factory=list)


_current_log: contextvars.ContextVar[_Log | None] = contextvars.ContextVar("command_log", default=None)


@contextlib.contextmanager
def command_log(path: Path | None) -> Iterator[list[CommandResult]]:
    """Record every command run inside the block (appended as JSON lines to ``path``)."""
    log = _Log(path)
    token = _current_log.set(log)
    try:
        yield log.results
    finally:
        _current_log.reset(token)


def set_command_log(path: Path | None) -> list[CommandResult]:
    """Like :func:`command_log` for a whole notebook kernel: everything after this call is recorded."""
    log = _Log(path)
    _current_log.set(log)
    return log.results


def _record(result: CommandResult) -> None:
    log = _current_log.get()
    if log is None:
        return
    log.results.append(result)
    if log.path is not None:
        entry = asdict(result)
        entry["stdout"] = entry["stdout"][-2000:]
        entry["stderr"] = result.stderr_tail(20)
        with open(log.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env["LANG"] = "C.UTF-8"
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    # e2fsprogs and friends live in sbin, which a non-login PATH may lack.
    for extra in ("/usr/sbin", "/sbin"):
        if extra not in env["PATH"].split(":"):
            env["PATH"] += ":" + extra
    return env


def which(name: str) -> str | None:
    return shutil.which(name, path=tool_env()["PATH"])


def require_tools(*names: str, reason: str, hint: str) -> None:
    """Fail before any work starts when a tool is missing."""
    missing = [n for n in names if which(n) is None]
    if missing:
        raise ToolMissing(f"could not find {', '.join(missing)}, needed to {reason} ({hint})")


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the kernel that started this tool dies (even
    # by SIGKILL), the kernel sends the tool SIGKILL, so no qemu or e2fsck outlives a run.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _argv(argv: Sequence[Arg]) -> tuple[str, ...]:
    return tuple(os.fspath(a) if not isinstance(a, int) else str(a) for a in argv)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


def _failure_message(result: CommandResult) -> str:
    name = Path(result.argv[0]).name
    if result.exit_code == 127:
        return f"{name}: command not found"
    if result.exit_code < 0:
        return f"{name} was killed by signal {-result.exit_code}"
    tail = result.stderr_tail(1) or _decode(result.stdout).strip().splitlines()[-1:] or [""]
    detail = tail if isinstance(tail, str) else tail[0]
    return f"{name} failed with exit code {result.exit_code}: {detail}".rstrip(": ")


# What a command may put on stdout before it is stopped: the largest real output we parse
# (qemu-img map of a fragmented image, debugfs listing a directory of 100 000 files) is a few
# MiB; a hostile image (a 1 TiB sparse file debugfs would cat) must not fill this process.
MAX_OUTPUT = 64 << 20
# stderr is kept as its last part only: what a failure message and the command log show.
STDERR_KEPT = 1 << 20


class _Collector:
    """Reads one pipe to its end on a thread: keeps at most ``cap`` bytes (the first ones, or
    with ``tail`` the last ones); ``over`` says when more came than were kept."""

    def __init__(self, fd: int, name: str, cap: int, *, tail: bool = False,
                 on_output: Callable[[str], Any] | None = None, on_over: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.cap, self.tail, self.over, self.size = cap, tail, False, 0
        self.chunks: list[bytes] = []
        self._kept = 0
        self._show, self._on_over = on_output, on_over
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.thread = threading.Thread(target=self._read, args=(fd,), name=name, daemon=True)
        self.thread.start()

    def _read(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as pipe:
            while block := pipe.read(65536):
                self.size += len(block)
                self._keep(block)
                if self._show is not None:
                    try:
                        self._show(self._decoder.decode(block))
                    except Exception:  # a broken progress display must not stall the tool's pipe
                        self._show = None

    def _keep(self, block: bytes) -> None:
        if self.tail:
            self.chunks.append(block)
            self._kept += len(block)
            while self._kept - len(self.chunks[0]) >= self.cap:
                self._kept -= len(self.chunks.pop(0))
            self.over = self.size > self._kept
            return
        if self.over:
            return  # drained, not kept, until the tool is gone
        if self._kept + len(block) > self.cap:
            self.over = True
            if self._on_over is not None:
                self._on_over()
            return
        self.chunks.append(block)
        self._kept += len(block)

    def text(self) -> str:
        data = b"".join(self.chunks)
        if self.tail and len(data) > self.cap:
            data = data[-self.cap :]
        return data.decode("utf-8", errors="replace")


def run(
    argv: Sequence[Arg],
    *,
    ok_codes: Sequence[int] = (0,),
    input: bytes | str | None = None,
    timeout: float | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    on_output: Callable[[str], Any] | None = None,
    record: bool = True,
    max_output: int = MAX_OUTPUT,
    pass_fds: Sequence[int] = (),
    setup: Callable[[], None] | None = None,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
) -> CommandResult:
    """Run a command to completion and return its result; raise CommandError unless its exit code
    is in ``ok_codes``. ``on_output`` receives stdout as it arrives (for progress). More than
    ``max_output`` bytes on stdout stop the command (its whole process group) with an error;
    stderr keeps its last MiB. ``setup`` runs in the child just before the command (joining a
    cgroup, say); ``pass_fds`` stay open in it.

    ``stdin_fd``/``stdout_fd``: file descriptors (a pipe's end, a file) the tool reads from or
    writes to directly, for tools that stream into each other; they become the tool's, and are
    closed here once it started (or failed to), so a pipe sees its end when the tool exits."""
    given = [fd for fd in (stdin_fd, stdout_fd) if fd is not None]
    try:
        return _run(argv, ok_codes, input, timeout, cwd, env, on_output, record, max_output, pass_fds, setup,
                    stdin_fd, stdout_fd, given)  # fmt: skip
    finally:
        for fd in given:
            with contextlib.suppress(OSError):
                os.close(fd)


def _run(argv: Sequence[Arg], ok_codes: Sequence[int], input: bytes | str | None, timeout: float | None,
         cwd: Path | None, env: dict[str, str] | None, on_output: Callable[[str], Any] | None, record: bool,
         max_output: int, pass_fds: Sequence[int], setup: Callable[[], None] | None,
         stdin_fd: int | None, stdout_fd: int | None, given: list[int]) -> CommandResult:  # fmt: skip
    args = _argv(argv)
    exe = which(args[0]) if "/" not in args[0] else args[0]
    if exe is None:
        raise ToolMissing(f"could not find {args[0]}")

    def prepare() -> None:
        _die_with_parent()
        if setup is not None:
            setup()

    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    # stdout goes to our pipe (collected, capped) unless the caller gave the tool a file or pipe.
    out_r, out_w = os.pipe() if stdout_fd is None else (os.open(os.devnull, os.O_RDONLY), stdout_fd)
    err_r, err_w = os.pipe()
    stdin: int = (
        stdin_fd if stdin_fd is not None else subprocess.PIPE if input is not None else subprocess.DEVNULL
    )
    try:
        proc = subprocess.Popen(
            [exe, *args[1:]], executable=exe, stdin=stdin, stdout=out_w, stderr=err_w, cwd=cwd,
            env={**tool_env(), **(env or {})}, start_new_session=True, preexec_fn=prepare, pass_fds=tuple(pass_fds),
        )  # fmt: skip
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        # The child holds its own copies: EOF on our ends when it (and its children) are gone.
        if stdout_fd is None:
            os.close(out_w)
        os.close(err_w)
        for fd in given:  # likewise: a pipe given to the tool sees its end when the tool exits
            with contextlib.suppress(OSError):
                os.close(fd)
        given.clear()
    stopped = threading.Event()  # by the timer or by too much output

    def stop() -> None:
        stopped.set()
        _kill_group(proc.pid)

    stdout = _Collector(out_r, f"{Path(args[0]).name} stdout", max_output, on_output=on_output, on_over=stop)
    stderr = _Collector(err_r, f"{Path(args[0]).name} stderr", STDERR_KEPT, tail=True)
    if input is not None:
        data = input.encode() if isinstance(input, str) else input
        threading.Thread(target=_feed, args=(proc, data), daemon=True).start()
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
    try:
        proc.wait()
    except BaseException:
        # Ctrl-C, SIGTERM or a kernel interrupt: the tool must not outlive us.
        _kill_group(proc.pid)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        # EOF once the tool is gone (unless a child of it keeps the pipe)
        stdout.thread.join(timeout=10)
        stderr.thread.join(timeout=10)
    name = Path(args[0]).name
    if stopped.is_set() and stdout.over:
        message = f"{name} wrote more than {max_output >> 20} MiB to its output: stopped"
    elif stopped.is_set():
        message = f"{name} timed out after {timeout:.0f} s"
    else:
        message = ""
    result = CommandResult(
        args, proc.returncode if not stopped.is_set() else -9, stdout.text(),
        (stderr.text() + ("\n" + message if message else "")).lstrip("\n"), started, time.monotonic() - t0,
    )  # fmt: skip
    if record:
        _record(result)
    if message:
        raise CommandError(message, result)
    if result.exit_code not in ok_codes:
        raise CommandError(_failure_message(result), result)
    return result


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(OSError):  # a tool that exits without reading all of it
        proc.stdin.write(data)
    with contextlib.suppress(OSError):
        proc.stdin.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Spawned:
    """A command running in the background (QEMU); record it with :meth:`finish`. Its output
    is kept as its last MiB on each stream: a guest may make QEMU print for as long as it runs."""

    def __init__(self, argv: tuple[str, ...], proc: subprocess.Popen[bytes], started: str,
                 out: tuple[int, int]) -> None:  # fmt: skip
        self.argv = argv
        self._proc = proc
        self._started = started
        self._t0 = time.monotonic()
        self._result: CommandResult | None = None
        name = Path(argv[0]).name
        self._stdout = _Collector(out[0], f"{name} stdout", STDERR_KEPT, tail=True)
        self._stderr = _Collector(out[1], f"{name} stderr", STDERR_KEPT, tail=True)

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _kill_group(self._proc.pid)
            self._proc.wait()

    def finish(self) -> CommandResult:
        # Once: a caller waits for the command inside the block, and the block's end finishes again.
        if self._result is not None:
            return self._result
        self._proc.wait()
        self._stdout.thread.join(timeout=10)
        self._stderr.thread.join(timeout=10)
        result = CommandResult(
            self.argv, self._proc.returncode, self._stdout.text(), self._stderr.text(), self._started,
            time.monotonic() - self._t0,
        )  # fmt: skip
        _record(result)
        self._result = result
        return result


@contextlib.contextmanager
def spawn(argv: Sequence[Arg]) -> Iterator[Spawned]:
    """Start a command in the background; it is stopped and recorded on every exit path."""
    args = _argv(argv)
    exe = which(args[0])
    if exe is None:
        raise ToolMissing(f"could not find {args[0]}")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen([exe, *args[1:]], executable=exe, stdin=subprocess.DEVNULL, stdout=out_w,
                                stderr=err_w, env=tool_env(), start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    handle = Spawned(args, proc, started, (out_r, err_r))
    try:
        yield handle
    finally:
        handle.stop()
        handle.finish()


def recorded() -> list[CommandResult]:
    log = _current_log.get()
    return list(log.results) if log else []


def check_output(argv: Sequence[Arg], **kwargs: Any) -> str:
    return run(argv, **kwargs).stdout


__all__ = [
    "CommandError",
    "CommandResult",
    "ImagingError",
    "check_output",
    "command_log",
    "require_tools",
    "run",
    "set_command_log",
    "spawn",
]
