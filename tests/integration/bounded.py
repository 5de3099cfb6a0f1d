"""One CLI run bounded and measured: its whole process tree in a control group of its own (a
memory and a process limit), a wall-clock limit, its tree's resident memory sampled all along,
and whatever of the tree outlives the CLI named. Shared by the hostile-image corpus
(test_hostile.py) and the campaigns (tests/campaigns/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
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


def measured_cli(args: list[str], env: dict[str, str], timeout: float) -> Measured:
    """``python -m imaging ARGS`` in a control group of its own (bounded), its process tree's
    memory sampled all along."""
    box = limits.Box(limits.Limits(TREE_MEMORY, 4096, timeout))
    with box:
        t0 = time.monotonic()
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
                        tuple(outlived))  # fmt: skip
