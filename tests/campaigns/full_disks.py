"""The full-disks campaign (issue 29): the runs directory and ``--out`` on small filesystems that
run out in each stage in turn.

For each format, one run of ``imaging export sample:kvm`` is made to fail once in every stage:
as the stage starts (``state.json`` says it runs), a ballast file takes the free space of its
filesystem but about half of what that stage writes there (measured below on an uninterrupted
run). Each failure must be one line naming the directory and the space needed; the user's files
planted beside the run and the artifact must be as they were; nothing half-written may sit at a
final name; nothing of the run may be left mounted, attached or running. Then the ballast goes,
``imaging resume`` runs, and the next stage runs out. The last resume must complete with a booted,
verified artifact whose audit chain holds. Before the runs, both directories are refused up front
(no run made) when they are too small for the export from the start.

    python -m tests.campaigns.full_disks [--formats qcow2,ova,vmdk] [--stages 00-acquire,...]

Root, loop devices, one QEMU boot per format. Prints one line per case and a summary; exits 1
if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imaging import config
from imaging.samples import catalog
from tests.campaigns.smallfs import MiB, SmallFs, digests, plant, small_fs

STAGES = ("00-acquire", "10-clean", "20-migrate", "25-secrets", "30-bootable", "40-export", "50-verify")
FORMATS = ("qcow2", "ova", "vmdk")  # the formats that write the most
NAME = "full disk"  # a name with a space: its slug, not the name, is the artifact's file
RUNS_FS = 400 * MiB  # the sample needs ~110 MiB of runs directory at its peak
OUT_FS = 200 * MiB
# Each stage's peak writes into the runs directory for sample:kvm (MiB, measured on an
# uninterrupted run): how much is left free as it starts is half of it. 25-secrets writes only
# its records (its notebook, results, the chain), and so do 40-export with --out elsewhere and
# 50-verify but for an OVA's disk unpacked (15 MiB): what is left is less than one notebook.
WRITES = {"00-acquire": 42, "10-clean": 34, "20-migrate": 34, "30-bootable": 58, "50-verify ova": 15}
RECORDS_ONLY_LEFT = 0  # 16 KiB held 25-secrets' records
CASE_SECONDS = 900  # a bound for the machine's sake, not a figure: one export under contention


@dataclass
class Case:
    stage: str  # the stage that runs out, or "preflight"
    where: str  # "runs" or "out"
    fmt: str
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        verdict = "ok  " if self.ok else "FAIL"
        text = f"{verdict} {self.fmt:5} {self.where:4} {self.stage:11} {self.seconds:6.1f} s  {self.message}"
        return text + "".join(f"\n       - {p}" for p in self.problems)


def plan(stages: list[str]) -> list[tuple[str, str]]:
    """(stage, where) of one run's failures, in order: the runs directory in every stage, and
    ``--out`` in 40-export (the only stage that writes there) before the runs directory's turn."""
    cases = []
    for stage in stages:
        if stage == "40-export":
            cases.append((stage, "out"))
        cases.append((stage, "runs"))
    return cases


def leave(stage: str, where: str, fmt: str) -> int:
    if where == "out":
        return 4 * MiB  # every artifact of the sample takes more (ova 15 MiB, qcow2 26 MiB)
    writes = WRITES.get(f"{stage} {fmt}", WRITES.get(stage))
    return RECORDS_ONLY_LEFT if writes is None else int(writes * MiB / 2)


