"""Stage kernels forked from one warm process of the run, not each started from nothing.

Why: a stage kernel started the ordinary way is a new Python that imports ipykernel, IPython,
zmq, tornado, debugpy and the stage's modules, about 0.5 s of CPU before its first cell and
about 1 s over its life here; seven of them were two thirds of an unbooted export's CPU. Forked
from a process that imported all of that once (the *zygote*), a kernel costs about 0.1 s: an
unbooted export of the sample took 9.6-10.5 s of CPU, and 6.9-7.5 s with its kernels forked
(2 cores, under another load: rough figures).

One zygote per :class:`~imaging.run.pipeline.Runner`, started with its first kernel, with
exactly the environment that kernel gets (the run's MARK, as ``/proc/PID/environ`` shows it to
``lineage.end``: a forked child shows its zygote's). For each kernel it forks a child that
becomes ``python -m ipykernel_launcher <args>``: the kernelspec's own arguments, in a session of
its own, in the kernel's directory. What keeps lineage.py's guarantees:

- The zygote imports and nothing else: no thread, no ZeroMQ context, no event loop exists in it
  when it forks (checked before the first fork), as none exists in a new Python.
- The zygote goes when the run's process goes: the socket it is asked on reaches its end when
  that process ends however it ends, it watches that process's pidfd, and it gets the kernels'
  parent-death signal where they would.
- A forked kernel gets SIGTERM (its clean-up path) when the zygote goes (PR_SET_PDEATHSIG, and
  the zygote is single-threaded) and watches the zygote as its parent (``stage.guard``, through
  OWNER): the run's process dies, then the zygote, then the kernel cleans up.
- The run's process holds each kernel by a pidfd the zygote sends it, taken while the kernel
  was the zygote's unreaped child: no signal of ours reaches a pid that was reused.

A request's environment that is not the zygote's (another run's, a variable changed since) gets
an ordinary kernel, as does any failure of the zygote; ``IMAGING_KERNEL_FORK=0`` asks for
ordinary kernels only.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from imaging.errors import ImagingError
from imaging.run import lineage

# The kernelspec's command: the interpreter and its options, then this module.
_LAUNCHER = ["-m", "ipykernel_launcher"]
# A zygote that does not answer this soon is given up: the kernel starts the ordinary way.
_ANSWER = 60.0
_MESSAGE = 1 << 16


class Forked:
    """A kernel forked by the zygote, held by its pidfd: what jupyter_client asks of a Popen.

    Its exit status is the zygote's to collect: ``returncode`` is 0 once it has exited.
    """

    stdin = stdout = stderr = None

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.returncode: int | None = None

    def _ended(self, timeout: float | None) -> bool:
        if self.returncode is None and select.select([self._pidfd], [], [], timeout)[0]:
            self.returncode = 0
            os.close(self._pidfd)
        return self.returncode is not None

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(f"kernel {self.pid}", timeout or 0)
        return 0

    def send_signal(self, signum: int) -> None:
        if not self._ended(0):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def signal_group(self, signum: int) -> None:
        # Its session and group carry its pid while it lives (it leads them): not a reused one.
        if not self._ended(0):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)


def signal_group(process: Any, signum: int) -> None:
    """``signum`` to a kernel's process group (its tools with it): an ordinary kernel's or a
    forked one's."""
    if isinstance(process, Forked):
        process.signal_group(signum)
    elif process.poll() is None:  # our child, unreaped: its pid is still its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)


