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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sh

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
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
) -> CommandResult:
    """Run a command to completion and return its result; raise CommandError unless its exit code
    is in ``ok_codes``. ``on_output`` receives stdout as it arrives (for progress).

    ``stdin_fd``/``stdout_fd``: file descriptors (a pipe's end, a file) the tool reads from or
    writes to directly, for tools that stream into each other; they become the tool's, and are
    closed here once it started (or failed to), so a pipe sees its end when the tool exits."""
    given = [fd for fd in (stdin_fd, stdout_fd) if fd is not None]
    try:
        return _run(argv, ok_codes, input, timeout, cwd, env, on_output, record, stdin_fd, stdout_fd, given)
    finally:
        for fd in given:
            with contextlib.suppress(OSError):
                os.close(fd)


def _run(argv: Sequence[Arg], ok_codes: Sequence[int], input: bytes | str | None, timeout: float | None,
         cwd: Path | None, env: dict[str, str] | None, on_output: Callable[[str], Any] | None, record: bool,
         stdin_fd: int | None, stdout_fd: int | None, given: list[int]) -> CommandResult:  # fmt: skip
    args = _argv(argv)
    exe = which(args[0]) if "/" not in args[0] else args[0]
    if exe is None:
        raise ToolMissing(f"could not find {args[0]}")
    kwargs: dict[str, Any] = dict(
        _return_cmd=True,
        _bg=True,
        _tty_out=False,
        _truncate_exc=False,
        _ok_code=list(range(-64, 256)),
        _env={**tool_env(), **(env or {})},
        _new_session=True,
        _preexec_fn=_die_with_parent,
        _decode_errors="replace",
    )
    if input is not None:
        kwargs["_in"] = input
    if stdin_fd is not None:
        kwargs["_in"] = stdin_fd
    if stdout_fd is not None:
        kwargs["_out"] = stdout_fd
    if cwd is not None:
        kwargs["_cwd"] = os.fspath(cwd)
    reading: threading.Thread | None = None
    if on_output is not None:
        # Our own pipe and reader, not sh's _out callback: sh's output thread polls in 0.1 s
        # steps, which a one-second qemu-img conversion would pay as 10 % (measured).
        chunks: list[str] = []
        read_end, write_end = os.pipe()

        def _read() -> None:
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            show: Callable[[str], Any] | None = on_output
            with open(read_end, "rb", buffering=0) as pipe:
                while block := pipe.read(65536):
                    text = decoder.decode(block)
                    chunks.append(text)
                    try:
                        if show is not None:
                            show(text)
                    except Exception:  # a broken progress display must not stall the tool's pipe
                        show = None

        reading = threading.Thread(target=_read, name=f"{Path(args[0]).name} output", daemon=True)
        reading.start()
        kwargs["_out"] = open(write_end, "wb", buffering=0)  # noqa: SIM115 (closed once started)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    try:
        proc = sh.Command(exe)(*args[1:], **kwargs)
    finally:
        if reading is not None:
            kwargs["_out"].close()  # the child holds its own copy: EOF when it exits
        for fd in given:  # likewise
            with contextlib.suppress(OSError):
                os.close(fd)
        given.clear()
    # Our own timer, not sh's _timeout: sh polls that in 0.1 s steps, which every command pays.
    timed_out = threading.Event()
    timer = None
    if timeout is not None:

        def expire() -> None:
            timed_out.set()
            _signal_group(proc, signal.SIGKILL)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
    try:
        proc.wait()
    except BaseException:
        # Ctrl-C, SIGTERM or a kernel interrupt: the tool must not outlive us.
        _kill(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if reading is not None:
            reading.join(timeout=10)  # EOF once the tool is gone (unless a child of it keeps the pipe)
    if timed_out.is_set():
        result = CommandResult(
            args, -9, "", f"timed out after {timeout:.0f} s", started, time.monotonic() - t0
        )
        if record:
            _record(result)
        raise CommandError(f"{Path(args[0]).name} timed out after {timeout:.0f} s", result)
    stdout = "".join(chunks) if on_output is not None else _decode(proc.stdout)
    result = CommandResult(
        args, proc.exit_code, stdout, _decode(proc.stderr), started, time.monotonic() - t0
    )
    if record:
        _record(result)
    if result.exit_code not in ok_codes:
        raise CommandError(_failure_message(result), result)
    return result


def _signal_group(proc: Any, sig: int) -> None:
    with contextlib.suppress(Exception):
        proc.signal_group(sig)


def _kill(proc: Any) -> None:
    with contextlib.suppress(Exception):
        proc.kill_group()
    with contextlib.suppress(Exception):
        proc.wait()


class Spawned:
    """A command running in the background (QEMU); record it with :meth:`finish`."""

    def __init__(self, argv: tuple[str, ...], proc: Any, started: str) -> None:
        self.argv = argv
        self._proc = proc
        self._started = started
        self._t0 = time.monotonic()

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    def alive(self) -> bool:
        return bool(self._proc.is_alive())

    def stop(self, grace: float = 3.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(Exception):
            self._proc.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            _kill(self._proc)

    def finish(self) -> CommandResult:
        with contextlib.suppress(Exception):
            self._proc.wait()
        result = CommandResult(
            self.argv,
            int(self._proc.exit_code if self._proc.exit_code is not None else -9),
            _decode(self._proc.stdout),
            _decode(self._proc.stderr),
            self._started,
            time.monotonic() - self._t0,
        )
        _record(result)
        return result


@contextlib.contextmanager
def spawn(argv: Sequence[Arg]) -> Iterator[Spawned]:
    """Start a command in the background; it is stopped and recorded on every exit path."""
    args = _argv(argv)
    exe = which(args[0])
    if exe is None:
        raise ToolMissing(f"could not find {args[0]}")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    proc = sh.Command(exe)(
        *args[1:],
        _bg=True,
        _bg_exc=False,
        _return_cmd=True,
        _tty_out=False,
        _ok_code=list(range(-64, 256)),
        _env=tool_env(),
        _new_session=True,
        _preexec_fn=_die_with_parent,
        _decode_errors="replace",
    )
    handle = Spawned(args, proc, started)
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
