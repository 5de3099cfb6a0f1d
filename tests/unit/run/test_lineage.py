"""A run killed outright (SIGKILL of its process group) leaves no process behind: not its stage
kernels (each in a session of its own, which the kill does not reach), not their tools, and not
a tool's own child in a session of its own, which the next start of the run ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imaging import config
from imaging.run import lineage

# A run's process as far as its kernels go: the Runner (which marks what the run starts) and
# the next stage's kernel started ahead, as Runner.step starts it: forked by the run's zygote
# (zygote.py), or (argv[3] "plain") started on its own. "working": the kernel has
# begun its stage and runs a tool, and beside it a process in a session of its own that only
# the next start of the run ends.
RUN = """
import sys, time
from imaging.run import pipeline
from imaging.run.request import Request
ws, request = pipeline.open_run("killed", Request.create(source="/x.img", name="killed"))
runner = pipeline.Runner(ws, request)
kernel = pipeline.Kernel(ws, "20-migrate", [], runner._zygote if sys.argv[3] == "forked" else None)
if sys.argv[1] == "working":
    from jupyter_client.blocking import BlockingKernelClient
    client = BlockingKernelClient()
    client.load_connection_info(kernel.km.get_connection_info())
    client.start_channels()
    client.wait_for_ready(timeout=120)
    reply = client.execute_interactive(sys.argv[2], timeout=60)
    assert reply["content"]["status"] == "ok", reply["content"]
print("ready", flush=True)
time.sleep(600)
"""
WORK = """
import contextlib, subprocess
import imaging.run.stage as stage
from imaging import tools
ws = stage.open("20-migrate", {run!r})
running = contextlib.ExitStack()  # kept: a collected spawn() stops its tool
running.enter_context(tools.spawn(["sleep", "600"]))
stray = subprocess.Popen(["sleep", "601"], start_new_session=True)
"""


def run_processes(runs: Path) -> list[str]:
    """Processes, other than this test's own, started under this test's runs directory (their
    environment says so: IMAGING_RUNS is inherited by everything a run starts)."""
    mark = f"IMAGING_RUNS={runs}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and lineage.alive(int(proc.name)):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name} {command}")
        except OSError:
            continue
    return found


def wait_until_gone(runs: Path, seconds: float, but: str = "\0") -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in run_processes(runs) if but not in p]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("how", ["forked", "plain"])
@pytest.mark.parametrize("moment", ["starting", "working"])
def test_nothing_of_a_killed_run_outlives_it(moment: str, how: str) -> None:
    runs = config.runs_dir()
    run = runs / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, moment, WORK.format(run=str(run)), how],
        stdout=subprocess.PIPE, text=True, cwd=config.PROJECT, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        said = proc.stdout.readline()
        assert said.strip() == "ready", said
        # "starting": right after the kernel's fork, before it could look at its parent.
        before = run_processes(runs)
        # A forked kernel shows its zygote's command line: the zygote and the kernel.
        seen = "imaging.run.zygote" if how == "forked" else "ipykernel_launcher"
        assert len([p for p in before if seen in p]) == (2 if how == "forked" else 1), before
        if moment == "working":
            assert any("sleep 600" in p for p in before) and any("sleep 601" in p for p in before), before
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The kernel and its tool go with the run's process; the stray in its own session stays...
    assert wait_until_gone(runs, 10, but="sleep 601") == []
    # ...until the next start of the run ends what is marked as the run's.
    ended = lineage.end(run.resolve(), grace=5)
    assert len(ended) == (1 if moment == "working" else 0), ended
    assert wait_until_gone(runs, 2) == []


def orphan(env: dict[str, str]) -> int:
    """A process whose parent is gone, as a killed run's tool's child in a session of its own."""
    out = subprocess.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout)


def test_the_next_start_ends_what_the_run_left_and_nothing_else(tmp_path: Path) -> None:
    run = tmp_path / "run"
    marked = {**os.environ, lineage.MARK: str(run)}
    left = orphan(marked)
    another_runs = orphan({**marked, lineage.MARK: str(tmp_path / "other")})
    own = subprocess.Popen(["sleep", "600"], env=marked)  # this process's, its own to stop
    try:
        assert lineage.leftovers(run) == [left]
        assert lineage.end(run, grace=5) == [f"{left} sleep 600"]
        assert not lineage.alive(left)
        assert lineage.alive(another_runs) and own.poll() is None
    finally:
        for pid in (left, another_runs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        own.kill()
        own.wait()