class Env:
    """The two small filesystems, the user's files on both, and the commands run on them."""

    def __init__(self, runs_fs: SmallFs, out_fs: SmallFs, fmt: str) -> None:
        self.runs_fs, self.out_fs, self.fmt = runs_fs, out_fs, fmt
        self.runs = runs_fs.mnt / "runs"
        self.out = out_fs.mnt / "out"
        slug = config.slug(NAME)
        self.artifact = self.out / f"{slug}.{fmt}"
        # An earlier export of the same name is the user's until this one completes.
        self.mine = {
            "runs": {"notes.txt": b"the operator's notes\n", "old-run/keep.bin": os.urandom(1 << 20)},
            "out": {"notes.txt": b"mine\n", f"{slug}.{fmt}": os.urandom(2 << 20), f"{slug}.{fmt}.sha256": b"x\n"},
        }  # fmt: skip
        self.planted = {
            "runs": plant(self.runs, self.mine["runs"]),
            "out": plant(self.out, self.mine["out"]),
        }

    def fs(self, where: str) -> SmallFs:
        return self.runs_fs if where == "runs" else self.out_fs

    def directory(self, where: str) -> Path:
        return self.runs if where == "runs" else self.out

    def imaging(
        self, *args: str, fill: tuple[str, str, int] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``python -m imaging ARGS`` on these directories; ``fill``: (stage, where, bytes left
        free) as that stage starts."""
        env = {**os.environ, "IMAGING_RUNS": str(self.runs), "IMAGING_PROGRESS": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "imaging", *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        watcher = None
        if fill is not None:
            watcher = threading.Thread(target=self._fill_at, args=(proc, *fill), daemon=True)
            watcher.start()
        try:
            out, err = proc.communicate(timeout=CASE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
            err += f"\n(campaign: killed after {CASE_SECONDS} s)"
        if watcher is not None:
            watcher.join()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def _fill_at(self, proc: subprocess.Popen[str], stage: str, where: str, free: int) -> None:
        state = self.runs / RUN / "state.json"
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(state.read_text())
                if (data.get("state"), data.get("stage")) == ("running", stage):
                    self.fs(where).fill(free)
                    return
            time.sleep(0.01)

    def mine_intact(self, where: str, *, artifact: bool = True) -> list[str]:
        """The user's files as planted; with ``artifact`` False, the artifact's name may hold
        the run's own artifact instead, whole (its .sha256 beside it says so)."""
        names = [n for n in self.mine[where] if artifact or not n.startswith(self.artifact.name)]
        now = digests(self.directory(where), names)
        problems = [f"{where}: the user's {n} changed" for n in names if now[n] != self.planted[where][n]]
        if not artifact and where == "out":
            (digest,) = digests(self.out, [self.artifact.name]).values()
            sums = self.artifact.with_name(self.artifact.name + ".sha256")
            if digest != self.planted["out"][self.artifact.name] and digest not in sums.read_text():
                problems.append(f"{self.artifact} is neither the user's nor the run's whole artifact")
        return problems


RUN = "full-disks"


def one_line_error(proc: subprocess.CompletedProcess[str], directory: Path) -> tuple[str, list[str]]:
    """The error's line, and what is wrong with it: more than one line, a traceback, no
    directory named, no space needed said."""
    problems = []
    lines = [x for x in proc.stderr.splitlines() if x.startswith("imaging: error: ")]
    if "Traceback" in proc.stderr:
        problems.append("a traceback on stderr: " + proc.stderr[proc.stderr.index("Traceback") :][-600:])
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines: {proc.stderr[-600:]!r}")
        return (lines[-1] if lines else ""), problems
    line = lines[0]
    if str(directory) not in line:
        problems.append(f"the error does not name {directory}")
    if not re.search(r"need(s)? about [\d.]+ [KMGT]?i?B", line):
        problems.append("the error does not say how much space is needed")
    return line, problems


def leftovers(env: Env, grace: float = 10.0) -> list[str]:
    """Partial files at the run's and the artifact's names, the run's mounts and processes,
    still there ``grace`` seconds after the command ended (a kernel shutting down may take a
    moment on a loaded machine; the crash campaign holds it to "a few seconds" too)."""
    deadline = time.monotonic() + grace
    while (found := _leftovers(env)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _leftovers(env: Env) -> list[str]:
    found = []
    run = env.runs / RUN
    for d in (run / "work", run / "notebooks", run / "out", env.out, run):
        if d.is_dir():
            found += [f"partial file {p}" for p in d.iterdir() if ".part" in p.name]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if str(run) in line or "imaging-mnt" in line and str(env.runs_fs.mnt) in line:
            found.append(f"mount: {line}")
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found += [f"process: {p.strip()}" for p in ps.splitlines() if str(run) in p and "ps -ww" not in p]
    return found


def preflight(env: Env, where: str) -> Case:
    """Too small from the start: refused before a run exists."""
    case = Case("preflight", where, env.fmt)
    t0 = time.monotonic()
    env.fs(where).fill(16 * MiB)
    try:
        proc = env.imaging("export", "sample:kvm", "--name", NAME, "--format", env.fmt, "--out", str(env.out),
                           "--run", RUN)  # fmt: skip
    finally:
        env.fs(where).empty()
    case.message, case.problems = one_line_error(proc, env.directory(where))
    if proc.returncode != 2:
        case.problems.append(f"exit {proc.returncode}, not 2")
    if (env.runs / RUN).exists():
        case.problems.append("a run directory was made")
    case.problems += env.mine_intact("runs") + env.mine_intact("out")
    case.seconds = time.monotonic() - t0
    case.ok = not case.problems
    return case


def failure(env: Env, stage: str, where: str, first: bool) -> Case:
    """One run (its first export, or a resume) run out of space in ``stage``."""
    case = Case(stage, where, env.fmt)
    t0 = time.monotonic()
    args = (
        ["export", "sample:kvm", "--name", NAME, "--format", env.fmt, "--out", str(env.out), "--run", RUN]
        if first
        else ["resume", RUN]
    )
    try:
        proc = env.imaging(*args, fill=(stage, where, leave(stage, where, env.fmt)))
        case.problems += leftovers(env)
    finally:
        env.fs(where).empty()
    case.seconds = time.monotonic() - t0
    case.message, case.problems[:0] = one_line_error(proc, env.directory(where))
    if proc.returncode != 1:
        case.problems.append(f"exit {proc.returncode}, not 1")
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((env.runs / RUN / "state.json").read_text())
        if (state["state"], state["stage"]) != ("error", stage):
            case.problems.append(
                f"state.json says {state['state']} in {state['stage']}, not error in {stage}"
            )
    # Once 40-export has put the artifact in place, a later failure leaves it there: complete.
    made = STAGES.index(stage) > STAGES.index("40-export") or (stage, where) == ("40-export", "runs")
    case.problems += env.mine_intact("runs") + env.mine_intact("out", artifact=not made)
    case.ok = not case.problems
    return case


def completion(env: Env) -> Case:
    """The last resume, with room: a verified artifact, the audit chain intact."""
    case = Case("resume", "all", env.fmt)
    t0 = time.monotonic()
    proc = env.imaging("resume", RUN)
    case.seconds = time.monotonic() - t0
    if proc.returncode != 0:
        case.problems.append(f"exit {proc.returncode}: {proc.stderr[-800:]}")
    else:
        result = json.loads(proc.stdout.splitlines()[-1])
        case.message = f"verified={result.get('verified')} boot={result.get('boot', {}).get('verdict')}"
        if not result.get("verified") or Path(result["path"]) != env.artifact:
            case.problems.append(f"not a verified artifact at {env.artifact}: {result}")
        sums = env.artifact.with_name(env.artifact.name + ".sha256").read_text()
        if result["sha256"] not in sums:
            case.problems.append(f"{env.artifact}.sha256 does not hold the artifact's sha256")
        audit = env.imaging("audit", RUN)
        if audit.returncode != 0:
            case.problems.append(f"imaging audit: {audit.stderr.strip()[-400:]}")
    case.problems += leftovers(env)
    case.problems += env.mine_intact("runs") + env.mine_intact("out", artifact=False)
    case.ok = not case.problems
    return case


def campaign(fmt: str, cases: list[tuple[str, str]], *, up_front: bool = True) -> Iterator[Case]:
    """One format's cases ((stage, where), in the order of the stages), each yielded as it ends."""
    with small_fs(RUNS_FS) as runs_fs, small_fs(OUT_FS) as out_fs:
        env = Env(runs_fs, out_fs, fmt)
        if up_front:
            yield preflight(env, "runs")
            yield preflight(env, "out")
        for n, (stage, where) in enumerate(cases):
            case = failure(env, stage, where, first=n == 0)
            yield case
            if not case.ok and (env.runs / RUN / "state.json").exists() is False:
                return  # no run to resume: the rest would say nothing more
        yield completion(env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--stages", default=",".join(STAGES))
    args = p.parse_args(argv)
    catalog.ensure_sample("kvm")
    t0 = time.monotonic()
    cases: list[Case] = []
    for fmt in args.formats.split(","):
        for case in campaign(fmt, plan(args.stages.split(","))):
            print(case, flush=True)
            cases.append(case)
    failed = [c for c in cases if not c.ok]
    print(f"full disks: {len(cases)} cases, {len(cases) - len(failed)} survived, {len(failed)} failed, "
          f"{time.monotonic() - t0:.0f} s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
