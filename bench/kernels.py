"""What a run's stage kernels cost: the CPU of one unbooted export of the sample (every stage but
the boot check) with its kernels forked from the run's zygote (imaging/run/zygote.py), against
the same export with every kernel started the ordinary way (IMAGING_KERNEL_FORK=0).

CPU is user + system of the whole process tree (every process of it is reaped within it),
which another load on the machine changes less than wall time; the median of three each.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, load  # noqa: E402
from imaging import config  # noqa: E402

UNBOOTED = "export-unbooted"


def _parameters(where: Path) -> Path:
    """The project's parameters, plus a pipeline of every export stage but the boot check."""
    target = where / "parameters"
    subprocess.run(["cp", "-r", config.parameters_dir(), target], check=True)
    defaults = yaml.safe_load((target / "defaults.yaml").read_text())
    defaults["pipelines"][UNBOOTED] = [s for s in defaults["pipelines"]["export"] if s != "50-verify"]
    (target / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    return target


def _export(where: Path, parameters: Path, fork: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one unbooted export of sample:kvm."""
    run = Path(tempfile.mkdtemp(dir=where))
    env = {**os.environ, "IMAGING_RUNS": str(run / "runs"), "IMAGING_PARAMETERS": str(parameters),
           "IMAGING_PROGRESS": "0", "IMAGING_KERNEL_FORK": "1" if fork else "0"}  # fmt: skip
    argv = [sys.executable, "-m", "imaging", "export", "sample:kvm", "--name", "bench", "--format", "raw",
            "--firmware", "bios", "--kind", UNBOOTED, "--out", str(run / "out")]  # fmt: skip
    # Children's usage counts those reaped: the export's whole tree, once it has ended.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(argv, env=env, cwd=config.PROJECT, check=True, capture_output=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["rm", "-rf", run], check=True)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def main() -> list[tuple[str, str, str]]:
    WORK.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="kernels-", dir=WORK))
    try:
        parameters = _parameters(where)
        _export(where, parameters, True)  # the sample built and cached, the page cache warm
        found: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(3):
            for fork in (False, True):
                found[fork].append(_export(where, parameters, fork))
    finally:
        subprocess.run(["rm", "-rf", where], check=True)
    cpu = {fork: statistics.median(c for c, _ in runs) for fork, runs in found.items()}
    wall = {fork: statistics.median(w for _, w in runs) for fork, runs in found.items()}
    return [
        ("kernels: an unbooted export of sample:kvm, kernels started the ordinary way",
         f"{cpu[False]:.1f} s CPU", f"{wall[False]:.1f} s wall; load {load():.1f}"),
        ("kernels: the same, kernels forked from the run's zygote",
         f"{cpu[True]:.1f} s CPU", f"{wall[True]:.1f} s wall; {cpu[False] - cpu[True]:.1f} s CPU less"),
    ]  # fmt: skip


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
