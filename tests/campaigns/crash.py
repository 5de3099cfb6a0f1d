"""Crash consistency (issue 29): exports of sample:kvm killed with SIGKILL at random moments, then
resumed; the service's worker and API killed at random moments while requests run.

    python -m tests.campaigns.crash --runs 200 --seed 1 [--jobs 2] [--kills 1] [--service 6] [--boot-share 1] [--min-kills 0]

Each CLI case exports sample:kvm into a directory of its own, SIGKILLs it (the CLI's whole
process group, ``kill -9 -PGID``, or in a share of cases only its own pid) at a moment drawn
uniformly over an uninterrupted run's duration (measured first, two runs at a time), then
resumes it (``--kills K``: the resume is killed again, K kills in all, each uniform over what is
left of the run, before the last resume runs to its end). Checked:

- a few seconds after each kill, before any resume: no process of the run alive (its
  IMAGING_RUN_DIR in its environment, its cwd or an argument in the run), nothing mounted from
  the run, no loop device on its files;
- the resume completes (booted, in a run that boots) with the reference run's artifact
  (:func:`fingerprint`: an ext4 records when it was mounted, written and checked, and every
  edited inode its change time, so two runs of the same input differ in those bytes; all else
  must be equal);
- ``imaging audit`` verifies the chain; the chain holds every notebook, render and record file
  the run kept, and a ``killed`` entry (and ``state.json`` a ``killed`` transition) for a kill
  that hit a stage;
- after the resume nothing of the run left anywhere (``leftovers``), no file beside the run.

What boots: ``--boot-share F`` of the CLI runs (spread evenly over the cases; default all) run
the whole export, its boot check (50-verify, a QEMU boot under TCG, most of a run's time)
included; the others run every stage but the boot (the ``export-unbooted`` pipeline of a
parameters copy, ``IMAGING_PARAMETERS``), their kills drawn over their own reference run's
duration, their result's ``verified`` null. Kills inside a boot are the booted runs' to make;
every other stage is hit in both. Both references must have the same artifact. The service's
requests boot only at a share of 1 (see crash_service.py).

``--min-kills N``: more runs after ``--runs`` until N kills have hit a run (a run that ends
before its next kill moment is not killed again).

Exits 1 if any case failed, or (at 100 kills or more) if a stage of the runs made was never hit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imaging import config
from tests.integration.conftest import leftovers
from tests.integration.servicekit import unbooted_parameters

STAGES = config.pipeline_stages("export")
UNBOOTED = "export-unbooted"  # the pipeline of a run that does not boot: STAGES less 50-verify
NAME = "crash"
# A kill's aftermath: the stage kernels get SIGTERM from the kernel (PDEATHSIG) or see their
# parent gone, and clean up (a tool stopped, a mount released) before they exit.
SETTLE = 10.0
# Share of kills that hit only the CLI's own pid (its kernels and tools then outlive it unless
# lineage.py's measures end them).
PID_ONLY = 0.25


class Invocation:
    """``python -m imaging ARGS`` in a session of its own (its pgid its pid), stderr read by a
    thread that stamps every line with the seconds since the start."""

    def __init__(self, runs: Path, log: IO[str], *args: str, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "IMAGING_RUNS": str(runs), "IMAGING_PROGRESS": "0", **(env or {})}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "imaging", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=config.PROJECT, start_new_session=True)  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.out = ""
        self.log = log
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]  # fmt: skip
        for reader in self._readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
            self.log.write(line)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.out = self.proc.stdout.read()

    def wait_line(self, text: str, timeout: float = 300) -> float:
        """Seconds from the start until a stderr line holding ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if text in line:
                    return at
            if self.proc.poll() is not None and not self._readers[0].is_alive():
                raise AssertionError(f"exited ({self.proc.returncode}) before {text!r}")
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {text!r}")

    def kill(self, group: bool) -> bool:
        """SIGKILL (``kill -9 -PGID`` or its pid alone); False if it had already exited."""
        if self.proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return True

    def finish(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=30)
        return code

    def result(self) -> dict[str, Any]:
        lines = self.out.strip().splitlines()
        return dict(json.loads(lines[-1])) if lines else {}


