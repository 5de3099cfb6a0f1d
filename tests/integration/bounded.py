"""One CLI run bounded and measured: its whole process tree in a control group of its own (a
memory and a process limit), a wall-clock limit, its tree's resident memory sampled all along,
and whatever of the tree outlives the CLI named. Shared by the hostile-image corpus
(test_hostile.py) and the campaigns (tests/campaigns/)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from imaging import config
from imaging.guest import limits

# The whole process tree of one export, page cache included, may hold this much: a tree that
# needs more is stopped by the kernel and the case fails.
TREE_MEMORY = 1536 << 20
# What the tree's processes may hold at once (the sum of their resident sets, sampled).
TREE_RSS = 1024 << 20
CASE_SECONDS = 240  # no case may take longer (the slowest, the full export with a boot, ~1 min)


@dataclass
class Measured:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # the most the tree's processes held at once (sum of resident sets, sampled)
    peak_group: int | None  # the control group's own peak, page cache included
    group: str
    timed_out: bool = False
    # Processes of the tree still alive once the CLI had ended (then killed with the group).
    outlived: tuple[str, ...] = ()
    # The name of its control groups: a sandbox group the run made is made under them.
    box: str = ""


def parameters(
    root: Path, sandbox: dict[str, Any] | None = None, stage_time: dict[str, Any] | None = None
) -> Path:
    """A copy of parameters/ under ``root`` whose defaults.yaml sets these limits."""
    target = root / "parameters"
    shutil.copytree(config.PROJECT / "parameters", target)
    defaults = yaml.safe_load((target / "defaults.yaml").read_text())
    if sandbox:
        defaults["sandbox"] = sandbox
    if stage_time:
        defaults["stage_time"] = {**defaults["stage_time"], **stage_time}
    (target / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    return target


def _members(box: limits.Box) -> list[str]:
    """The processes still in the box's groups, as 'pid command line'."""
    found = []
    for group in box.groups:
        try:
            pids = (group / "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                found.append(f"{pid} {' '.join(psutil.Process(int(pid)).cmdline())[:200]}")
            except psutil.Error:
                pass
    return sorted(set(found))


# -- the CLI forked from a warm process ------------------------------------------------------


def warm_cli() -> None:
    """Import what ``imaging export`` imports and compile its page templates, once, in this
    process: each :func:`measured_cli` with ``warm=True`` then forks it rather than start a
    Python that does it all again (about 0.8 s of a fuzzed case's 4.4 s of CPU). Everything the
    run itself starts (its zygote, its kernels, its tools) starts as it always does."""
    import imaging.cli  # noqa: F401
    import imaging.run.pipeline  # noqa: F401
    import imaging.run.report  # noqa: F401
    from imaging.run import pages

    pages.warm()
    gc.collect()
    gc.freeze()  # what the forked cases share stays shared


class _Forked:
    """A forked ``imaging`` CLI, as much of a Popen as :func:`measured_cli` uses; its output in
    unlinked files (no pipe to drain while it runs)."""

    def __init__(self, args: list[str], env: dict[str, str], join: Any) -> None:
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # not written twice, by the child too
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            self._child(args, env, join)
        self._pidfd = os.pidfd_open(self.pid)

    def _child(self, args: list[str], env: dict[str, str], join: Any) -> None:
        code = 1
        try:
            join()
            os.dup2(self._out.fileno(), 1)
            os.dup2(self._err.fileno(), 2)
            # Streams on those descriptors, as a new Python has (this process's may be a test
            # runner's capture): stdout buffered, stderr by line.
            sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
            sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                                               closefd=False)  # fmt: skip
            os.environ.clear()
            os.environ.update(env)
            tempfile.tempdir = None  # the case's TMPDIR, not the one this process had found
            # The case's IMAGING_PARAMETERS, not what this process (a test's) read and cached.
            for value in vars(config).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
            atexit._clear()  # the campaign's exit handlers are not the CLI's
            from imaging import cli

            # What ``python -m imaging`` does (imaging/__main__.py): main, then exit_now, which
            # ends this process (os._exit) unless a thread of the run is still at work.
            cli.exit_now(cli.main(args))
        except SystemExit as e:  # as the interpreter takes it: None is 0, a message is 1
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
        # The ordinary exit: the run's threads that are not daemons, then the exit handlers.
        for t in threading.enumerate():
            if t is not threading.current_thread() and not t.daemon:
                t.join()
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            os.close(self._pidfd)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            os.close(self._pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        if self.returncode is None and not select.select([self._pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired("imaging", timeout)
        self.wait()
        return self.output()

    def output(self) -> tuple[str, str]:
        read = []
        for f in (self._out, self._err):
            f.seek(0)
            read.append(f.read().decode(errors="replace"))
            f.close()
        return read[0], read[1]


def measured_cli(args: list[str], env: dict[str, str], timeout: float, warm: bool = False) -> Measured:
    """``python -m imaging ARGS`` in a control group of its own (bounded), its process tree's
    memory sampled all along. ``warm``: forked from this process, which :func:`warm_cli` made
    ready (where it has no other thread to fork with; else a new Python, as without it)."""
    box = limits.Box(limits.Limits(TREE_MEMORY, 4096, timeout))
    with box:
        t0 = time.monotonic()
        proc: Any
        if warm and threading.active_count() == 1:
            proc = _Forked(args, env, box.join)
        else:
            proc = subprocess.Popen([sys.executable, "-m", "imaging", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, preexec_fn=box.join)  # fmt: skip
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            top = psutil.Process(proc.pid)
            while not done.is_set():
                total = 0
                try:
                    for p in [top, *top.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                peak[0] = max(peak[0], total)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        finally:
            done.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sampler.join()
        seconds = time.monotonic() - t0
        outlived: list[str] = []
        if box.groups and not timed_out:
            # A kernel shut down without waiting may take a moment to go; more than a few seconds
            # is a process that outlives its run.
            for _ in range(30):
                outlived = _members(box)
                if not outlived:
                    break
                time.sleep(0.1)
        return Measured(proc.returncode, out, err, seconds, peak[0], box.peak_memory(), box.kind, timed_out,
                        tuple(outlived), box.name if box.groups else "")  # fmt: skip
