"""Ctrl-C or SIGTERM mid-stage: tools stopped, mounts released, partial files removed, and
running the run again resumes at the stage that was interrupted. (SIGKILL in every stage:
test_crash.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from imaging import config

from .conftest import Cli, last_json, leftovers


def wait_for(what: str, check: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def qemu_running(under: Path) -> bool:
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return any("qemu-system" in line and str(under) in line for line in ps.splitlines())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent is gone or has not reaped it yet).
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def stage_of(run: Path) -> str | None:
    try:
        return json.loads((run / "state.json").read_text()).get("stage")
    except (OSError, ValueError):
        return None


def started_stages(run: Path) -> list[str]:
    history = json.loads((run / "state.json").read_text())["history"]
    return [h["stage"] for h in history if h["state"] == "running"]


def test_sigterm_during_the_boot_then_resume(cli: Cli, tmp_path: Path) -> None:
    proc = cli.popen("export", "sample:kvm", "--name", "term", "--run", "term")
    run = cli.runs / "term"
    wait_for("the boot check", lambda: qemu_running(run))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "imaging: interrupted; partial files removed"
    wait_for("QEMU to stop", lambda: not qemu_running(run), timeout=10)
    assert leftovers(tmp_path) == []
    state = json.loads((run / "state.json").read_text())
    assert (state["state"], state["stage"], state["error"]) == ("error", "50-verify", "interrupted")

    result = last_json(cli("resume", "term"))
    assert result["verified"] and result["run"] == "term"
    assert started_stages(run) == [*config.pipeline_stages("export"), "50-verify"]
    assert leftovers(tmp_path) == []


def test_ctrl_c_while_files_are_copied_releases_mounts(
    cli: Cli, make_ext: Callable[..., Path], tmp_path: Path
) -> None:
    files = {
        "boot/vmlinuz-6.1.0-1-amd64": "kernel",
        "lib/modules/6.1.0-1-amd64/modules.builtin": "kernel/drivers/block/virtio_blk.ko\n",
        "etc/fstab": "x\n",
    }
    image = make_ext("big", files, size="700M")
    filler = tmp_path / "big-root" / "data"
    # mke2fs -d already ran: add the bulk with debugfs so rsync has something to chew on.
    filler.write_bytes(os.urandom(400 << 20))
    subprocess.run(["debugfs", "-w", "-R", f"write {filler} /data", image], check=True, capture_output=True)
    proc = cli.popen(
        "export",
        str(image),
        "--name",
        "ctrlc",
        "--run",
        "ctrlc",
        "--placement",
        "mkfs",
        "--profile",
        "generic",
    )
    # 10-clean and 20-migrate mount the guest too: wait for 30-bootable's copy.
    wait_for(
        "the new filesystem to be mounted",
        lambda: (
            stage_of(cli.runs / "ctrlc") == "30-bootable"
            and "imaging-mnt" in Path("/proc/self/mountinfo").read_text()
        ),
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert leftovers(tmp_path) == []
    assert stage_of(cli.runs / "ctrlc") == "30-bootable"
    assert not list((cli.runs / "ctrlc" / "work").glob(".*"))


def test_a_failed_stage_resumes_where_it_failed(cli: Cli, tmp_path: Path) -> None:
    # A broken QEMU on PATH: the boot check fails; fixed, the run resumes at 50-verify only.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qemu-system-x86_64").write_text("#!/bin/sh\nexit 1\n")
    (fake / "qemu-system-x86_64").chmod(0o755)
    broken = cli("export", "sample:kvm", "--name", "again", "--run", "again", check=False,
                 PATH=f"{fake}:{os.environ['PATH']}", IMAGING_CACHE=str(tmp_path / "cache"))  # fmt: skip
    assert broken.returncode == 1
    assert "imaging: error: 50-verify: again.qcow2 did not boot on kvm" in broken.stderr
    assert "resume with: python -m imaging resume again" in broken.stderr
    run = cli.runs / "again"
    failed = json.loads((run / "notebooks" / "50-verify.failed-1.ipynb").read_text())
    # The failed attempt opens with its error, under its title (papermill's banner above both).
    at = next(i for i, c in enumerate(failed["cells"]) if "summary" in c["metadata"].get("tags", []))
    assert "".join(failed["cells"][at - 1]["source"]).startswith("# 50-verify")
    assert "This attempt at 50-verify failed" in "".join(failed["cells"][at]["source"])
    result = last_json(cli("resume", "again"))
    assert result["verified"]
    assert started_stages(run) == [*config.pipeline_stages("export"), "50-verify"]
    # Resuming a completed run prints its result again and does nothing else.
    assert last_json(cli("resume", "again")) == result


def kernels_of(runs: Path) -> list[int]:
    """Stage kernels started for runs under ``runs`` that are still alive, and the zygotes
    they are forked from (whose command line a forked kernel shows)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes()
            if b"ipykernel_launcher" not in command and b"imaging.run.zygote" not in command:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not a process
            continue
        if f"IMAGING_RUNS={runs}".encode() in environ and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def test_ctrl_c_in_the_first_moments_of_a_stage(cli: Cli, tmp_path: Path) -> None:
    # Each stage's kernel starts while the stage before it runs, in a session of its own (the
    # terminal's Ctrl-C never reaches it): an interrupt as a stage begins, while its kernel or
    # the next one is being started, must still stop every kernel, at once, and give back the
    # terminal (stderr closed: a scheduler reading it would otherwise wait on a kernel).
    start = ("export", "sample:kvm", "--name", "early", "--run", "early")
    for stage, delay in (("20-migrate", 0.05), ("30-bootable", 0.0), ("40-export", 0.3)):
        proc = cli.popen(*(start if stage == "20-migrate" else ("resume", "early")))
        assert proc.stderr is not None
        for line in proc.stderr:
            if f"] {stage} ..." in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, f"{stage}, {delay} s in: exit {proc.returncode}\n{err}"
        assert time.monotonic() - started < 20, (
            f"{stage}: the interrupt took {time.monotonic() - started:.1f} s"
        )
        assert kernels_of(cli.runs) == [], stage
        assert stage_of(cli.runs / "early") == stage
        assert leftovers(tmp_path) == []
    result = last_json(cli("resume", "early"))
    assert result["verified"]
    assert kernels_of(cli.runs) == [] and leftovers(tmp_path) == []