def export_args(run: str, boot: bool = True) -> tuple[str, ...]:
    # BIOS only: one boot in 50-verify rather than one under each firmware. The stages are all
    # there to be killed in, at half the run's cost (the boot is most of it).
    kind = () if boot else ("--kind", UNBOOTED)
    return ("export", "sample:kvm", "--name", NAME, "--format", "qcow2", "--firmware", "bios", "--run", run,
            *kind)  # fmt: skip


def wait_for(what: str, check: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --- what of the artifact must be equal ------------------------------------------------------


def _sha(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _tree(root: Path) -> str:
    """Every entry's name, type, mode, owner, size, content and extended attributes: what a
    guest sees of its files, times left out (see :func:`fingerprint`)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*sorted(dirnames), *sorted(filenames)]:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = path.relative_to(root)
            attrs = sorted((a, os.getxattr(path, a, follow_symlinks=False))
                           for a in os.listxattr(path, follow_symlinks=False))  # fmt: skip
            what = f"{rel}|{st.st_mode:o}|{st.st_uid}:{st.st_gid}|{st.st_rdev}|{attrs}"
            if stat.S_ISLNK(st.st_mode):
                what += f"|-> {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                what += f"|{st.st_size}|{_sha(path, 0, st.st_size)}"
            h.update(what.encode(errors="surrogateescape") + b"\n")
    return h.hexdigest()


def fingerprint(artifact: Path, scratch: Path) -> dict[str, str]:
    """What two exports of one input must share, byte for byte: the disk outside its root
    filesystem (the MBR, or protective MBR, GPT, BIOS boot and EFI system partitions and the
    backup GPT), and
    the root filesystem's files (mounted read-only, without replaying its journal). Not its
    metadata blocks: ext4 keeps the last mount's time and directory, the last write and the last
    check in each superblock copy, and the kernel stamps every inode that clean and migrate edit
    in the mounted guest with the time of the edit; making those equal would mean rewriting the
    filesystem's times after the fact, and erase when the image was cleaned."""
    raw = scratch / "artifact.raw"
    mnt = scratch / "mnt"
    subprocess.run(["qemu-img", "convert", "-O", "raw", artifact, raw], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", raw], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]  # fmt: skip
    # GPT names it; an MBR disk (BIOS only) has the root filesystem as its one Linux partition.
    root = next(p for p in table["partitions"] if p.get("name") == "root" or p.get("type") == "83")
    start, end = root["start"] * 512, (root["start"] + root["size"]) * 512
    size = raw.stat().st_size
    found = {"outside": _sha(raw, 0, start) + _sha(raw, end, size), "size": str(size)}
    mnt.mkdir()
    subprocess.run(["mount", "-o", f"ro,noload,loop,offset={start},sizelimit={end - start}", raw, mnt],
                   check=True)  # fmt: skip
    try:
        found["files"] = _tree(mnt)
    finally:
        subprocess.run(["umount", "-d", mnt], check=True)
        raw.unlink()
        mnt.rmdir()
    return found


# --- what a kill left -------------------------------------------------------------------------


def run_processes(run: Path) -> list[str]:
    """Live processes of the run: its IMAGING_RUN_DIR in their environment, their cwd in it,
    or an argument in it."""
    mark = f"IMAGING_RUN_DIR={run}".encode()
    inside = f"{run}/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "stat").read_text()
            if status[status.rindex(")") + 2] in "ZX":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if (
            mark in environ
            or f"{cwd}/".startswith(inside)
            or any(a == str(run) or inside in a for a in args)
        ):
            found.append(f"{entry.name} {' '.join(args)[:200]}")
    return found


def mounted(under: Path) -> list[str]:
    """Mounts and loop devices of files under ``under`` (conftest.leftovers less its partial
    files, which a killed run leaves for its resume to keep or remove)."""
    return [x for x in leftovers(under) if not x.startswith("partial: ")]


def where(run: Path) -> str:
    """Where the kill found the run, from what the run wrote: a stage's name (killed inside
    it), ``after <stage>`` (between two stages, or finishing), ``start`` (before any stage:
    the CLI starting, or a resume taking over), ``before the run`` (no request.json yet)."""
    if not (run / "request.json").exists():
        return "before the run"
    try:
        state = json.loads((run / "state.json").read_text())
    except (OSError, ValueError):
        return "start"
    stage = state.get("stage")
    if state.get("state") == "completed":
        return "completed"
    if state.get("state") != "running" or not stage:
        return "start"
    return f"after {stage}" if (run / "notebooks" / f"{stage}.ipynb").exists() else str(stage)


def chain_problems(run: Path, hit: list[str]) -> list[str]:
    """The chain holds every file the run's record keeps, and each killed attempt."""
    chain = json.loads((run / "audit.json").read_text())
    named = {e["file"] for e in chain["entries"]}
    problems = [f"{p.relative_to(run)} is not on the audit chain"
                for p in sorted((run / "notebooks").iterdir())
                if not p.name.startswith(".") and str(p.relative_to(run)) not in named]  # fmt: skip
    problems += [f"{name} is not on the audit chain" for name in ("result.json",) if name not in named]
    history = json.loads((run / "state.json").read_text())["history"]
    for stage in STAGES:
        kills = hit.count(stage)
        chained = sum(
            1 for e in chain["entries"] if e["kind"] == "killed" and f"/{stage}.killed-" in e["file"]
        )
        noted = sum(1 for h in history if h["state"] == "killed" and h["stage"] == stage)
        if (chained, noted) != (kills, kills):
            problems.append(f"{stage}: killed {kills} times, {chained} killed entries on the chain, "
                            f"{noted} killed transitions in state.json")  # fmt: skip
    return problems


# --- the CLI cases ---------------------------------------------------------------------------


@dataclass
class Reference:
    seconds: float
    starts: dict[str, float]  # each stage's start, seconds after the CLI's
    fingerprint: dict[str, str]
    # An unbooted run's parameters (IMAGING_PARAMETERS, with the UNBOOTED pipeline); None: the
    # project's, and the whole export.
    parameters: Path | None = None

    @property
    def boot(self) -> bool:
        return self.parameters is None

    @property
    def stages(self) -> list[str]:
        return STAGES if self.boot else [s for s in STAGES if s != "50-verify"]

    @property
    def env(self) -> dict[str, str]:
        return {} if self.parameters is None else {"IMAGING_PARAMETERS": str(self.parameters)}

    def remaining(self, hit: str) -> float:
        """An uninterrupted run's duration from the stage a killed run resumes at (its start-up
        counted once more)."""
        stages = self.stages
        stage = hit.removeprefix("after ")
        if hit.startswith("after ") and stage in stages[:-1]:
            stage = stages[stages.index(stage) + 1]
        if stage not in self.starts:
            return self.seconds
        return self.seconds - self.starts[stage] + self.starts[stages[0]]


def measure(base: Path, jobs: int, count: int = 2, keep: bool = False, boot: bool = True) -> Reference:
    """``count`` uninterrupted runs, ``jobs`` at once: the duration the kills are drawn over,
    and the artifact every resumed one must match (the runs must match each other first).
    ``boot=False``: runs of the UNBOOTED pipeline."""
    # Only the unbooted runs need a parameters copy; the booted ones keep the project's.
    parameters = None if boot else unbooted_parameters(base / "unbooted", UNBOOTED)
    variant = Reference(0.0, {}, {}, parameters)  # its stages and environment, nothing measured yet
    stages = variant.stages
    prefix = "reference" if boot else "reference-unbooted"

    def one(i: int) -> tuple[float, dict[str, float], dict[str, str]]:
        home = base / f"{prefix}-{i}"
        with open(base / f"{prefix}-{i}.log", "w", buffering=1) as log:
            inv = Invocation(home / "runs", log, *export_args("ref", boot), env=variant.env)
            code = inv.finish()
        assert code == 0, f"the reference run failed ({code}): see {base}/{prefix}-{i}.log"
        seconds = time.monotonic() - inv.t0
        starts = {s: at for at, line in inv.lines for s in stages if f"] {s} ..." in line}
        scratch = Path(tempfile.mkdtemp(dir=base))
        try:
            return seconds, starts, fingerprint(Path(inv.result()["path"]), scratch)
        finally:
            shutil.rmtree(scratch)

    with ThreadPoolExecutor(jobs) as pool:
        measured = list(pool.map(one, range(count)))
    prints = [m[2] for m in measured]
    assert all(p == prints[0] for p in prints), f"two uninterrupted runs differ: {prints}"
    seconds = sum(m[0] for m in measured) / len(measured)
    starts = {s: sum(m[1][s] for m in measured) / len(measured) for s in stages}
    for i in range(len(measured)):
        if not keep:  # kept: base/reference-N/runs/ref
            shutil.rmtree(base / f"{prefix}-{i}")
    return Reference(seconds, starts, prints[0], parameters)


@dataclass
class Outcome:
    case: int
    kills: list[tuple[str, float, str, float]] = field(default_factory=list)  # (how, at, hit, settled in)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    boot: bool = True  # the whole export, its boot included


def run_case(case: int, base: Path, ref: Reference, rng: random.Random, kills: int,
             plan: list[str] | None = None) -> Outcome:  # fmt: skip
    """One export, killed ``kills`` times (or once in each stage ``plan`` names, as soon as the
    stage's notebook runs), resumed after each kill, checked."""
    t0 = time.monotonic()
    home = base / f"case-{case:04d}"
    runs = home / "runs"
    run_id = f"crash-{case:04d}"
    run = runs / run_id
    out = Outcome(case, boot=ref.boot)
    hit: list[str] = []
    log = open(base / f"case-{case:04d}.log", "w", buffering=1)  # noqa: SIM115 - closed below, kept on failure
    try:
        inv = Invocation(runs, log, *export_args(run_id, ref.boot), env=ref.env)
        last_state = b""
        for k in range(len(plan) if plan is not None else kills):
            # In a plan, the kinds of kill take turns, the CLI's pid alone first (and last: in
            # 50-verify, where the kernel must stop QEMU by itself).
            group = rng.random() >= PID_ONLY if plan is None else k % 2 == 1
            if plan is not None:
                # In the stage, whatever the machine's load: papermill has saved its notebook.
                part = run / "notebooks" / f".{plan[k]}.part.ipynb"
                wait_for(f"{plan[k]} to run", lambda: part.exists() or inv.proc.poll() is not None)  # noqa: B023
            else:
                span = ref.seconds if k == 0 else ref.remaining(hit[-1])
                time.sleep(max(0.0, rng.uniform(0, span) - (time.monotonic() - inv.t0)))
            at = time.monotonic() - inv.t0
            if not inv.kill(group):
                out.kills.append(("none", at, "ended before the kill", 0.0))
                break
            inv.finish()
            state = (run / "state.json").read_bytes() if (run / "state.json").exists() else b""
            # A resume killed before it changed anything found the run as the last kill left it.
            hit.append("start" if k and state == last_state else where(run))
            last_state = state
            settled = time.monotonic()
            while (run_processes(run) or mounted(home)) and time.monotonic() - settled < SETTLE:
                time.sleep(0.1)
            left = run_processes(run) + mounted(home)
            out.kills.append(("group" if group else "pid", at, hit[-1], time.monotonic() - settled))
            if left:
                out.problems.append(f"{SETTLE:.0f} s after a kill in {hit[-1]}: {left}")
                for line in run_processes(run):  # ours to end: the campaign started them
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line.split()[0]), signal.SIGKILL)
            # A run killed before it wrote its request is no run yet: the user exports it again.
            again = ("resume", run_id) if (run / "request.json").exists() else export_args(run_id, ref.boot)
            inv = Invocation(runs, log, *again, env=ref.env)
        code = inv.finish()
        result = inv.result()
        # Booted: the boot check passed. Unbooted: the run was of its pipeline, which has none.
        expected = (True, "export") if ref.boot else (None, UNBOOTED)
        if code != 0 or (result.get("verified"), result.get("kind")) != expected:
            out.problems.append(f"the last resume exited {code}: {inv.lines[-1][1] if inv.lines else ''}")
            return out
        scratch = Path(tempfile.mkdtemp(dir=base))
        try:
            if (found := fingerprint(Path(result["path"]), scratch)) != ref.fingerprint:
                differ = [k for k in found if found[k] != ref.fingerprint[k]]
                out.problems.append(f"the artifact differs from the reference run's: {differ}")
        finally:
            shutil.rmtree(scratch)
        audit = subprocess.run([sys.executable, "-m", "imaging", "audit", run_id], capture_output=True,
                               text=True, env={**os.environ, "IMAGING_RUNS": str(runs), **ref.env})  # fmt: skip
        if audit.returncode != 0:
            out.problems.append(f"imaging audit: {audit.stdout.strip()} {audit.stderr.strip()}")
        out.problems += chain_problems(run, hit)
        out.problems += [f"after the resume: {x}" for x in leftovers(home) + run_processes(run)]
        stray = [str(p) for p in home.rglob("*") if not p.is_relative_to(run) and p != runs]
        out.problems += [f"a file outside the run: {p}" for p in stray]
        return out
    except Exception as e:  # a case that breaks the harness is a failed case, not the end
        out.problems.append(f"{type(e).__name__}: {e}")
        return out
    finally:
        log.close()
        out.seconds = time.monotonic() - t0
        if not out.problems:
            shutil.rmtree(home, ignore_errors=True)
            Path(log.name).unlink()


def booted(case: int, share: float) -> bool:
    """Whether a case runs the whole export: ``share`` of the cases, spread evenly (the boots,
    most of the CPU, do not bunch up among the cases run at once)."""
    return int((case + 1) * share) > int(case * share)


def landed(outcomes: list[Outcome]) -> int:
    """The kills that hit a run (not those planned after the run had ended)."""
    return sum(1 for o in outcomes for how, *_ in o.kills if how != "none")


def campaign(
    runs: int, seed: int, jobs: int, kills: int, base: Path, boot_share: float = 1.0, min_kills: int = 0
) -> list[Outcome]:
    """``runs`` cases, and more after them until ``min_kills`` kills have hit a run: a run that
    ends before its next kill moment is not killed again, and how many do depends on the load."""
    t0 = time.monotonic()
    boots = [booted(case, boot_share) for case in range(max(runs, 1))]
    refs: dict[bool, Reference] = {}
    for boot in sorted(set(boots), reverse=True):
        ref = refs[boot] = measure(base, jobs, boot=boot)
        starts = " ".join(f"{s} {ref.starts[s]:.1f}" for s in ref.stages)
        print(f"uninterrupted {'booted' if boot else 'unbooted'} run (2 at a time): {ref.seconds:.1f} s; "
              f"stages start at (s): {starts}", flush=True)  # fmt: skip
    # The boot check reads the artifact and changes nothing of it.
    if len(refs) == 2 and refs[True].fingerprint != refs[False].fingerprint:
        differ = [
            k for k in refs[True].fingerprint if refs[True].fingerprint[k] != refs[False].fingerprint.get(k)
        ]
        raise AssertionError(f"the booted and unbooted reference runs' artifacts differ: {differ}")
    rng = random.Random(seed)
    seeds: list[int] = []
    outcomes: list[Outcome] = []
    taking = threading.Lock()

    def take() -> tuple[int, int] | None:
        """The next case and its seed, in order (the seeds follow from --seed alone)."""
        with taking:
            if len(seeds) >= runs and landed(outcomes) >= min_kills:
                return None
            seeds.append(rng.randrange(1 << 30))
            return len(seeds) - 1, seeds[-1]

    def one(case: int, case_seed: int) -> Outcome:
        boot = booted(case, boot_share)
        if boot not in refs:  # a share below 1 gave every planned case one variant only
            boot = not boot
        o = run_case(case, base, refs[boot], random.Random(case_seed), kills)
        what = "; ".join(
            f"{how} kill at {at:.1f} s in {hit} (settled in {s:.1f} s)" for how, at, hit, s in o.kills
        )
        verdict = "ok" if not o.problems else "FAILED: " + " | ".join(o.problems)
        print(
            f"case {case}{'' if o.boot else ' (unbooted)'}: {what}; {o.seconds:.0f} s: {verdict}", flush=True
        )
        return o

    def worker() -> None:
        while (taken := take()) is not None:
            o = one(*taken)
            with taking:
                outcomes.append(o)

    with ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(worker) for _ in range(jobs)]:
            f.result()
    outcomes.sort(key=lambda o: o.case)
    hits = Counter(hit for o in outcomes for _, _, hit, _ in o.kills)
    killed = landed(outcomes)
    failed = [o for o in outcomes if o.problems]
    print(f"\n{len(outcomes)} runs ({sum(o.boot for o in outcomes)} booted), {killed} kills ({sum(1 for o in outcomes for k in o.kills if k[0] == 'pid')} "
          f"of the CLI's pid alone), {len(failed)} failed, in {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    for hit, n in sorted(hits.items()):
        print(f"  {n:4d} kills hit {hit}")
    settle = [s for o in outcomes for *_, s in o.kills]
    if settle:
        print(
            f"  slowest to settle after a kill: {max(settle):.1f} s; slowest case {max(o.seconds for o in outcomes):.0f} s"
        )
    missed = [s for s in expected_stages(outcomes) if s not in hits]
    if missed:
        print(f"  stages no kill hit: {', '.join(missed)}")
    return outcomes


def expected_stages(outcomes: list[Outcome]) -> list[str]:
    """The stages the runs made had: 50-verify only if one of them booted."""
    return [s for s in STAGES if s != "50-verify" or any(o.boot for o in outcomes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.campaigns.crash", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=200, help="exports killed and resumed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="cases at a time")
    p.add_argument("--kills", type=int, default=1, help="kills per export (the resumes killed too)")
    p.add_argument("--min-kills", type=int, default=0,
                   help="more runs after --runs until this many kills have hit a run")  # fmt: skip
    p.add_argument("--service", type=int, default=6, help="worker kills, and as many API kills")
    p.add_argument("--boot-share", type=float, default=1.0,
                   help="share of the runs that boot (50-verify); the others end at 40-export. Below 1, "
                        "the service's requests do not boot either")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the campaign's directory")
    args = p.parse_args(argv)
    assert 0.0 <= args.boot_share <= 1.0, "--boot-share is a share: 0 to 1"
    assert os.geteuid() == 0, "the campaign mounts and boots: run it as root"
    base = Path(tempfile.mkdtemp(prefix="imaging-crash-"))
    ok = True
    try:
        outcomes = (
            campaign(args.runs, args.seed, args.jobs, args.kills, base, args.boot_share, args.min_kills)
            if args.runs
            else []
        )
        ok = not any(o.problems for o in outcomes)
        hits = {hit for o in outcomes for _, _, hit, _ in o.kills}
        if landed(outcomes) >= 100 and not set(expected_stages(outcomes)) <= hits:
            ok = False
        if args.service:
            from tests.campaigns import crash_service

            boot = args.boot_share >= 1.0
            ok = crash_service.campaign(args.service, args.seed, base / "service", boot=boot) and ok
    finally:
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"campaign directory kept: {base}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