class Zygote:
    """The run's zygote (started at the first :meth:`fork`), asked over a socket pair."""

    def __init__(self, imports: Callable[[], str]) -> None:
        """``imports``: the import statements to run before forking, read when it starts."""
        self.imports = imports
        self.process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._made: tuple[list[str], dict[str, str], str] | None = None
        self._broken = os.environ.get("IMAGING_KERNEL_FORK", "1") == "0"
        self._asking = threading.Lock()  # one request and its answer at a time on the socket

    def provisioner(self, km: Any) -> Any:
        """A provisioner for ``km`` (a KernelManager not yet started) that forks its kernel."""
        import uuid

        from jupyter_client.provisioning import LocalProvisioner

        zygote = self

        class ForkProvisioner(LocalProvisioner):
            async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
                forked = zygote.fork(cmd, **kwargs)
                if forked is None:
                    return await super().launch_kernel(cmd, **kwargs)
                self.process = forked  # type: ignore[assignment]  # what it asks of a Popen
                self.pid = self.pgid = forked.pid
                self.cwd = kwargs.get("cwd")
                return self.connection_info

            async def send_signal(self, signum: int) -> None:
                if isinstance(self.process, Forked):
                    self.process.signal_group(signum)
                else:
                    await super().send_signal(signum)

        km.kernel_id = km.kernel_id or str(uuid.uuid4())
        return ForkProvisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km)

    def fork(
        self, cmd: list[str], *, env: dict[str, str], cwd: str, preexec_fn: Callable[[], None] | None = None,
        **_: Any,
    ) -> Forked | None:  # fmt: skip
        """The kernel ``cmd`` describes, forked; None where it must start the ordinary way."""
        at = cmd.index("-m") if "-m" in cmd else -1
        if self._broken or cmd[at : at + 2] != _LAUNCHER:
            return None
        interpreter, argv = cmd[:at], cmd[at + 2 :]
        if self._made is None:
            self._start(interpreter, env, cwd, preexec_fn)
        if self._made != (interpreter, env, cwd) or self._sock is None:
            return None
        try:
            with self._asking:
                self._sock.send(json.dumps({"argv": argv}).encode())
                data, fds, _flags, _address = socket.recv_fds(self._sock, _MESSAGE, 1)
        except OSError:  # gone, or not answering
            data, fds = b"", []
        if not data or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self._break()
            return None
        return Forked(int(data), fds[0])

    def _start(
        self, interpreter: list[str], env: dict[str, str], cwd: str, preexec_fn: Callable[[], None] | None
    ) -> None:
        self._made = (interpreter, dict(env), cwd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A session of its own, as a kernel: the terminal's Ctrl-C is the run's to handle.
            self.process = subprocess.Popen(
                [*interpreter, "-m", "imaging.run.zygote", str(theirs.fileno()), str(os.getpid()), self.imports()],
                stdin=subprocess.DEVNULL, env=env, cwd=cwd, pass_fds=[theirs.fileno()], start_new_session=True,
                preexec_fn=preexec_fn,
            )  # fmt: skip
        except (OSError, ImagingError):
            ours.close()
            self._broken = True
            return
        finally:
            theirs.close()
        ours.settimeout(_ANSWER)
        self._sock = ours

    def _break(self) -> None:
        self._broken = True
        self.stop()

    def stop(self) -> None:
        """The zygote gone (its kernels are the run's to stop before); the next :meth:`fork`
        starts another."""
        if self._sock is not None:
            self._sock.close()  # its end of the socket ends: it exits
            self._sock = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._made = None


# -- the zygote's side ------------------------------------------------------------------------


def _warm(imports: str) -> None:
    """What every kernel imports, imported once. A statement that fails is left to the kernel
    that runs it, which reports it where the stage's other errors go."""
    import ipykernel.debugger  # noqa: F401
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.kernelapp  # noqa: F401
    import IPython  # noqa: F401

    for statement in imports.split("; "):
        with contextlib.suppress(Exception):
            exec(statement, {})
    import gc

    import zmq

    if threading.active_count() != 1 or getattr(zmq.Context, "_instance", None) is not None:
        sys.exit(f"imaging zygote: an import started a thread or a ZeroMQ context: {threading.enumerate()}")
    gc.collect()
    gc.freeze()  # what the children share stays shared: the collector does not write to it


def _serve(sock: socket.socket, owner: int) -> list[str] | None:
    """Fork a kernel per request until the run's process is gone. Returns in a child only,
    with the kernel's arguments."""
    try:
        watched = os.pidfd_open(owner)
    except ProcessLookupError:
        return None
    tie = lineage.die_with_parent(signal.SIGTERM)
    while True:
        ready = select.select([sock.fileno(), watched], [], [], 1.0)[0]
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # our kernels that ended
                pass
        if watched in ready:
            return None
        if not ready:
            continue
        request = sock.recv(_MESSAGE)
        if not request:  # the run's process let go of us, or is gone
            return None
        argv = [str(a) for a in json.loads(request)["argv"]]
        started, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(started)
            os.setsid()
            tie()  # SIGTERM when the zygote goes; gone already if it went
            sock.close()
            os.close(watched)
            os.close(ready_w)  # the zygote sees it in its session, tied
            os.environ[lineage.OWNER] = str(os.getppid())  # whom it watches (stage.guard)
            return argv
        os.close(ready_w)
        os.read(started, 1)
        os.close(started)
        try:
            pidfd = os.pidfd_open(pid)  # our unreaped child: its pid is its own
        except ProcessLookupError:
            sock.send(b"")
            continue
        socket.send_fds(sock, [str(pid).encode()], [pidfd])
        os.close(pidfd)


def main(args: list[str]) -> int:
    fd, owner, imports = args
    _warm(imports)
    argv = _serve(socket.socket(fileno=int(fd)), int(owner))
    if argv is None:
        # Nothing to flush or close: the interpreter's teardown of all it imported would only
        # cost the run CPU (about 0.2 s here).
        os._exit(0)
    # The kernel: what ``python -m ipykernel_launcher ARGV`` runs, in this process.
    import runpy

    sys.argv = ["ipykernel_launcher", *argv]
    runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
